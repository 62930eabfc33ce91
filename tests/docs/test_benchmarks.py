"""Every benchmark script runs (in --quick mode), so none of them rots.

Only that they run and that their side-by-side checks hold is tested here;
speed itself is measured by the scripts, into benchmarks/RESULTS.md.
"""

import importlib
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / 'benchmarks'
# bench_tasks (the study, hours at full size, outside run_all) has its own
# tests, quick run included: test_bench_tasks.py.
SCRIPTS = sorted(
    p.stem for p in BENCHMARKS.glob('*.py')
    if not p.stem.startswith('_') and p.stem not in ('run_all', 'bench_tasks')
)


@pytest.fixture(scope='module', autouse=True)
def benchmarks_on_path():
  sys.path.insert(0, str(BENCHMARKS))
  yield
  sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize('name', SCRIPTS)
@pytest.mark.slow
def test_benchmark_runs_quick(name, tmp_path, monkeypatch):
  results = BENCHMARKS / 'results'
  before = {p: p.read_bytes() for p in results.glob('*.md')}
  module = importlib.import_module(name)
  module.main(['--quick'])
  after = {p: p.read_bytes() for p in results.glob('*.md')}
  assert before == after, f'{name} --quick must not overwrite results'


def test_run_all_knows_every_benchmark():
  run_all = importlib.import_module('run_all')
  assert set(run_all.BENCHMARKS.values()) == {f'{s}.py' for s in SCRIPTS}


def test_scale_hlo_counts_see_the_ops():
  """bench_scale's HLO parsing finds fusions, reductions and selects.

  A change in XLA's text format would otherwise turn its op counts into
  silent zeros.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  bench_scale = importlib.import_module('bench_scale')
  params = {'w': jnp.ones((64, 64))}

  def step(params, x):
    y = jnp.where(x > 0, params['w'] * x, 0.0)
    return {'w': params['w'] - y}, jnp.sum(y * y)

  compiled = jax.jit(step).lower(params, jnp.ones((64, 64))).compile()
  counts = bench_scale.hlo_counts(compiled, params)
  assert counts['fusions'] >= 1
  assert counts['reduce'] + counts['reduce-window'] >= 1
  assert counts['select'] >= 1
  assert counts['weight passes'] >= 1 and counts['weight leaves'] == 1
  assert sum(bench_scale.kernel_census(compiled).values()) >= 1
