"""Two quiet mistakes: a misspelled keyword, a forgotten PerDevice layout."""

import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax

X = jnp.arange(32.0).reshape(16, 2) / 10
Y = jnp.sin(X[:, 0])
PARAMS = {'w': jnp.asarray([0.5, -0.3])}


def loss_fn(params, x, y, dropout_key=None):
  del dropout_key
  return jnp.mean((x @ params['w'] - y) ** 2)


def test_a_keyword_the_loss_does_not_take_is_named_once():
  tx = sam_optax.sam(loss_fn, rho=0.05)
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  update = jax.jit(lambda g, s: tx.update(
      g, s, PARAMS, x=X, y=Y, dropout_rng=jax.random.key(0)))
  state = tx.init(PARAMS)
  with pytest.warns(sam_optax.IgnoredKeywordWarning,
                    match=r"\['dropout_rng'\].*accepts.*dropout_key"):
    update(grads, state)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    update(grads, state)  # compiled: not traced again, no second warning
    tx.update(grads, state, PARAMS, x=X, y=Y)  # every keyword is taken


def test_the_ignored_keyword_warning_can_be_silenced():
  tx = sam_optax.sam(loss_fn, rho=0.05)
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    warnings.filterwarnings('ignore', category=sam_optax.IgnoredKeywordWarning)
    tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y, for_another=1)


def _shard_map_step(tx, mesh):
  def step(params, x, y):
    local = jax.lax.pcast(params, 'batch', to='varying')
    grads = jax.grad(loss_fn)(local, x, y)
    return tx.update(grads, tx.init(params), params, x=x, y=y)[0]

  return jax.jit(jax.shard_map(step, mesh=mesh,
                               in_specs=(P(), P('batch'), P('batch')),
                               out_specs=P()))


def test_a_device_gradient_without_per_device_names_the_layout():
  mesh = jax.make_mesh((4,), ('batch',))
  params = jax.device_put(PARAMS, NamedSharding(mesh, P()))
  x, y = jax.device_put((X, Y), NamedSharding(mesh, P('batch')))
  forgot = sam_optax.sam(loss_fn, rho=0.05)  # no layout=PerDevice('batch')
  with pytest.raises(ValueError,
                     match=r"layout=sam_optax.PerDevice\('batch'\)"):
    _shard_map_step(forgot, mesh)(params, x, y)
  # With the layout it runs, and equals the mean of per-device SAM.
  fixed = sam_optax.sam(loss_fn, rho=0.05,
                        layout=sam_optax.PerDevice('batch'))
  out = _shard_map_step(fixed, mesh)(params, x, y)
  alone = sam_optax.sam(loss_fn, rho=0.05)
  want = jnp.mean(jnp.stack([
      alone.update(jax.grad(loss_fn)(PARAMS, X[i:i + 4], Y[i:i + 4]),
                   alone.init(PARAMS), PARAMS, x=X[i:i + 4],
                   y=Y[i:i + 4])[0]['w']
      for i in range(0, 16, 4)]), axis=0)
  assert jnp.allclose(out['w'], want, rtol=1e-5, atol=1e-7)
