"""The Auto-PGD engine alone (sharpness/apgd.py), on concave functions."""

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src.sharpness import apgd

CENTRE = {'a': jnp.asarray([3.0, -4.0]), 'b': jnp.asarray([0.0])}  # |c| = 5


def value_and_grad(x):
  f = lambda x: -sum(jnp.sum((x[k] - CENTRE[k]) ** 2) for k in x)
  return jax.value_and_grad(f)(x)


def test_l2_ball_maximum_is_the_projection_of_the_centre():
  rho = jnp.float32(1.0)
  zeros = jax.tree.map(jnp.zeros_like, CENTRE)
  best, best_f, nan_seen = jax.jit(lambda s: apgd.ascend(
      value_and_grad, s, apgd.Ball('l2', rho), 2 * rho, jnp.float32(0.75),
      20))(zeros)
  # By hand: the closest point of the unit ball to c is c / |c|.
  np.testing.assert_allclose(best['a'], [0.6, -0.8], atol=1e-4)
  np.testing.assert_allclose(best_f, -(5.0 - 1.0) ** 2, rtol=1e-5)
  assert not bool(nan_seen)


def test_linf_ball_maximum_is_the_clipped_centre():
  rho = jnp.float32(0.5)
  zeros = jax.tree.map(jnp.zeros_like, CENTRE)
  best, best_f, _ = apgd.ascend(value_and_grad, zeros, apgd.Ball('linf', rho),
                                2 * rho, jnp.float32(0.75), 10)
  np.testing.assert_allclose(best['a'], [0.5, -0.5], atol=1e-6)
  np.testing.assert_allclose(best_f, -(2.5 ** 2 + 3.5 ** 2), rtol=1e-6)
