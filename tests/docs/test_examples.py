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

# An artifact test: deselected by default, run by `-m slow` (and CI).
pytestmark = pytest.mark.slow

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / 'examples'

# Tiny flags per example; files not listed get ['--quick'].
TINY_FLAGS = {
    'plain_jax.py': ['--quick', '--no-progress', '--methods', 'sgd,sam,asam',
                     '--plot', 'plain_jax.png'],
    'flax_nnx.py': ['--quick', '--no-progress'],
    'flax_linen_batchnorm.py': ['--quick', '--no-progress'],
    'equinox_mlp.py': ['--quick', '--no-progress'],
    'demo.py': ['--quick', '--no-progress'],
    'msharpness.py': ['--quick', '--no-progress'],
}

# The examples this suite must always find (others are run when present).
REQUIRED = ('plain_jax.py', 'flax_nnx.py', 'flax_linen_batchnorm.py',
            'equinox_mlp.py', 'demo.py', 'msharpness.py')


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
  # main() itself checks, on the first and last step, that the stored
  # statistics are the clean pass's and that SAM's perturbed loss is
  # L(w + eps) under the same dropout mask.
  result, _, _ = run_example('flax_nnx.py', tmp_path_factory)
  assert result['steps'] > 0
  assert result['last_loss'] < result['first_loss']
  assert result['perturbed_minus_clean'] > 0  # L(w + eps) > L(w)
  assert len(result['stats_gap']) == 2
  assert all(gap > 0 for gap in result['stats_gap'])
  assert math.isfinite(result['test_loss'])


