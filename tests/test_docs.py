"""The documentation site builds with warnings as errors and covers the API.

``mkdocs build --strict`` (mkdocs-material + mkdocstrings) runs into a
temporary folder; every public name of ``sam_optax`` and
``sam_optax.sharpness`` must have its ``::: name`` block in docs/api/, and the
reStructuredText bits of the docstrings must come out as Markdown.
"""

from __future__ import annotations

import html
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

import sam_optax
import sam_optax.sharpness

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'


def load_hooks():
  path = DOCS / 'hooks' / 'rst_to_markdown.py'
  spec = importlib.util.spec_from_file_location('_docs_rst_hooks', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  """Builds the site once; returns (folder, build log)."""
  folder = tmp_path_factory.mktemp('site')
  env = dict(os.environ, NO_MKDOCS_2_WARNING='1')
  proc = subprocess.run(
      [sys.executable, '-m', 'mkdocs', 'build', '--strict',
       '--config-file', str(ROOT / 'mkdocs.yml'), '--site-dir', str(folder)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, f'mkdocs build --strict failed:\n{log}'
  return folder, log


def test_site_builds_without_warnings(site):
  folder, log = site
  warnings = [line for line in log.splitlines()
              if 'WARNING' in line or 'ERROR' in line]
  assert not warnings, '\n'.join(warnings)
  for page in ('index.html', 'choosing_rho/index.html',
               'api/transformations/index.html', 'api/devices/index.html',
               'api/sharpness/index.html'):
    assert (folder / page).exists(), page


def documented_names() -> set[str]:
  names = set()
  for page in (DOCS / 'api').glob('*.md'):
    names |= set(re.findall(r'^:::\s+([\w.]+)', page.read_text(), re.M))
  return names


def test_every_public_name_has_a_reference_entry():
  names = documented_names()
  public = {f'sam_optax.{n}' for n in sam_optax.__all__}
  public |= {f'sam_optax.sharpness.{n}' for n in sam_optax.sharpness.__all__}
  missing = sorted(public - names)
  assert not missing, (
      f'public names without a `::: name` block in docs/api/*.md: {missing}'
  )
  stale = sorted(
      n for n in names - public
      if n not in ('sam_optax', 'sam_optax.sharpness')
  )
  assert not stale, f'docs/api/*.md documents names that are gone: {stale}'


def test_reference_pages_render_docstrings_math_and_links(site):
  folder, _ = site
  text = (folder / 'api' / 'transformations' / 'index.html').read_text()
  for name in ('sam_optax.sam', 'sam_optax.asam', 'sam_optax.SAMState',
               'sam_optax.inject_hyperparams'):
    assert f'id="{name}"' in text, name
  plain = html.unescape(re.sub(r'<[^>]+>', '', text))
  # sam's math block is a display formula, not reStructuredText.
  assert r'\epsilon = \rho \, \frac{g_0}{\|g_0\|_2}' in plain
  assert 'arithmatex' in text
  assert 'href="https://arxiv.org/abs/2010.01412"' in text
  for page in folder.rglob('*.html'):
    body = page.read_text()
    assert '.. math::' not in body, page
    assert ':math:`' not in body, page


def test_rst_to_markdown_hook():
  hooks = load_hooks()
  source = '\n'.join([
      'Intro :math:`x^2` and a role.',
      '',
      '.. math::',
      '',
      '  a = b',
      '  + c',
      '',
      'See `A paper',
      '  title <https://arxiv.org/abs/1>`_, 2021.',
      '',
      'Run::',
      '',
      '  python x.py',
      '',
      'End.',
  ])
  out = hooks.rst_to_markdown(source)
  assert 'Intro $x^2$ and a role.' in out
  assert '$$\na = b\n+ c\n$$' in out
  assert '[A paper title](https://arxiv.org/abs/1), 2021.' in out
  assert 'Run:\n\n```python\npython x.py\n```' in out
  assert out.rstrip().endswith('End.')
