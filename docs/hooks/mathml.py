"""MkDocs hook: every formula rendered to MathML at build time (no script, no CDN).

``pymdownx.arithmatex`` (generic mode) leaves each formula as TeX in
``<span class="arithmatex">\\(...\\)</span>`` or
``<div class="arithmatex">\\[...\\]</div>``. This hook, run on each page's
HTML (the docstrings rendered by mkdocstrings included), converts the TeX to
MathML with ``latex2mathml`` (a pure-Python package in the ``docs`` extra).
Browsers draw MathML natively, so the pages show their formulas offline and
load no script. The TeX stays in the page as the MathML's
``application/x-tex`` annotation, which browsers do not draw but copy and
search see. A formula that does not convert fails the build, naming it.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml import converter

_FORMULA = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">'
    r'(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])'
    r'</(?P=tag)>',
    re.S,
)


def to_mathml(tex: str, display: bool) -> str:
  """The MathML of one TeX formula, with the TeX kept as its annotation."""
  try:
    mathml = converter.convert(
        tex.strip(), display='block' if display else 'inline'
    )
  except Exception as error:  # latex2mathml raises its own classes
    raise ValueError(
        f'cannot render the formula {tex!r} to MathML '
        f'({type(error).__name__}: {error}); check its TeX'
    ) from error
  head, rest = mathml.split('>', 1)
  body = rest[: -len('</math>')]
  annotation = (
      '<annotation encoding="application/x-tex">'
      f'{html.escape(tex.strip())}</annotation>'
  )
  return f'{head}><semantics><mrow>{body}</mrow>{annotation}</semantics></math>'


def render_math(page_html: str) -> str:
  """Replaces every arithmatex formula of a page by its MathML."""

  def replace(match: re.Match[str]) -> str:
    display = match['block'] is not None
    tex = html.unescape(match['block'] if display else match['inline'])
    tag = match['tag']
    return f'<{tag} class="arithmatex">{to_mathml(tex, display)}</{tag}>'

  return _FORMULA.sub(replace, page_html)


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
  del kwargs
  try:
    return render_math(html_text)
  except ValueError as error:
    raise ValueError(f'{page.file.src_path}: {error}') from error
