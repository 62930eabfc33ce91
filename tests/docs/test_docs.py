"""The documentation site builds, covers the API, and works offline.

``mkdocs build --strict`` (mkdocs-material + mkdocstrings) runs into a
temporary folder; every public name of ``sam_optax`` and
``sam_optax.sharpness`` must have its ``::: name`` block in docs/api/, the
reStructuredText bits of the docstrings must come out as Markdown, every
formula as MathML (no script, nothing from the network), every signature
complete. The Python blocks of the home page and of the guide run.
"""

from __future__ import annotations

import html
import importlib.util
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest

import sam_optax
import sam_optax.sharpness

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / 'docs'


def load_hooks(name: str = 'rst_to_markdown'):
  path = DOCS / 'hooks' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(f'_docs_hooks_{name}', path)
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


@pytest.mark.slow
def test_site_builds_without_warnings(site):
  folder, log = site
  warnings = [line for line in log.splitlines()
              if 'WARNING' in line or 'ERROR' in line]
  assert not warnings, '\n'.join(warnings)
  for page in ('index.html', 'guide/choosing_rho/index.html',
               'guide/contract/index.html', 'guide/layouts/index.html',
               'guide/measuring/index.html', 'guide/demo/index.html',
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


@pytest.mark.slow
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


# The site offline: formulas, signatures, nothing fetched at page view.

@pytest.mark.slow
def test_formulas_are_mathml_and_no_script_renders_them(site):
  folder, _ = site
  formulas = 0
  for page in folder.rglob('*.html'):
    body = page.read_text()
    for element in re.findall(
        r'<(?:span|div) class="arithmatex">(.*?)</(?:span|div)>', body, re.S):
      assert element.startswith('<math'), (page, element[:80])
      formulas += 1
    assert 'mathjax' not in body.lower() and 'katex' not in body.lower(), page
  assert formulas > 100, formulas
  rho = (folder / 'guide' / 'choosing_rho' / 'index.html').read_text()
  assert '<mi>&#x003C1;</mi>' in rho or '<mi>\u03c1</mi>' in rho


@pytest.mark.slow
def test_pages_load_nothing_from_the_network(site):
  folder, _ = site
  external = re.compile(
      r'<(?:script|link|img)\b[^>]*\b(?:src|href)="(?:https?:)?//', re.I)
  for page in folder.rglob('*.html'):
    body = page.read_text()
    assert not external.search(body), (page, external.search(body).group(0))
    assert '@import url(' not in body, page
  for sheet in folder.rglob('*.css'):
    assert not re.search(r'url\((["\']?)(?:https?:)?//', sheet.read_text()), sheet


def signature_text(page_html: str, name: str) -> str:
  start = page_html.index(f'id="{name}"')
  block = re.search(r'class="doc-signature.*?</pre>', page_html[start:], re.S)
  return html.unescape(re.sub(r'<[^>]+>', '', block.group(0)))


COMMON_OPTIONS = ('ascent_steps', 'has_aux', 'perturbation_mask', 'layout',
                  'track_cosine')


@pytest.mark.slow
def test_signatures_show_every_parameter_wrapped(site):
  folder, _ = site
  page = (folder / 'api' / 'transformations' / 'index.html').read_text()
  documented = re.findall(r'^:::\s+sam_optax\.(\w+)',
                          (DOCS / 'api' / 'transformations.md').read_text(), re.M)
  factories = [name for name in documented if name[0].islower()
               and 'loss_fn' in inspect.signature(getattr(sam_optax, name)).parameters]
  assert 'sam' in factories and 'looksam' in factories
  for name in factories:
    text = signature_text(page, f'sam_optax.{name}')
    for parameter in inspect.signature(getattr(sam_optax, name)).parameters:
      assert parameter in text, (name, parameter, text)
    assert all(len(line) <= 80 for line in text.splitlines()), (name, text)
  sam_signature = signature_text(page, 'sam_optax.sam')
  for option in COMMON_OPTIONS:
    assert f'{option}=' in sam_signature, (option, sam_signature)


def test_mathml_hook_renders_and_rejects():
  hook = load_hooks('mathml')
  page = ('<p><span class="arithmatex">\\(a &lt; \\frac{1}{\\rho}\\)</span>'
          '</p><div class="arithmatex">\\[\n\\|g_0\\|_2\n\\]</div>')
  out = hook.render_math(page)
  assert '\\(' not in out and '\\[' not in out
  assert out.count('<math') == 2 and 'display="block"' in out
  assert '<mfrac>' in out and '<msub>' in out
  assert '<annotation encoding="application/x-tex">a &lt; \\frac{1}{\\rho}' in out
  with pytest.raises(ValueError, match='x\\^\\{'):
    hook.render_math('<span class="arithmatex">\\(x^{\\)</span>')


def test_signature_extension_adds_the_runtime_parameters():
  import griffe
  hook = load_hooks('signatures')

  def source(loss_fn, rho=0.05):
    del loss_fn, rho

  def runtime(loss_fn, rho=0.05, *, ascent_steps=1, layout=None):
    del loss_fn, rho, ascent_steps, layout

  static = griffe.Parameters(
      griffe.Parameter('loss_fn', kind=griffe.ParameterKind.positional_or_keyword),
      griffe.Parameter('rho', kind=griffe.ParameterKind.positional_or_keyword,
                       default='0.05'))
  merged = hook.merged_parameters(static, inspect.signature(runtime))
  assert [p.name for p in merged] == ['loss_fn', 'rho', 'ascent_steps', 'layout']
  assert merged['ascent_steps'].kind is griffe.ParameterKind.keyword_only
  assert merged['ascent_steps'].default == '1'
  assert merged['rho'] is static['rho']
  assert hook.merged_parameters(static, inspect.signature(source)) is None


# Every Python block of the home page and of the guide runs.

def python_blocks(path: pathlib.Path) -> list[str]:
  return re.findall(r'```python\n(.*?)```', path.read_text(), re.S)


GUIDE_PAGES = sorted((DOCS / 'guide').glob('*.md'))


@pytest.fixture(scope='module')
def quickstart():
  """The namespace the home page's quickstart leaves; the guide continues it."""
  namespace = {}
  exec(compile(python_blocks(DOCS / 'index.md')[0], 'index.md', 'exec'),  # noqa: S102
       namespace)
  return namespace


def test_home_page_blocks_run_and_match_the_readme():
  blocks = python_blocks(DOCS / 'index.md')
  readme = python_blocks(ROOT / 'README.md')
  assert blocks and blocks[0] == readme[0], 'the quickstarts differ'
  namespace = {}
  for block in blocks:
    exec(compile(block, 'index.md', 'exec'), namespace)  # noqa: S102


@pytest.mark.slow
@pytest.mark.parametrize('page', GUIDE_PAGES, ids=lambda p: p.name)
def test_guide_page_blocks_run(page, quickstart):
  namespace = dict(quickstart)
  for block in python_blocks(page):
    exec(compile(block, str(page), 'exec'), namespace)  # noqa: S102


def test_every_guide_page_is_in_the_nav():
  config = (ROOT / 'mkdocs.yml').read_text()
  missing = [p.name for p in GUIDE_PAGES if f'guide/{p.name}' not in config]
  assert not missing, f'guide pages missing from mkdocs.yml nav: {missing}'
