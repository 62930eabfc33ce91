"""Griffe extension: the reStructuredText bits of our docstrings as Markdown.

The docstrings follow the Google style of optax, with a few reStructuredText
constructs that Markdown does not know. Before mkdocstrings renders a
docstring, this extension rewrites

- ``.. math::`` blocks into ``$$ ... $$`` blocks and ``:math:`x``` roles into
  ``$x$`` (marked by ``pymdownx.arithmatex``, turned into MathML by the
  ``mathml.py`` hook);
- links ```text <url>`_`` into ``[text](url)``;
- a paragraph ending in ``::`` followed by an indented block into a fenced
  code block.

It is loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.
options.extensions``) and changes nothing in the package itself.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r':math:`([^`]+)`')
_LINK = re.compile(r'`([^`<]+?)\s*<((?:https?|mailto):[^>\s]+)>`__?', re.S)
_OTHER_ROLE = re.compile(r':(?:func|class|meth|mod|attr|obj|data|py:\w+):`~?([^`]+)`')


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _blocks(text: str) -> str:
  """Rewrites ``.. math::`` and ``::`` literal blocks."""
  lines = text.split('\n')
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    stripped = line.strip()
    is_math = stripped.startswith('.. math::')
    is_literal = (
        not is_math and stripped.endswith('::') and not stripped.startswith('..')
    )
    if not (is_math or is_literal):
      out.append(line)
      i += 1
      continue
    base = _indent(line)
    # The block: following lines that are blank or indented deeper.
    j = i + 1
    body: list[str] = []
    if is_math and stripped[len('.. math::'):].strip():
      body.append(' ' * (base + 2) + stripped[len('.. math::'):].strip())
    while j < len(lines) and (
        not lines[j].strip() or _indent(lines[j]) > base
    ):
      body.append(lines[j])
      j += 1
    while body and not body[-1].strip():
      body.pop()
    content = textwrap.dedent('\n'.join(body)).strip('\n')
    pad = ' ' * base
    if is_math:
      out += ['', pad + '$$']
      out += [pad + row if row.strip() else '' for row in content.split('\n')]
      out += [pad + '$$', '']
    else:
      head = line.rstrip()[:-1]  # 'Example::' -> 'Example:'
      if head.strip() == ':':   # a lone '::' introduces the block silently
        head = ''
      if head.strip():
        out.append(head)
      lang = 'python' if '>>>' not in content else 'pycon'
      out += ['', pad + '```' + lang]
      out += [pad + row if row.strip() else '' for row in content.split('\n')]
      out += [pad + '```', '']
    i = j
  return '\n'.join(out)


def rst_to_markdown(text: str) -> str:
  text = _blocks(text)
  text = _ROLE.sub(lambda m: f'${m.group(1)}$', text)
  text = _LINK.sub(
      lambda m: f'[{" ".join(m.group(1).split())}]({m.group(2)})', text
  )
  text = _OTHER_ROLE.sub(lambda m: f'`{m.group(1)}`', text)
  return text


class RstToMarkdown(griffe.Extension):
  """Rewrites each docstring once, when its object is loaded."""

  def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    del kwargs
    if obj.docstring is not None and not getattr(obj, '_rst_done', False):
      obj.docstring.value = rst_to_markdown(obj.docstring.value)
      obj._rst_done = True  # pylint: disable=protected-access


class NamespaceSubpackages(griffe.Extension):
  """Lets Griffe load ``sam_optax/_src`` although it has no ``__init__.py``.

  Griffe skips the modules of a folder without ``__init__.py`` inside a
  regular package (Python imports it as a namespace subpackage), so the
  public aliases in ``sam_optax/__init__.py`` could not be resolved. Before
  Griffe loads the submodules of a package, this registers each such folder
  as an (empty) namespace module, and Griffe then fills it as usual.
  """

  def on_module_instance(self, *, mod: griffe.Module, **kwargs: Any) -> None:
    # Called when the package's __init__.py is visited, before its submodules
    # are loaded.
    del kwargs
    self._register(mod)

  def _register(self, module: griffe.Module) -> None:
    path = module.filepath
    if isinstance(path, list) or path is None or path.name != '__init__.py':
      return
    for folder in sorted(path.parent.iterdir()):
      if (
          folder.is_dir()
          and folder.name.isidentifier()
          and not (folder / '__init__.py').exists()
          and any(folder.rglob('*.py'))
          and folder.name not in module.members
      ):
        sub = griffe.Module(folder.name, filepath=[folder], parent=module)
        module.set_member(folder.name, sub)
