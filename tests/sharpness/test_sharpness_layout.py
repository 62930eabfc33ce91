"""The sharpness helpers under ``layout=``: the global batch on 8 devices.

Inside `jax.shard_map` (and `jax.pmap`) with the batch sharded over the
axis, every helper with ``layout=PerDevice('d')`` must give the result of
the same helper on one device with the gathered batch; ``Chunks(m,
shared=True)`` must give the whole-batch result. The single-device call is
the reference: its own exactness is tested against dense matrices
elsewhere (tests/sharpness/test_hessian.py, tests/sharpness/test_sharpness.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sam_optax
from sam_optax import sharpness

MESH = jax.make_mesh((8,), ('d',))
PER_DEVICE = sam_optax.PerDevice('d')
rng = np.random.default_rng(0)
X = jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)
Y = jnp.asarray(rng.normal(size=(32, 2)), jnp.float32)
PARAMS = {
    'w1': jnp.asarray(rng.normal(size=(3, 4)) * 0.8, jnp.float32),
    'w2': jnp.asarray(rng.normal(size=(4, 2)) * 0.8, jnp.float32),
}


def apply_fn(params, x, **_):
  return jnp.tanh(x @ params['w1']) @ params['w2']


def output_loss(z, y, **_):
  return 0.5 * jnp.mean(jnp.sum((z - y) ** 2, axis=-1))


def loss_fn(params, x, y):
  return output_loss(apply_fn(params, x), y)


KEY = jax.random.key(3)
CHECKPOINTS = [jax.tree.map(lambda p, s=s: p * s, PARAMS)
               for s in (0.2, 0.5, 0.9, 1.0)]
# name -> (helper call on (params, loss_kwargs, layout), tolerance).
CALLS = {
    'hessian_vector_product': lambda p, kw, layout: (
        sharpness.hessian_vector_product(
            loss_fn, p, jax.tree.map(jnp.ones_like, p), loss_kwargs=kw,
            layout=layout)),
    'hessian_top_eigenvalue': lambda p, kw, layout: (
        sharpness.hessian_top_eigenvalue(
            loss_fn, p, num_iterations=30, key=KEY, loss_kwargs=kw,
            layout=layout)),
    'hessian_eigenvalues': lambda p, kw, layout: (
        sharpness.hessian_eigenvalues(
            loss_fn, p, 3, num_iterations=10, key=KEY, loss_kwargs=kw,
            layout=layout).eigenvalues),
    'hessian_trace_hutch++': lambda p, kw, layout: sharpness.hessian_trace(
        loss_fn, p, num_samples=9, method='hutch++', key=KEY,
        loss_kwargs=kw, layout=layout),
    'hessian_spectral_density': lambda p, kw, layout: (
        sharpness.hessian_spectral_density(
            loss_fn, p, num_lanczos=6, num_probes=2, grid_size=16, key=KEY,
            loss_kwargs=kw, layout=layout)),
    'ggn_top_eigenvalue': lambda p, kw, layout: (
        sharpness.hessian_top_eigenvalue(
            loss_fn, p, num_iterations=30, key=KEY, loss_kwargs=kw,
            layout=layout,
            curvature=sharpness.GGN(apply_fn, output_loss)).eigenvalue),
    'first_order_sharpness': lambda p, kw, layout: (
        sharpness.first_order_sharpness(
            loss_fn, p, rho=0.1, loss_kwargs=kw, layout=layout)),
    'sam_sharpness': lambda p, kw, layout: sharpness.sam_sharpness(
        loss_fn, p, rho=0.1, loss_kwargs=kw, layout=layout),
    'worst_case_sharpness': lambda p, kw, layout: (
        sharpness.worst_case_sharpness(
            loss_fn, p, rho=0.1, num_steps=4, loss_kwargs=kw,
            layout=layout).sharpness),
    'average_case_sharpness': lambda p, kw, layout: (
        sharpness.average_case_sharpness(
            loss_fn, p, sigma=0.1, num_samples=4, key=KEY, loss_kwargs=kw,
            layout=layout)),
    'loss_landscape_1d': lambda p, kw, layout: sharpness.loss_landscape_1d(
        loss_fn, p, num_points=5, key=KEY, loss_kwargs=kw, layout=layout),
    'loss_landscape_2d': lambda p, kw, layout: sharpness.loss_landscape_2d(
        loss_fn, p, num_points=3, key=KEY, loss_kwargs=kw,
        layout=layout).losses,
    'loss_interpolation': lambda p, kw, layout: sharpness.loss_interpolation(
        loss_fn, CHECKPOINTS[0], p, ts=jnp.linspace(-0.5, 1.5, 5),
        loss_kwargs=kw, layout=layout).losses,
    'trajectory_pca': lambda p, kw, layout: sharpness.trajectory_pca(
        loss_fn, CHECKPOINTS[:-1] + [p], num_points=3, loss_kwargs=kw,
        layout=layout).landscape.losses,
}


def close(got, want, rtol=2e-4, atol=2e-5):
  jax.tree.map(
      lambda g, w: np.testing.assert_allclose(
          np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol,
          atol=atol), got, want)


@functools.cache
def single_device(name):
  return jax.jit(lambda p, x, y: CALLS[name](p, {'x': x, 'y': y}, None))(
      PARAMS, X, Y)


def split(*arrays):
  return jax.device_put(arrays, NamedSharding(MESH, P('d')))


def sharded(name, layout=PER_DEVICE):
  fn = jax.shard_map(
      lambda p, x, y: CALLS[name](p, {'x': x, 'y': y}, layout), mesh=MESH,
      in_specs=(P(), P('d'), P('d')), out_specs=P())
  return jax.jit(fn)(PARAMS, *split(X, Y))


@pytest.mark.parametrize('name', list(CALLS))
def test_per_device_equals_gathered_batch(name):
  close(sharded(name), single_device(name))


def test_per_device_under_pmap():
  fn = jax.pmap(
      lambda x, y: sharpness.hessian_top_eigenvalue(
          loss_fn, PARAMS, num_iterations=30, key=KEY,
          loss_kwargs={'x': x, 'y': y}, layout=PER_DEVICE).eigenvalue,
      axis_name='d')
  got = fn(X.reshape(8, 4, 3), Y.reshape(8, 4, 2))
  want = single_device('hessian_top_eigenvalue').eigenvalue
  close(got, np.full(8, want))


def test_one_all_reduce_per_curvature_product():
  """Power iteration under PerDevice: one all-reduce in the loop body."""
  fn = jax.shard_map(
      lambda x, y: sharpness.hessian_top_eigenvalue(
          loss_fn, PARAMS, num_iterations=5, loss_kwargs={'x': x, 'y': y},
          layout=PER_DEVICE).eigenvalue,
      mesh=MESH, in_specs=(P('d'), P('d')), out_specs=P())
  jaxpr = jax.make_jaxpr(fn)(*split(X, Y))
  loops = [e for e in jaxpr.jaxpr.eqns[0].params['jaxpr'].eqns
           if e.primitive.name == 'while']
  assert loops
  body = loops[0].params['body_jaxpr'].jaxpr
  collectives = [str(e.primitive) for e in body.eqns
                 if e.primitive.name in ('psum', 'pmean', 'psum_invariant')]
  assert len(collectives) == 1, collectives


def test_m_sharpness_per_device():
  """m = the per-device batch: the mean of each device's own sharpness."""
  fn = jax.shard_map(
      lambda x, y: sharpness.m_sharpness(
          loss_fn, PARAMS, 4, rho=0.1, loss_kwargs={'x': x, 'y': y},
          layout=PER_DEVICE),
      mesh=MESH, in_specs=(P('d'), P('d')), out_specs=P())
  got = jax.jit(fn)(*split(X, Y))
  want = np.mean([
      sharpness.sam_sharpness(loss_fn, PARAMS, rho=0.1, loss_kwargs={
          'x': X[i:i + 4], 'y': Y[i:i + 4]}) for i in range(0, 32, 4)])
  close(got, want)
  assert abs(float(got) - float(single_device('sam_sharpness'))) > 1e-4


