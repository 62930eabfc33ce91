"""Loss landscapes and the PNG plotting helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import sharpness


def mlp_loss(params, x, y):
  h = jnp.tanh(x @ params['dense']['kernel'] + params['dense']['bias'])
  return jnp.mean((h @ params['out']['kernel'] - y) ** 2)


_K = jax.random.split(jax.random.key(0), 5)
PARAMS = {
    'dense': {'kernel': jax.random.normal(_K[0], (3, 5)),
              'bias': jax.random.normal(_K[1], (5,))},
    'out': {'kernel': jax.random.normal(_K[2], (5, 2))},
}
BATCH = {'x': jax.random.normal(_K[3], (16, 3)),
         'y': jax.random.normal(_K[4], (16, 2))}
SECOND = jax.tree.map(lambda v: -0.5 * v, BATCH)
CENTRE = float(mlp_loss(PARAMS, **BATCH))


def test_filter_normalization():
  d = sharpness.filter_normalized_direction(PARAMS, jax.random.key(1))
  for name in ('dense', 'out'):
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(d[name]['kernel']), axis=0),
        np.linalg.norm(np.asarray(PARAMS[name]['kernel']), axis=0),
        rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(d['dense']['bias']), 0.0)
  kept = sharpness.filter_normalized_direction(PARAMS, jax.random.key(1),
                                               ignore_1d=False)
  np.testing.assert_array_equal(np.asarray(kept['dense']['bias']),
                                np.asarray(PARAMS['dense']['bias']))
  rows = sharpness.filter_normalized_direction(PARAMS, jax.random.key(1),
                                               filter_axis=0)
  np.testing.assert_allclose(
      np.linalg.norm(np.asarray(rows['out']['kernel']), axis=1),
      np.linalg.norm(np.asarray(PARAMS['out']['kernel']), axis=1), rtol=1e-5)
  # A zero filter stays zero (no NaN).
  zero = {'k': jnp.zeros((2, 3))}
  out = sharpness.filter_normalized_direction(zero)
  np.testing.assert_array_equal(np.asarray(out['k']), 0.0)


def test_1d_random_direction_centre_and_values():
  out = sharpness.loss_landscape_1d(mlp_loss, PARAMS, num_points=11,
                                    key=jax.random.key(2), loss_kwargs=BATCH)
  alphas = np.asarray(out.alphas)
  assert alphas.shape == (11,) and alphas[5] == 0.0
  assert float(out.losses[5]) == pytest.approx(CENTRE, rel=1e-6)
  # Independent check of one off-centre point with the same direction.
  d = sharpness.filter_normalized_direction(PARAMS, jax.random.key(2))
  shifted = jax.tree.map(lambda p, v: p + alphas[0] * v, PARAMS, d)
  assert float(out.losses[0]) == pytest.approx(
      float(mlp_loss(shifted, **BATCH)), rel=1e-5)


def test_1d_interpolation_between_parameter_sets():
  other = jax.tree.map(lambda p: 0.5 * p + 0.1, PARAMS)
  out = sharpness.loss_landscape_1d(mlp_loss, PARAMS, endpoint=other,
                                    num_points=9, loss_kwargs=BATCH)
  alphas = np.asarray(out.alphas)
  np.testing.assert_allclose(alphas[[0, -1]], [-0.5, 1.5])
  i0, i1 = int(np.flatnonzero(alphas == 0.0)[0]), int(
      np.flatnonzero(alphas == 1.0)[0])
  assert float(out.losses[i0]) == pytest.approx(CENTRE, rel=1e-6)
  assert float(out.losses[i1]) == pytest.approx(
      float(mlp_loss(other, **BATCH)), rel=1e-5)


def test_2d_closed_form_with_given_directions():
  loss_fn = lambda w: w[0] ** 2 + 3 * w[1] ** 2 + w[0] * w[1]
  e0, e1 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
  out = sharpness.loss_landscape_2d(
      loss_fn, jnp.zeros(2), directions=(e0, e1), num_points=(5, 3),
      span=((-2.0, 2.0), (-1.0, 1.0)))
  a, b = np.meshgrid(np.asarray(out.alphas), np.asarray(out.betas))
  assert out.losses.shape == (3, 5)
  np.testing.assert_allclose(np.asarray(out.losses), a ** 2 + 3 * b ** 2 + a * b,
                             atol=1e-6)


def test_2d_random_centre_and_batches_average():
  out = sharpness.loss_landscape_2d(mlp_loss, PARAMS, num_points=5,
                                    key=jax.random.key(4),
                                    batches=[BATCH, SECOND])
  one = sharpness.loss_landscape_2d(mlp_loss, PARAMS, num_points=5,
                                    key=jax.random.key(4), loss_kwargs=BATCH)
  two = sharpness.loss_landscape_2d(mlp_loss, PARAMS, num_points=5,
                                    key=jax.random.key(4), loss_kwargs=SECOND)
  np.testing.assert_allclose(np.asarray(out.losses),
                             (np.asarray(one.losses) + np.asarray(two.losses))
                             / 2, rtol=1e-5)
  assert float(one.losses[2, 2]) == pytest.approx(CENTRE, rel=1e-6)
  assert float(out.losses[2, 2]) == pytest.approx(
      (CENTRE + float(mlp_loss(PARAMS, **SECOND))) / 2, rel=1e-6)


def test_plots_write_png(tmp_path):
  one = sharpness.loss_landscape_1d(lambda w: jnp.sum(w ** 2), jnp.ones(3),
                                    num_points=5, ignore_1d=False)
  two = sharpness.loss_landscape_2d(lambda w: jnp.sum(w ** 2), jnp.ones(3),
                                    num_points=4, ignore_1d=False)
  density = sharpness.hessian_spectral_density(
      lambda w: jnp.sum(jnp.arange(3.0) * w ** 2), jnp.ones(3),
      num_lanczos=3, grid_size=20)
  paths = [
      sharpness.plot_loss_landscape(one, tmp_path / 'a.png', title='1d'),
      sharpness.plot_loss_landscape({'x': two, 'y': two}, tmp_path / 'b.png',
                                    log_scale=True),
      sharpness.plot_spectral_density({'run': density}, tmp_path / 'c.png'),
  ]
  for path in paths:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(TypeError, match='Landscape1D or Landscape2D'):
    sharpness.plot_loss_landscape([one], tmp_path / 'd.png')


def test_landscape_errors():
  with pytest.raises(ValueError, match='either direction= or endpoint='):
    sharpness.loss_landscape_1d(mlp_loss, PARAMS, direction=PARAMS,
                                endpoint=PARAMS, loss_kwargs=BATCH)
  with pytest.raises(ValueError, match='structure of params'):
    sharpness.loss_landscape_1d(mlp_loss, PARAMS, endpoint={'a': 1.0},
                                loss_kwargs=BATCH)
  with pytest.raises(ValueError, match='num_points must be an int >= 2'):
    sharpness.loss_landscape_1d(mlp_loss, PARAMS, num_points=1,
                                loss_kwargs=BATCH)
  with pytest.raises(ValueError, match='low < high'):
    sharpness.loss_landscape_2d(mlp_loss, PARAMS, span=(1.0, -1.0),
                                loss_kwargs=BATCH)
  with pytest.raises(ValueError, match='batches is empty'):
    sharpness.loss_landscape_2d(mlp_loss, PARAMS, batches=[])


def test_complex_directions_are_refused():
  # Complex params: the sharpness battery's bad_complex_params rows.
  w = {'k': jnp.ones((2, 2), jnp.complex64)}
  loss_fn = lambda p: jnp.sum(jnp.abs(p['k']) ** 2)
  real = {'k': jnp.ones((2, 2))}
  with pytest.raises(TypeError, match=r'direction.*complex'):
    sharpness.loss_landscape_1d(loss_fn, real, direction=w, num_points=3)


def test_only_1d_params_with_ignore_1d_is_an_error_not_a_flat_landscape():
  params = {'bias': jnp.asarray([1.0, -2.0]), 'scale': jnp.float32(2.0)}
  loss_fn = lambda p: jnp.sum(p['bias'] ** 2) + p['scale'] ** 2
  for helper in (sharpness.loss_landscape_1d, sharpness.loss_landscape_2d):
    with pytest.raises(ValueError, match=helper.__name__ +
                       r':(.|\n)*every direction was zeroed(.|\n)*'
                       r'ignore_1d=False'):
      helper(loss_fn, params, num_points=3)
  # ignore_1d=False: d = w there, so L(w + a d) = (1 + a)^2 L(w) = 9 (1 + a)^2.
  out = sharpness.loss_landscape_1d(loss_fn, params, num_points=3,
                                    ignore_1d=False)
  np.testing.assert_allclose(out.losses, 9.0 * (1 + out.alphas) ** 2,
                             rtol=1e-6)