def test_flax_nnx_perturbed_pass_leaves_the_model_alone():
  """The adapted loss runs on a copy rebuilt from the snapshot.

  The model's statistics and dropout count stay as they were; the same
  snapshot gives the same mask (the same loss), a later one another mask.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import sam_optax.nnx  # pylint: disable=g-import-not-at-top

  module = load('flax_nnx.py')
  model = module.MLP(40, 32, 10, 0.5, rngs=nnx.Rngs(0, dropout=1))
  def arrays(model):
    state = nnx.state(model, nnx.Not(nnx.RngKey))  # the keys never change
    return [np.array(v) for v in jax.tree.leaves(state)]

  before = arrays(model)
  x = np.sin(np.arange(50 * 40, dtype=np.float32)).reshape(50, 40)
  y = np.arange(50, dtype=np.int32) % 10
  loss_fn = jax.jit(sam_optax.nnx.loss_fn(module.loss_fn))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  snapshot = sam_optax.nnx.snapshot(model)
  loss = loss_fn(params, snapshot=snapshot, x=x, y=y)
  for want, got in zip(before, arrays(model)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(loss_fn(params, snapshot=snapshot, x=x, y=y),
                             loss, rtol=1e-6)
  module.loss_fn(model, x, y)  # a clean pass advances the dropout count
  later = sam_optax.nnx.snapshot(model)
  assert abs(float(loss_fn(params, snapshot=later, x=x, y=y)) - float(loss)
             ) > 1e-6


def test_flax_nnx_chunks_keep_the_statistics_whole(tmp_path_factory):
  """layout=Chunks(25): x and y are split, the key and the statistics not."""
  module = load('flax_nnx.py')
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = module.main(['--quick', '--no-progress', '--chunks', '25'])
  assert result['chunks'] == 25 and result['steps'] > 0
  assert result['perturbed_minus_clean'] > 0
  assert all(gap > 0 for gap in result['stats_gap'])
  assert 'm=25' in out.getvalue()


def test_equinox_trains(tmp_path_factory):
  # main() itself checks SAM's first perturbed loss against one by hand.
  result, _, _ = run_example('equinox_mlp.py', tmp_path_factory)
  assert result['steps'] > 0
  assert result['last_loss'] < result['first_loss'] - 0.05
  assert result['perturbed_minus_clean'] > 0
  np.testing.assert_allclose(result['first_perturbed_loss'],
                             result['first_perturbed_loss_by_hand'],
                             rtol=1e-4)
  assert result['first_perturbed_loss'] > result['first_loss']
  assert result['train_acc'] > 0.15  # chance is 0.1


def test_msharpness_layouts():
  """Each m maps to the layout that perturbs once per m examples."""
  import sam_optax  # pylint: disable=g-import-not-at-top

  module = load('msharpness.py')
  axis = module.AXIS
  # A batch of 64 on 8 devices: 8 examples per device.
  layouts = {m: module.make_layout(m, 64, 8, 'vectorized')
             for m in (4, 8, 32, 64)}
  assert layouts[4] == sam_optax.PerDevice(
      axis, chunks=sam_optax.Chunks(4, mode='vectorized'))
  assert layouts[8] == sam_optax.PerDevice(axis)
  assert layouts[32] == sam_optax.PerDevice(
      axis, sync=True, groups=[[0, 1, 2, 3], [4, 5, 6, 7]])
  assert layouts[64] == sam_optax.PerDevice(axis, sync=True)
  for m in (3, 24, 48):
    with pytest.raises(ValueError):
      module.check_m(m, 64, 8)


def test_demo_times_every_optimizer_against_sgd(tmp_path_factory):
  rows, out, folder = run_example('demo.py', tmp_path_factory)
  by_name = {row['name']: row for row in rows}
  assert set(by_name) == {'sgd', 'sam', 'asam', 'xsam'}
  timed = len(by_name['sgd']['epoch_seconds'])
  assert timed == 2  # --quick: 3 epochs, the first untimed
  steps = 8  # 800 training examples, batch 100
  for row in rows:
    seconds = np.asarray(row['epoch_seconds'])
    assert len(seconds) == timed and np.all(seconds > 0)
    # The figures printed are the medians of what was measured.
    np.testing.assert_allclose(row['ms_per_step'],
                               1e3 * np.median(seconds) / steps)
    np.testing.assert_allclose(row['x_sgd'], np.median(
        seconds / np.asarray(by_name['sgd']['epoch_seconds'])))
    assert f'{row["ms_per_step"]:.2f}' in out and f'{row["x_sgd"]:.2f}' in out
  assert by_name['sgd']['x_sgd'] == 1.0
  assert 'x SGD' in out
  assert (folder / 'out' / 'demo_test_accuracy.png').stat().st_size > 1000


def test_demo_round_robin_order_and_warm_up():
  """Every round runs each optimizer once; round 0 is not timed."""
  module = load('demo.py')
  calls, now = [], [0.0]

  def clock():
    return now[0]

  def run_epoch(name, epoch):
    calls.append((epoch, name))
    now[0] += {'a': 1.0, 'b': 3.0, 'c': 2.0}[name] * (10 if epoch == 0 else 1)

  rounds = []
  seconds = module.round_robin('abc', 4, run_epoch,
                               before_round=rounds.append, clock=clock)
  assert rounds == [0, 1, 2, 3]
  assert [name for _, name in calls] == list('abcbcacabab' 'c')
  for epoch in range(4):  # each round: every optimizer once, in its epoch
    assert sorted(n for e, n in calls if e == epoch) == ['a', 'b', 'c']
  assert seconds == {'a': [1.0] * 3, 'b': [3.0] * 3, 'c': [2.0] * 3}
  summary = module.timing_summary(seconds, steps_per_epoch=10,
                                  reference='a')
  assert summary == {'a': (100.0, 1.0), 'b': (300.0, 3.0),
                     'c': (200.0, 2.0)}
  # Without the reference, or without a timed epoch, nothing is made up.
  assert module.timing_summary({'b': [3.0]}, 10) == {'b': (300.0, None)}
  assert module.timing_summary({'sgd': [], 'b': []}, 10) == {
      'sgd': (None, None), 'b': (None, None)}


def test_flax_linen_keeps_clean_statistics(tmp_path_factory):
  # main() itself asserts that the stored statistics are the clean pass's.
  result, _, _ = run_example('flax_linen_batchnorm.py', tmp_path_factory)
  assert len(result['stats_gap']) == 2
  assert all(gap > 0 for gap in result['stats_gap'])
  assert math.isfinite(result['test_loss'])