@pytest.mark.parametrize('name', ['hessian_top_eigenvalue', 'sam_sharpness'])
def test_shared_chunks_equal_whole_batch(name):
  for layout in (sam_optax.Chunks(8, shared=True),
                 sam_optax.Chunks(4, mode='vectorized', shared=True)):
    got = jax.jit(lambda p, x, y: CALLS[name](p, {'x': x, 'y': y}, layout))(
        PARAMS, X, Y)
    close(got, single_device(name))
  got = sharded(name, sam_optax.PerDevice(
      'd', sync=True, chunks=sam_optax.Chunks(2, shared=True)))
  close(got, single_device(name))


def test_sharded_batch_without_layout_is_an_error():
  with pytest.raises(ValueError, match=r"PerDevice\('d'\)"):
    sharded('sam_sharpness', None)


@pytest.mark.parametrize('layout, match', [
    (sam_optax.Chunks(4), r'Chunks\(4, shared=True\).*m_sharpness'),
    (sam_optax.PerDevice('d', sync=True, groups=[[0, 1], [2, 3]]),
     'groups= has no meaning'),
    ('d', 'layout must be None'),
])
def test_bad_layouts(layout, match):
  with pytest.raises((ValueError, TypeError), match=match):
    sharpness.hessian_trace(loss_fn, PARAMS, num_samples=2,
                            loss_kwargs={'x': X, 'y': Y}, layout=layout)


