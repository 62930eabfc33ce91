"""A helper called directly reuses its compiled program (sharpness/compiled.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import sharpness

TRACES = []


def loss_fn(params, x, y):
  TRACES.append(1)  # a Python side effect: runs once per trace
  return 0.5 * jnp.mean((jnp.tanh(x @ params['w']) @ params['v'] - y) ** 2)


KEYS = jax.random.split(jax.random.key(0), 4)
PARAMS = {'w': jax.random.normal(KEYS[0], (3, 4)),
          'v': jax.random.normal(KEYS[1], (4,))}
X = jax.random.normal(KEYS[2], (8, 3))
Y = jax.random.normal(KEYS[3], (8,))


@pytest.mark.parametrize('call', [
    lambda y: sharpness.hessian_top_eigenvalue(
        loss_fn, PARAMS, num_iterations=5, loss_kwargs={'x': X, 'y': y}),
    lambda y: sharpness.sam_sharpness(
        loss_fn, PARAMS, rho=0.1, loss_kwargs={'x': X, 'y': y}),
    lambda y: sharpness.hessian_trace(
        loss_fn, PARAMS, num_samples=4, per_leaf=True,
        batches=iter([{'x': X, 'y': y}, {'x': X, 'y': -y}])),
])
def test_a_second_direct_call_does_not_retrace(call):
  jax.block_until_ready(call(Y))
  before = len(TRACES)
  jax.block_until_ready(call(2.0 * Y))  # new values, same shapes
  assert len(TRACES) == before


def test_direct_call_equals_the_jitted_call():
  kw = {'x': X, 'y': Y}
  direct = sharpness.hessian_eigenvalues(loss_fn, PARAMS, k=2, loss_kwargs=kw)
  jitted = jax.jit(lambda p, kw: sharpness.hessian_eigenvalues(
      loss_fn, p, k=2, loss_kwargs=kw))(PARAMS, kw)
  np.testing.assert_allclose(direct.eigenvalues, jitted.eigenvalues,
                             rtol=1e-5, atol=1e-6)


def test_options_are_static_and_still_checked():
  kw = {'x': X, 'y': Y}
  one = sharpness.first_order_sharpness(loss_fn, PARAMS, rho=0.1,
                                        loss_kwargs=kw)
  two = sharpness.first_order_sharpness(loss_fn, PARAMS, rho=jnp.float32(0.2),
                                        loss_kwargs=kw)
  np.testing.assert_allclose(two, 2 * one, rtol=1e-6)  # rho |g|, rho static
  with pytest.raises(ValueError, match='rho must be a finite number > 0'):
    sharpness.first_order_sharpness(loss_fn, PARAMS, rho=jnp.float32(-1.0),
                                    loss_kwargs=kw)
  with pytest.raises(TypeError, match='per_leaf must be True or False'):
    sharpness.hessian_trace(loss_fn, PARAMS, per_leaf=1, loss_kwargs=kw)
