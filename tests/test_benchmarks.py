"""Every benchmark script runs (in --quick mode), so none of them rots.

Only that they run and that their side-by-side checks hold is tested here;
speed itself is measured by the scripts, into benchmarks/RESULTS.md.
"""

import importlib
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'
SCRIPTS = sorted(
    p.stem for p in BENCHMARKS.glob('*.py')
    if not p.stem.startswith('_') and p.stem != 'run_all'
)


@pytest.fixture(scope='module', autouse=True)
def benchmarks_on_path():
  sys.path.insert(0, str(BENCHMARKS))
  yield
  sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize('name', SCRIPTS)
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
