"""The study's runner: its arithmetic by hand, and a quick run of every task."""

from __future__ import annotations

import importlib
import math
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / 'benchmarks'


@pytest.fixture(scope='module')
def bench_tasks():
  sys.path.insert(0, str(BENCHMARKS))
  yield importlib.import_module('bench_tasks')
  sys.path.remove(str(BENCHMARKS))


def test_gain_kept_by_hand(bench_tasks):
  # Accuracy: base mean 71, SAM mean 81, a gain of 10 points.
  kept = bench_tasks.gain_kept([76.0, 81.0], 71.0, 81.0)
  assert kept == pytest.approx([50.0, 100.0])
  mean, std = bench_tasks.mean_std(kept)
  assert mean == pytest.approx(75.0)
  assert std == pytest.approx(50 / math.sqrt(2))  # stdev of (50, 100)
  # A loss: lower is better, SAM's gain is -0.2 and the signs cancel.
  assert bench_tasks.gain_kept([2.0, 1.95], 2.1, 1.9) == pytest.approx(
      [50.0, 75.0])
  # SAM gained nothing: no ratio to a zero gain.
  assert all(math.isnan(k) for k in bench_tasks.gain_kept([1.0], 2.0, 2.0))


def test_a_diverged_seed_is_not_averaged_away(bench_tasks):
  mean, std = bench_tasks.mean_std([80.0, math.nan])
  assert math.isnan(mean) and math.isnan(std)
  main = {
      'base': {'metric': [70.0, 72.0], 'ratio': [1.0, 1.0, 1.0],
               'seconds': [0.01, 0.01, 0.01], 'gradients': 1},
      'SAM': {'metric': [80.0, 82.0], 'ratio': [1.9, 2.1, 2.0],
              'seconds': [0.02, 0.02, 0.02], 'gradients': 2},
      'v': {'metric': [76.0, math.nan], 'ratio': [1.2, 1.5, 1.3],
            'seconds': [0.012, 0.015, 0.013], 'gradients': 1.5,
            'sam_steps': [0.25, 0.75]},
  }
  rows = bench_tasks.summarize_main(main, higher_is_better=True)
  assert rows['v']['diverged'] == 1 and math.isnan(rows['v']['mean'])
  assert math.isnan(rows['v']['kept'])
  assert rows['v']['x_base'] == pytest.approx(1.3)  # median of the ratios
  assert rows['v']['ms'] == pytest.approx(13.0)
  assert rows['v']['sam_share'] == pytest.approx(0.5)
  assert rows['SAM']['kept'] == pytest.approx(100.0)
  assert rows['SAM']['improves']
  assert 'diverged on 1 of 2 seeds' in bench_tasks.main_table(rows)


def test_best_rho_by_hand(bench_tasks):
  runs = {0.05: [80.0, 82.0], 0.1: [83.0, 80.0], 0.2: [math.nan, 90.0]}
  assert bench_tasks.best_rho(runs, higher_is_better=True) == 0.1
  losses = {0.05: [1.0, 1.2], 0.1: [1.05, 1.1], 0.2: [1.3, 1.2]}
  assert bench_tasks.best_rho(losses, higher_is_better=False) == 0.1
  with pytest.raises(RuntimeError, match='every rho'):
    bench_tasks.best_rho({0.1: [math.nan]}, higher_is_better=True)


def test_moonshot_mark(bench_tasks):
  ok = {'kept': 95.0, 'x_base': 1.2}
  assert bench_tasks.moonshot_ok([ok] * 4)
  assert not bench_tasks.moonshot_ok([ok] * 3 + [{'kept': 89.0,
                                                  'x_base': 1.1}])
  assert not bench_tasks.moonshot_ok([ok] * 3 + [{'kept': 120.0,
                                                  'x_base': 1.3}])
  assert not bench_tasks.moonshot_ok([ok] * 3 + [None])


def test_configurations_drop_duplicates(bench_tasks):
  names = [c.name for c in bench_tasks.configs(0.05, has_norm=False)]
  # At SAM's default 0.05 only MSAM's default (0.3) differs from SAM's best
  # rho in the variant's convention (x20 = 1); ASAM's 0.5 is 0.05 in its.
  variants = list(bench_tasks.VARIANTS) + ['decoupled_wsam']
  expected = ['base', 'SAM', *variants[:12], 'msam rho=1', *variants[12:]]
  assert names[:len(expected)] == expected
  names = [c.name for c in bench_tasks.configs(0.1, has_norm=True)]
  assert 'asam rho=1' in names and 'msam rho=2' in names
  assert 'sam rho=0.1' not in names and 'SAM-ON' in names
  assert len(set(names)) == len(names)
  assert sum(n.endswith(' rho=0.1') for n in names) == 11


def test_the_defaults_revision_rows_are_the_other_values(bench_tasks):
  # One row per value that is not the current default (that value is the
  # variant's own row), the knob given to the factory, rho its default.
  rows = {c.name: c for c in bench_tasks.revision_configs()}
  for name, (knob, values) in bench_tasks.REVISION.items():
    default = bench_tasks.default_value(name, knob)
    assert default in values, (name, knob)
    for value in values:
      label = f'{name} {knob}={value:g}'
      assert (label in rows) == (value != default), label
  row = rows['wsam gamma=0.9']
  assert row.hparams == {'rho': 0.05, 'gamma': 0.9}
  assert rows['esam gamma=0.5'].gradients == 1.5
  # A static knob is bound in the builder: one compiled family per value.
  assert rows['esam gamma=0.5'].family != rows['esam gamma=0.8'].family


def test_chunks_cover_the_steps(bench_tasks):
  assert bench_tasks.chunk_lengths(20) == [2] * 10
  assert bench_tasks.chunk_lengths(1400) == [140] * 10
  prime = bench_tasks.chunk_lengths(101)
  assert sum(prime) == 101 and prime[-1] < prime[0]


@pytest.mark.slow
# One test per task, so that xdist spreads the four quick runs.
@pytest.mark.parametrize('task_name', ['noisy-cnn', 'clean-lowdata',
                                       'vit-digits', 'char-lm'])
def test_quick_run_of_every_task(bench_tasks, capsys, task_name):
  assert task_name in bench_tasks.TASKS
  results_dir = BENCHMARKS / 'results'
  before = {p: p.read_bytes() for p in results_dir.glob('tasks*')}
  results = bench_tasks.main(['--quick', '--no-progress', '--tasks',
                              task_name])
  after = {p: p.read_bytes() for p in results_dir.glob('tasks*')}
  assert before == after, '--quick must not write results'
  printed = capsys.readouterr().out
  assert list(results) == [task_name]
  for name, r in results.items():
    task = bench_tasks.load_task(name)
    assert f'## {task.name}' in printed
    assert r['best_rho'] in task.rho_grid
    assert set(r['lr']) == {f'{lr:g}' for lr in task.lr_grid}
    expected = [c.name for c in bench_tasks.configs(
        r['best_rho'], has_norm='SAM-ON' in r['main'])]
    assert list(r['main']) == expected
    for config, run in r['main'].items():
      assert f'| {config} |' in printed
      assert all(math.isfinite(v) for v in run['metric']), (name, config)
      assert run['ratio'], (name, config)
  if task_name in ('vit-digits', 'char-lm'):  # LayerNorm: SAM-ON runs
    assert 'SAM-ON' in results[task_name]['main']
