"""The state survives a checkpoint round trip, and training continues exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import sam_optax

_rng = np.random.default_rng(0)
BATCHES = [
    {'x': jnp.asarray(_rng.normal(size=(8, 3)), jnp.float32),
     'y': jnp.asarray(_rng.normal(size=(8,)), jnp.float32)}
    for _ in range(6)
]


def loss_fn(params, batch):
  return jnp.mean((jnp.tanh(batch['x'] @ params['w']) + params['b']
                   - batch['y']) ** 2)


TX = optax.chain(
    sam_optax.sam(loss_fn, rho=optax.linear_schedule(0.0, 0.1, 4)),
    optax.adamw(1e-2))


@jax.jit
def step(params, state, batch):
  grads = jax.grad(loss_fn)(params, batch=batch)
  updates, state = TX.update(grads, state, params, batch=batch)
  return optax.apply_updates(params, updates), state


def train(params, state, batches):
  for batch in batches:
    params, state = step(params, state, batch)
  return params, state


def test_round_trip_and_bit_exact_continuation(tmp_path):
  params = {'w': jnp.full((3,), 0.5), 'b': jnp.zeros([])}
  state = TX.init(params)
  straight = train(params, state, BATCHES)

  params, state = train(params, state, BATCHES[:3])
  path = tmp_path / 'checkpoint.msgpack'
  path.write_bytes(serialization.to_bytes((params, state)))
  template = (jax.tree.map(jnp.zeros_like, params), TX.init(params))
  restored = serialization.from_bytes(template, path.read_bytes())
  assert jax.tree.structure(restored) == jax.tree.structure((params, state))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves((params, state))):
    assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
  assert int(restored[1][0].count) == 3  # the schedule resumes where it was

  resumed = train(*restored, BATCHES[3:])
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)
