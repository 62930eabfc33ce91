"""Every script in examples/ runs at a tiny size, so the examples never rot.

Each ``examples/*.py`` that defines ``main`` is imported by path and called as
``main(flags)``, with the tiny flags of ``TINY_FLAGS`` (``['--quick']`` for a
file not listed there). Runs happen in a temporary working directory, so
plots and output folders land there.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import math
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'

# Tiny flags per example; files not listed get ['--quick'].
TINY_FLAGS = {
    'plain_jax.py': ['--quick', '--no-progress', '--methods', 'sgd,sam,asam',
                     '--plot', 'plain_jax.png'],
    'flax_nnx.py': ['--quick', '--no-progress'],
    'flax_linen_batchnorm.py': ['--quick', '--no-progress'],
    'demo.py': ['--quick', '--no-progress'],
    'msharpness.py': ['--quick', '--no-progress'],
}

# The examples this suite must always find (others are run when present).
REQUIRED = ('plain_jax.py', 'flax_nnx.py', 'flax_linen_batchnorm.py')


def defines_main(path: pathlib.Path) -> bool:
  tree = ast.parse(path.read_text(), filename=str(path))
  return any(
      isinstance(node, ast.FunctionDef) and node.name == 'main'
      for node in tree.body
  )


def discover() -> list[str]:
  return sorted(p.name for p in EXAMPLES.glob('*.py') if defines_main(p))


def load(name: str):
  """Imports examples/<name> as a module (examples/ on sys.path for helpers)."""
  path = EXAMPLES / name
  module_name = f'_example_{path.stem}'
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module  # dataclasses look their module up here
  added = str(EXAMPLES) not in sys.path
  if added:
    sys.path.insert(0, str(EXAMPLES))
  try:
    spec.loader.exec_module(module)
  finally:
    if added:
      sys.path.remove(str(EXAMPLES))
  return module


_RUNS = {}


def run_example(name: str, tmp_path_factory):
  """Runs examples/<name> once per session; returns (result, stdout, dir)."""
  if name not in _RUNS:
    folder = tmp_path_factory.mktemp(pathlib.Path(name).stem)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch:
      monkeypatch.chdir(folder)
      monkeypatch.setenv('MPLBACKEND', 'Agg')
      monkeypatch.syspath_prepend(str(EXAMPLES))
      module = load(name)
      with contextlib.redirect_stdout(out):
        result = module.main(TINY_FLAGS.get(name, ['--quick']))
    _RUNS[name] = (result, out.getvalue(), folder)
  return _RUNS[name]


def test_required_examples_are_discovered():
  found = discover()
  missing = [name for name in REQUIRED if name not in found]
  assert not missing, f'examples without a main(argv): {missing}'


@pytest.mark.parametrize('name', discover())
def test_example_runs(name, tmp_path_factory):
  _, out, _ = run_example(name, tmp_path_factory)
  assert out.strip(), f'{name} printed no result'
  assert 'nan' not in out.lower().split(), f'{name} printed a NaN:\n{out}'


def test_plain_jax_diagnostics_follow_the_rho_schedule(tmp_path_factory):
  """rho warms up from 0: the first step is plain SGD, later ones are not."""
  results, _, _ = run_example('plain_jax.py', tmp_path_factory)
  by_method = {r['method']: r for r in results}
  assert set(by_method) == {'sgd', 'sam', 'asam'}
  for method in ('sam', 'asam'):
    h = by_method[method]['history']
    steps = len(h['loss'])
    for name in ('perturbed_loss', 'grad_norm', 'cosine'):
      assert h[name].shape == (steps,), (method, name)
      assert np.all(np.isfinite(h[name])), (method, name)
    # Step 0 has rho = 0: the perturbed point is w itself.
    np.testing.assert_allclose(h['perturbed_loss'][0], h['loss'][0], rtol=1e-6)
    np.testing.assert_allclose(h['cosine'][0], 1.0, rtol=1e-6)
    # Once rho > 0 the loss at w + eps is above L(w) (first-order ascent).
    assert np.mean(h['perturbed_loss'][1:] > h['loss'][1:]) > 0.9, method
    assert np.all(h['cosine'][1:] < 1.0) and np.all(h['cosine'] > 0.0)
    assert np.all(h['grad_norm'] > 0.0)
  for r in results:
    for key in ('test_acc', 'train_loss', 'sharpness'):
      assert math.isfinite(r[key]), (r['label'], key)


def test_plain_jax_writes_its_plot(tmp_path_factory):
  _, _, folder = run_example('plain_jax.py', tmp_path_factory)
  png = folder / 'plain_jax.png'
  assert png.exists() and png.stat().st_size > 1000


def test_flax_nnx_trains(tmp_path_factory):
  result, _, _ = run_example('flax_nnx.py', tmp_path_factory)
  assert result['steps'] > 0
  assert result['last_loss'] < result['first_loss']
  assert result['perturbed_minus_clean'] > 0  # L(w + eps) > L(w)


def test_flax_linen_keeps_clean_statistics(tmp_path_factory):
  # main() itself asserts that the stored statistics are the clean pass's.
  result, _, _ = run_example('flax_linen_batchnorm.py', tmp_path_factory)
  assert len(result['stats_gap']) == 2
  assert all(gap > 0 for gap in result['stats_gap'])
  assert math.isfinite(result['test_loss'])
