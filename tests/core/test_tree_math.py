"""Norms and dot products that do not overflow float32 while the result fits.

Gradient entries around 2e20 square to 4e40, past float32's 3.4e38: a plain
sum of squares reads inf, the perturbation rho g / ||g|| becomes 0 and SAM
silently hands on the clean gradient. The reference is the scaling law of
the methods: the ascent direction does not change when the loss is scaled
by s, so every handed-on gradient scales by exactly s.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax._src.core import tree_math
from variants import VARIANTS

SCALE = 1e20
PARAMS = {'w': jnp.asarray([0.3, -2.0, 1.5]), 'b': jnp.float32(0.5)}
C = jnp.asarray([1.0, 2.0, -1.0])


X = jnp.asarray([0.5, 1.0, 1.5, 2.0])  # four examples' weights


def loss_fn(params, scale, x):
  w, b = params['w'], params['b']
  each = x * (0.5 * jnp.sum(w ** 2) + jnp.sum(C * w)) + b ** 2 * w[0]
  return scale * jnp.mean(each)


# ae_sam's statistics are of ||g||^2 itself (its paper's rule), which does
# not fit float32 here: its steps are skipped as non-finite, not wrong.
CASES = [v for v in VARIANTS if v.name != 'ae_sam']


@pytest.mark.parametrize('variant', CASES, ids=[v.name for v in CASES])
def test_a_loss_scaled_by_1e20_scales_the_update(variant):
  tx = variant.make(loss_fn, rho=0.1)

  @jax.jit
  def step(scale):
    grads = jax.grad(loss_fn)(PARAMS, scale, X)
    return tx.update(grads, tx.init(PARAMS), PARAMS, scale=scale, x=X)

  small, small_state = step(1.0)
  big, big_state = step(SCALE)
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x / SCALE, big), small, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(big_state.grad_norm / SCALE,
                             small_state.grad_norm, rtol=1e-5)
  np.testing.assert_allclose(big_state.cosine, small_state.cosine,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('scale', [1e-30, 1e-20, 1.0, 1e20, 1e37])
def test_tree_norm_vdot_and_cosine_against_float64(scale):
  a = {'x': np.array([3.0, -4.0]) * scale, 'y': np.array([[12.0]]) * scale}
  b = {'x': np.array([1.0, 2.0]) * scale, 'y': np.array([[-0.5]]) * scale}
  f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  flat_a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
  flat_b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
  np.testing.assert_allclose(tree_math.tree_norm(f32(a)),
                             np.linalg.norm(flat_a), rtol=1e-6)
  np.testing.assert_allclose(
      tree_math.safe_cosine(f32(a), f32(b)),
      flat_a @ flat_b / np.linalg.norm(flat_a) / np.linalg.norm(flat_b),
      rtol=1e-6)
  dot = flat_a @ flat_b
  if 1e-30 < abs(dot) < 3e38:  # the dot itself fits float32
    np.testing.assert_allclose(tree_math.tree_vdot(f32(a), f32(b)), dot,
                               rtol=1e-6)


def test_tree_norm_edge_values_and_derivatives():
  assert float(tree_math.tree_norm({'x': jnp.zeros(3)})) == 0.0
  assert np.isinf(tree_math.tree_norm({'x': jnp.asarray([1.0, jnp.inf])}))
  assert np.isnan(tree_math.tree_norm({'x': jnp.asarray([1.0, jnp.nan])}))
  grad = jax.grad(tree_math.tree_norm)
  chex.assert_trees_all_close(grad({'x': jnp.zeros(3)}), {'x': jnp.zeros(3)})
  for scale in (1.0, 1e20, 1e-25):  # d||x|| / dx = x / ||x||
    got = grad({'x': jnp.asarray([3.0, 4.0]) * scale})['x']
    np.testing.assert_allclose(got, [0.6, 0.8], rtol=1e-6)
  big = tree_math.tree_norm({'x': jnp.asarray([3e20, 4e20], jnp.bfloat16)})
  np.testing.assert_allclose(big, 5e20, rtol=1e-2)


def test_tree_norm_hessian_is_the_projection_formula():
  # d^2 ||x|| / dx^2 = (I - u u^T) / ||x||, u = x / ||x||: checked where the
  # plain sum of squares underflows (1e-20), fits, and overflows (1e20), with
  # a zero entry beside the others.
  for scale in (1e-20, 1.0, 1e20):
    x = np.array([3.0, 4.0, 0.0]) * scale
    norm = np.linalg.norm(x)
    u = x / norm
    want = (np.eye(3) - np.outer(u, u)) / norm
    got = jax.hessian(tree_math.tree_norm)({'x': jnp.asarray(x, jnp.float32)})
    np.testing.assert_allclose(got['x']['x'] * norm, want * norm, atol=1e-6)


def test_derivatives_where_entries_of_different_magnitudes_meet():
  # Entries of very different magnitudes in one vector: each entry's
  # derivative is its own, not flushed to zero by a scaling.
  x = np.array([2.0 ** -41, 2.0 ** -40])
  got = jax.grad(tree_math.tree_norm)({'x': jnp.asarray(x, jnp.float32)})
  np.testing.assert_allclose(got['x'], x / np.linalg.norm(x), rtol=1e-6)
  a, b = jnp.asarray([1e-13, 1.0]), jnp.asarray([3e-13, 2.0])
  got_a, got_b = jax.grad(tree_math.tree_vdot, argnums=(0, 1))(a, b)
  np.testing.assert_allclose(got_a, b, rtol=1e-6)
  np.testing.assert_allclose(got_b, a, rtol=1e-6)
  np.testing.assert_allclose(tree_math.tree_vdot(a, b), 2.0 + 3e-26,
                             rtol=1e-6)
