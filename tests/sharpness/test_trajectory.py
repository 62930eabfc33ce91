"""loss_interpolation and trajectory_pca against hand loops and numpy's SVD."""

from __future__ import annotations

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import sharpness

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 3)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(16, 2)), jnp.float32)
W0 = {'w': jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32),
      'b': jnp.zeros(2, jnp.float32)}


def loss_fn(params, x, y):
  return jnp.mean((jnp.tanh(x @ params['w']) + params['b'] - y) ** 2)


def sgd_run(steps=12, lr=0.3):
  run, w = [W0], W0
  for _ in range(steps):
    g = jax.grad(loss_fn)(w, X, Y)
    w = jax.tree.map(lambda p, d: p - lr * d, w, g)
    run.append(w)
  return run


def test_interpolation_matches_a_hand_loop():
  a, b = W0, jax.tree.map(lambda p: p + 1.0, W0)
  ts = [-1.0, -0.25, 0.0, 0.3, 1.0, 1.75]
  out = jax.jit(lambda a, b: sharpness.loss_interpolation(
      loss_fn, a, b, ts=ts, loss_kwargs={'x': X, 'y': Y}))(a, b)
  expected = []
  for t in ts:  # numpy float64, by hand
    w = (1 - t) * np.asarray(a['w'], np.float64) + t * np.asarray(b['w'])
    bias = (1 - t) * np.asarray(a['b'], np.float64) + t * np.asarray(b['b'])
    pred = np.tanh(np.asarray(X, np.float64) @ w) + bias
    expected.append(np.mean((pred - np.asarray(Y, np.float64)) ** 2))
  np.testing.assert_allclose(out.ts, ts, rtol=1e-6)
  np.testing.assert_allclose(out.losses, expected, rtol=1e-5)
  default = sharpness.loss_interpolation(loss_fn, a, b,
                                         loss_kwargs={'x': X, 'y': Y})
  assert default.ts.shape == (41,) and float(default.ts[10]) == 0.0
  np.testing.assert_allclose(default.losses[10], loss_fn(a, X, Y), rtol=1e-6)
  np.testing.assert_allclose(default.losses[30], loss_fn(b, X, Y), rtol=1e-6)


def test_interpolation_errors():
  kw = {'x': X, 'y': Y}
  with pytest.raises(ValueError, match=r'loss_interpolation: params_b'):
    sharpness.loss_interpolation(loss_fn, W0, {'w': W0['w']}, loss_kwargs=kw)
  with pytest.raises(ValueError, match=r'ts must be a non-empty 1-D'):
    sharpness.loss_interpolation(loss_fn, W0, W0, ts=[[0.0]], loss_kwargs=kw)
  with pytest.raises(ValueError, match=r'ts must be finite'):
    sharpness.loss_interpolation(loss_fn, W0, W0, ts=[0.0, np.inf],
                                 loss_kwargs=kw)
  with pytest.raises(TypeError, match=r'ts must be a 1-D array'):
    sharpness.loss_interpolation(loss_fn, W0, W0, ts=0.5, loss_kwargs=kw)


def numpy_pca(run, center):
  flat = np.stack([np.asarray(flatten_util.ravel_pytree(w)[0], np.float64)
                   for w in run])
  diffs = flat - flat[-1]
  data = diffs[:-1] - diffs[:-1].mean(0) if center else diffs[:-1]
  _, s, vt = np.linalg.svd(data, full_matrices=False)
  return diffs, vt[:2], s ** 2 / np.sum(s ** 2)


@pytest.mark.parametrize('center', [False, True])
def test_trajectory_pca_matches_numpy_svd(center):
  run = sgd_run()
  out = jax.jit(lambda run: sharpness.trajectory_pca(
      loss_fn, run, num_points=4, center=center,
      loss_kwargs={'x': X, 'y': Y}))(run)
  diffs, vt, ratio = numpy_pca(run, center)
  d = np.stack([flatten_util.ravel_pytree(x)[0] for x in out.directions])
  # Same directions up to sign; the sign convention holds.
  np.testing.assert_allclose(np.abs(d @ vt.T), np.eye(2), atol=2e-4)
  assert np.all(d @ diffs[0] >= 0)
  np.testing.assert_allclose(out.explained_variance, ratio[:2], atol=1e-4)
  np.testing.assert_allclose(out.path, diffs @ d.T, atol=1e-4)
  np.testing.assert_allclose(out.path[-1], 0.0, atol=1e-6)
  # The landscape is the loss at w_T + alpha d1 + beta d2, by hand.
  final, unravel = flatten_util.ravel_pytree(run[-1])
  grid = out.landscape
  for i, beta in enumerate(np.asarray(grid.betas)):
    for j, alpha in enumerate(np.asarray(grid.alphas)):
      w = unravel(final + alpha * d[0] + beta * d[1])
      np.testing.assert_allclose(grid.losses[i, j], loss_fn(w, X, Y),
                                 rtol=1e-4)
  # The grid spans the path.
  assert grid.alphas[0] < out.path[:, 0].min() < out.path[:, 0].max() < (
      grid.alphas[-1])


def test_trajectory_pca_nan_and_errors():
  run = sgd_run(steps=3)
  nan_loss = lambda p, x, y: loss_fn(p, x, y) * jnp.nan
  out = sharpness.trajectory_pca(nan_loss, run, num_points=2,
                                 loss_kwargs={'x': X, 'y': Y})
  assert np.all(np.isnan(out.landscape.losses))
  assert np.all(np.isfinite(out.path))
  with pytest.raises(ValueError, match=r'trajectory_pca: checkpoints must'
                     r' hold at least 3'):
    sharpness.trajectory_pca(loss_fn, run[:2], loss_kwargs={'x': X, 'y': Y})
  with pytest.raises(TypeError, match=r'list\(checkpoints\)'):
    sharpness.trajectory_pca(loss_fn, iter(run), loss_kwargs={'x': X, 'y': Y})
  with pytest.raises(ValueError, match=r'checkpoints\[1\]'):
    sharpness.trajectory_pca(loss_fn, [run[0], {'w': W0['w']}, run[-1]],
                             loss_kwargs={'x': X, 'y': Y})


def test_plot_trajectory_writes_png(tmp_path):
  run = sgd_run(steps=4)
  out = sharpness.trajectory_pca(loss_fn, run, num_points=5,
                                 loss_kwargs={'x': X, 'y': Y})
  path = sharpness.plot_trajectory({'sgd': out, 'again': out},
                                   tmp_path / 'path.png', title='run',
                                   log_scale=True)
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(TypeError, match=r'TrajectoryPCA'):
    sharpness.plot_trajectory(out.landscape, tmp_path / 'bad.png')