def test_chunks_that_do_not_divide_the_batch():
  with pytest.raises(ValueError, match='does not split into chunks'):
    sharpness.sam_sharpness(loss_fn, PARAMS, loss_kwargs={'x': X, 'y': Y},
                            layout=sam_optax.Chunks(5, shared=True))


def test_m_sharpness_rejects_chunk_layouts():
  with pytest.raises(ValueError, match='m already splits'):
    sharpness.m_sharpness(loss_fn, PARAMS, 4, loss_kwargs={'x': X, 'y': Y},
                          layout=sam_optax.Chunks(4, shared=True))


def test_nan_on_one_device_is_nan_everywhere():
  bad = X.at[5, 0].set(jnp.nan)
  fn = jax.shard_map(
      lambda x, y: sharpness.hessian_trace(
          loss_fn, PARAMS, num_samples=3, loss_kwargs={'x': x, 'y': y},
          layout=PER_DEVICE).trace,
      mesh=MESH, in_specs=(P('d'), P('d')), out_specs=P())
  assert np.isnan(jax.jit(fn)(*split(bad, Y)))


@pytest.mark.parametrize('helper', [sharpness.hessian_trace,
                                    sharpness.m_sharpness])
def test_per_device_outside_pmap_is_an_error(helper):
  args = (4,) if helper is sharpness.m_sharpness else ()
  with pytest.raises(ValueError, match="no such axis is bound"):
    helper(loss_fn, PARAMS, *args, loss_kwargs={'x': X, 'y': Y},
           layout=PER_DEVICE)


def test_per_device_over_batches():
  """batches= on sharded data: the dataset loss of the global batches."""
  halves = [{'x': X[:16], 'y': Y[:16]}, {'x': X[16:], 'y': Y[16:]}]
  call = lambda bs, layout: sharpness.hessian_trace(
      loss_fn, PARAMS, num_samples=4, key=KEY, batches=bs, layout=layout)
  fn = jax.shard_map(lambda bs: call(bs, PER_DEVICE), mesh=MESH,
                     in_specs=(P('d'),), out_specs=P())
  got = jax.jit(fn)(jax.device_put(halves, NamedSharding(MESH, P('d'))))
  close(got, jax.jit(lambda bs: call(bs, None))(halves))
