"""Data-parallel and m-sharpness layouts of the SAM pipeline, on 8 CPU devices.

Every numerical check compares against a hand-written SAM / ASAM gradient
(`reference_sam`, plain `jax.grad` on the loss and the formula of the paper),
never against the transformation under test.
"""

import dataclasses
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax

DEVICES = 8
BATCH = 64
RHO = 0.3
ATOL = 2e-5


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params['w1'] + params['b1'])
  return jnp.mean((h @ params['w2'] - y) ** 2)


def make_problem():
  keys = jax.random.split(jax.random.key(0), 5)
  params = {
      'w1': jax.random.normal(keys[0], (5, 6)),
      'b1': 0.1 * jax.random.normal(keys[1], (6,)),
      'w2': jax.random.normal(keys[2], (6, 2)),
  }
  x = jax.random.normal(keys[3], (BATCH, 5))
  y = jax.random.normal(keys[4], (BATCH, 2))
  return params, x, y


PARAMS, X, Y = make_problem()


def reference_sam(params, x, y, rho=RHO, steps=1, eta=None):
  """SAM (eta=None) or ASAM gradient on one batch, written out by hand."""
  grad = jax.grad(loss_fn)
  w = params
  point = params
  for _ in range(steps):
    g = grad(point, x, y)
    if eta is None:
      scale = jax.tree.map(jnp.ones_like, params)
    else:
      scale = jax.tree.map(lambda p: jnp.abs(p) + eta, w)
    tg = jax.tree.map(lambda t, gi: t * gi, scale, g)
    norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(tg)))
    point = jax.tree.map(
        lambda p, t, v: p + (rho / steps) * t * v / norm, point, scale, tg
    )
  return grad(point, x, y), loss_fn(point, x, y)


def tree_mean(trees):
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)


def assert_close(a, b, atol=ATOL):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol,
                               rtol=1e-4)


def shards(n):
  size = BATCH // n
  return [(X[i * size:(i + 1) * size], Y[i * size:(i + 1) * size])
          for i in range(n)]


MESH = jax.make_mesh((DEVICES,), ('d',))
REPLICATED = NamedSharding(MESH, P())
SPLIT = NamedSharding(MESH, P('d'))


def local(params):
  # Inside shard_map a gradient at replicated weights is summed over devices;
  # at weights marked varying it is the device's own.
  return jax.lax.pcast(params, 'd', to='varying')


def shard_map_step(tx):
  """jit(shard_map) of one update: local gradient in, averaged gradient out."""

  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(local(params), x, y)
    return tx.update(grads, state, params, x=x, y=y)

  return jax.jit(jax.shard_map(
      step, mesh=MESH, in_specs=(P(), P(), P('d'), P('d')),
      out_specs=(P(), P())))


def run_shard_map(tx):
  state = tx.init(PARAMS)
  params, state = jax.device_put((PARAMS, state), REPLICATED)
  x, y = jax.device_put((X, Y), SPLIT)
  return shard_map_step(tx)(params, state, x, y)


# ---------------------------------------------------------------- devices --


@pytest.mark.parametrize('variant', ['sam', 'asam'])
def test_shard_map_is_mean_of_per_device_sam(variant):
  if variant == 'sam':
    tx = sam_optax.sam(loss_fn, RHO, layout=sam_optax.PerDevice('d'))
    eta = None
  else:
    tx = sam_optax.asam(loss_fn, RHO, eta=0.1,
                        layout=sam_optax.PerDevice('d'))
    eta = 0.1
  out, state = run_shard_map(tx)
  refs = [reference_sam(PARAMS, x, y, eta=eta) for x, y in shards(DEVICES)]
  assert_close(out, tree_mean([g for g, _ in refs]))
  np.testing.assert_allclose(
      state.perturbed_loss, np.mean([l for _, l in refs]), rtol=1e-5)
  # The per-device perturbation differs from the full-batch one.
  full, _ = reference_sam(PARAMS, X, Y, eta=eta)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(out), jax.tree.leaves(full))) > 1e-3


def test_pmap_is_mean_of_per_device_sam():
  tx = sam_optax.sam(loss_fn, RHO, layout=sam_optax.PerDevice('i'),
                     ascent_steps=2, track_cosine=True)
  state = tx.init(PARAMS)

  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    return tx.update(grads, state, params, x=x, y=y)

  out, new_state = jax.pmap(step, axis_name='i', in_axes=(None, None, 0, 0))(
      PARAMS, state, X.reshape(DEVICES, -1, 5), Y.reshape(DEVICES, -1, 2))
  expected = tree_mean(
      [reference_sam(PARAMS, x, y, steps=2)[0] for x, y in shards(DEVICES)])
  for d in range(DEVICES):
    assert_close(jax.tree.map(lambda v: v[d], out), expected)
  # Diagnostics are averaged with the gradient: the state is replicated.
  assert np.ptp(np.asarray(new_state.perturbed_loss)) == 0
  assert np.ptp(np.asarray(new_state.cosine)) == 0


def test_synced_perturbation_is_full_batch_sam():
  tx = sam_optax.sam(loss_fn, RHO, layout=sam_optax.PerDevice('d', sync=True),
                     ascent_steps=2, track_cosine=True)
  out, state = run_shard_map(tx)
  expected, loss = reference_sam(PARAMS, X, Y, steps=2)
  assert_close(out, expected)
  np.testing.assert_allclose(state.perturbed_loss, loss, rtol=1e-5)
  full_grad = jax.grad(loss_fn)(PARAMS, X, Y)
  norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(
      full_grad)))
  np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-5)
  # Global SAM reports what SAM on one device reports for the same batch:
  # the cosine between the global g0 and the global gradient handed on.
  one = sam_optax.sam(loss_fn, RHO, ascent_steps=2, track_cosine=True)
  _, one_state = one.update(full_grad, one.init(PARAMS), PARAMS, x=X, y=Y)
  cosine = sum(float(jnp.vdot(a, b)) for a, b in zip(
      jax.tree.leaves(full_grad), jax.tree.leaves(expected))) / (
          norm * np.sqrt(sum(float(jnp.sum(g ** 2))
                             for g in jax.tree.leaves(expected))))
  np.testing.assert_allclose(state.cosine, cosine, rtol=1e-5)
  np.testing.assert_allclose(state.cosine, one_state.cosine, rtol=1e-5)
  np.testing.assert_allclose(state.grad_norm, one_state.grad_norm, rtol=1e-5)


def test_pmap_groups_sync_inside_groups():
  groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
  tx = sam_optax.sam(
      loss_fn, RHO, layout=sam_optax.PerDevice('i', sync=True, groups=groups))
  state = tx.init(PARAMS)

  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    return tx.update(grads, state, params, x=x, y=y)

  out, _ = jax.pmap(step, axis_name='i', in_axes=(None, None, 0, 0))(
      PARAMS, state, X.reshape(DEVICES, -1, 5), Y.reshape(DEVICES, -1, 2))
  # m = 2 devices x 8 examples: SAM on each group's 16 examples, averaged.
  expected = tree_mean([reference_sam(PARAMS, x, y)[0] for x, y in shards(4)])
  assert_close(jax.tree.map(lambda v: v[0], out), expected)


def test_xsam_per_device():
  # With the probe off and alpha=1, XSAM is SAM: mean of per-device SAM.
  tx = sam_optax.xsam(loss_fn, RHO, probe_every=None, alpha=1.0,
                      layout=sam_optax.PerDevice('d'))
  out, _ = run_shard_map(tx)
  expected = tree_mean(
      [reference_sam(PARAMS, x, y)[0] for x, y in shards(DEVICES)])
  assert_close(out, expected)
  # With the probe on, alpha agrees across devices (replicated out_specs).
  tx = sam_optax.xsam(loss_fn, RHO, rho_max=0.5, probe_every=1,
                      alpha_step=0.5, layout=sam_optax.PerDevice('d'))
  _, state = run_shard_map(tx)
  assert 0.0 <= float(state.alpha) <= 2.0
  assert np.all(np.isfinite(np.asarray(state.probe_losses)))


ALL_REDUCE = re.compile(r'\ball-reduce(?:-start)?\(')


def count_all_reduces(fn, *args):
  return len(ALL_REDUCE.findall(fn.lower(*args).compile().as_text()))


def test_all_reduce_count_matches_data_parallel_sgd():
  sgd = optax.sgd(0.1)
  tx_sam = optax.chain(sam_optax.sam(loss_fn, RHO, layout=sam_optax.PerDevice('d')), sgd)
  tx_sync = optax.chain(
      sam_optax.sam(loss_fn, RHO,
                    layout=sam_optax.PerDevice('d', sync=True)), sgd)

  def sgd_step(params, state, x, y):
    grads = jax.lax.pmean(jax.grad(loss_fn)(local(params), x, y), 'd')
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def make_step(tx):
    def step(params, state, x, y):
      grads = jax.grad(loss_fn)(local(params), x, y)
      updates, state = tx.update(grads, state, params, x=x, y=y)
      return optax.apply_updates(params, updates), state
    return step

  specs = dict(mesh=MESH, in_specs=(P(), P(), P('d'), P('d')),
               out_specs=(P(), P()))
  x, y = jax.device_put((X, Y), SPLIT)
  counts = {}
  for name, step, tx in [('sgd', sgd_step, sgd),
                         ('sam', make_step(tx_sam), tx_sam),
                         ('sync', make_step(tx_sync), tx_sync)]:
    state = jax.device_put(tx.init(PARAMS), REPLICATED)
    params = jax.device_put(PARAMS, REPLICATED)
    counts[name] = count_all_reduces(
        jax.jit(jax.shard_map(step, **specs)), params, state, x, y)
  assert counts['sgd'] >= 1
  assert counts['sam'] <= counts['sgd'], counts
  # The synced perturbation costs exactly one more gradient average.
  assert counts['sync'] == counts['sam'] + 1, counts

  # The same under pmap.
  tx_pmap = optax.chain(sam_optax.sam(loss_fn, RHO, layout=sam_optax.PerDevice('i')), sgd)

  def pmap_sgd(params, state, x, y):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), 'i')
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def pmap_sam(params, state, x, y):  # under pmap the gradient is local
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx_pmap.update(grads, state, params, x=x, y=y)
    return optax.apply_updates(params, updates), state

  xs, ys = X.reshape(DEVICES, -1, 5), Y.reshape(DEVICES, -1, 2)
  pmap_counts = [
      count_all_reduces(jax.pmap(step, axis_name='i',
                                 in_axes=(None, None, 0, 0)),
                        PARAMS, tx.init(PARAMS), xs, ys)
      for step, tx in [(pmap_sgd, sgd), (pmap_sam, tx_pmap)]]
  assert 1 <= pmap_counts[1] <= pmap_counts[0], pmap_counts


# ----------------------------------------------------------------- chunks --


CHUNK = 8


def chunk_reference(x, y, m):
  n = x.shape[0] // m
  return tree_mean([reference_sam(PARAMS, x[i * m:(i + 1) * m],
                                  y[i * m:(i + 1) * m])[0] for i in range(n)])


@pytest.mark.parametrize('mode', ['sequential', 'vectorized'])
def test_chunks_equal_per_chunk_reference(mode):
  tx = sam_optax.sam(loss_fn, RHO, layout=sam_optax.Chunks(CHUNK, mode=mode),
                     track_cosine=True)
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  out, state = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS, x=X, y=Y)
  assert_close(out, chunk_reference(X, Y, CHUNK))
  # Diagnostics are per perturbation group (here a chunk), then averaged:
  # ||g0_c|| and cos(g0_c, g_c) of each chunk's own gradients.
  norms, cosines = [], []
  for i in range(BATCH // CHUNK):
    x, y = X[i * CHUNK:(i + 1) * CHUNK], Y[i * CHUNK:(i + 1) * CHUNK]
    g0 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(
        jax.grad(loss_fn)(PARAMS, x, y))])
    g1 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(
        reference_sam(PARAMS, x, y)[0])])
    norms.append(np.linalg.norm(g0))
    cosines.append(g0 @ g1 / (np.linalg.norm(g0) * np.linalg.norm(g1)))
  np.testing.assert_allclose(state.grad_norm, np.mean(norms), rtol=1e-5)
  np.testing.assert_allclose(state.cosine, np.mean(cosines), rtol=1e-5)


@pytest.mark.parametrize('axis_type, mode', [('Explicit', 'sequential'),
                                              ('Auto', 'vectorized')])
def test_chunks_inside_shard_map_and_on_a_mesh_agree(axis_type, mode):
  # Per device: 8 examples in chunks of 4 -> 16 perturbations in all.
  tx = sam_optax.sam(loss_fn, RHO, layout=sam_optax.PerDevice(
      'd', chunks=sam_optax.Chunks(4, mode=mode)))
  expected = chunk_reference(X, Y, 4)
  via_shard_map, _ = run_shard_map(tx)
  assert_close(via_shard_map, expected)
  # Plain jit, batch sharded over the mesh, chunks laid over its data axis.
  mesh = jax.make_mesh((DEVICES,), ('d',), axis_types=(
      getattr(jax.sharding.AxisType, axis_type),))
  tx = sam_optax.sam(loss_fn, RHO, layout=sam_optax.Chunks(
      4, mode=sam_optax.mesh_chunks(mesh, 'd')))
  batch = sam_optax.shard_batch({'x': X, 'y': Y}, mesh, 'd')
  params = jax.device_put(PARAMS, NamedSharding(mesh, P()))

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, **batch)
    return tx.update(grads, state, params, **batch)

  compiled = step.lower(params, tx.init(params), batch).compile()
  via_mesh, _ = compiled(params, tx.init(params), batch)
  assert_close(via_mesh, expected)
  assert_close(via_mesh, via_shard_map)
  # The 16 chunks are laid 2 per device, not gathered onto one.
  hlo = compiled.as_text()
  assert 'f32[2,4,5]' in hlo and 'f32[16,4,5]' not in hlo
  assert 'all-gather(' not in hlo


def test_shared_perturbation_is_full_batch_sam():
  vg = sam_optax.chunked_value_and_grad(loss_fn, chunk_size=CHUNK)
  loss, grads = jax.jit(vg)(PARAMS, x=X, y=Y)
  np.testing.assert_allclose(loss, loss_fn(PARAMS, X, Y), rtol=1e-5)
  assert_close(grads, jax.grad(loss_fn)(PARAMS, X, Y))
  tx = sam_optax.sam(loss_fn, RHO, layout=sam_optax.Chunks(CHUNK, shared=True),
                     ascent_steps=2)
  out, state = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS, x=X, y=Y)
  expected, perturbed_loss = reference_sam(PARAMS, X, Y, steps=2)
  assert_close(out, expected)
  np.testing.assert_allclose(state.perturbed_loss, perturbed_loss, rtol=1e-5)


@pytest.mark.parametrize('mode', ['sequential', 'vectorized'])
def test_xsam_chooses_alpha_once_and_chunks_agree_with_devices(mode):
  kwargs = dict(rho_max=0.5, probe_every=1, alpha_step=0.25,
                track_cosine=True)
  m = BATCH // DEVICES
  tx = sam_optax.xsam(loss_fn, RHO, layout=sam_optax.Chunks(m, mode=mode),
                      **kwargs)
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  out, state = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS, x=X, y=Y)
  # Each chunk alone would probe its own losses; alpha comes from their mean.
  single = sam_optax.xsam(loss_fn, RHO, **kwargs)
  probe = jax.jit(lambda x, y: single.update(
      jax.grad(loss_fn)(PARAMS, x, y), single.init(PARAMS), PARAMS, x=x,
      y=y)[1].probe_losses)  # one compile for the eight equal-shaped shards
  losses = [np.asarray(probe(x, y)) for x, y in shards(DEVICES)]
  mean = np.mean(losses, axis=0)
  grid = np.arange(len(mean)) * 0.25
  np.testing.assert_allclose(state.probe_losses, mean, rtol=1e-5)
  assert float(state.alpha) == grid[np.argmax(mean)]  # on the grid
  # The same m-sharpness step laid out per device: same alpha, same update.
  per_device = sam_optax.xsam(loss_fn, RHO, layout=sam_optax.PerDevice('d'),
                              **kwargs)
  dev_out, dev_state = run_shard_map(per_device)
  assert float(dev_state.alpha) == float(state.alpha)
  assert_close(dev_out, out)
  for field in ('perturbed_loss', 'grad_norm', 'cosine'):
    np.testing.assert_allclose(getattr(dev_state, field),
                               getattr(state, field), rtol=1e-5)


# ----------------------------------------------------------------- errors --


def test_uneven_batch_names_both_sizes():
  tx = sam_optax.sam(loss_fn, RHO, layout=sam_optax.Chunks(12))
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  with pytest.raises(ValueError, match=r'batch of 64 examples.*m=12'):
    tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y)


def test_raw_key_with_chunks_says_to_pass_a_typed_key():
  def noisy_loss(params, x, y, key):
    return loss_fn(params, x, y) + 0.0 * jax.random.uniform(key)

  tx = sam_optax.sam(noisy_loss, RHO, layout=sam_optax.Chunks(16))
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  with pytest.raises(ValueError, match=r'disagree.*jax.random.key'):
    tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y,
              key=jax.random.PRNGKey(0))
  # A typed key is a scalar: it goes to every chunk.
  out, _ = tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y,
                     key=jax.random.key(0))
  want, _ = sam_optax.sam(loss_fn, RHO, layout=sam_optax.Chunks(16)).update(
      grads, tx.init(PARAMS), PARAMS, x=X, y=Y)
  assert_close(out, want)


def test_mesh_chunks_must_lay_evenly():
  tx = sam_optax.sam(loss_fn, RHO, layout=sam_optax.Chunks(
      16, mode=sam_optax.mesh_chunks(MESH, 'd')))
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  with pytest.raises(ValueError, match=r'4 chunks.*8 devices'):
    tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y)


@pytest.mark.parametrize('build, message', [
    (lambda: sam_optax.PerDevice('d', groups=[[0, 1]]), 'needs sync=True'),
    (lambda: sam_optax.PerDevice('d', sync=True, groups=[[0, 1], [1, 2]]),
     'disjoint groups'),
    (lambda: sam_optax.PerDevice('d', sync='yes'), 'sync must be True or'),
    (lambda: sam_optax.PerDevice('d', chunks=4), 'must be a sam_optax.Chunks'),
    (lambda: sam_optax.PerDevice('d', sync=True,
                                 chunks=sam_optax.Chunks(4)),
     'Chunks\\(m, shared=True\\) for global SAM'),
    (lambda: sam_optax.PerDevice('d', chunks=sam_optax.Chunks(
        4, mode=sam_optax.mesh_chunks(MESH, 'd'))), 'plain jax.jit'),
    (lambda: sam_optax.PerDevice({'d': 1}), 'hashable'),
    (lambda: sam_optax.Chunks(4, mode='parallel'), 'mode must be'),
    (lambda: sam_optax.Chunks(0), 'm must be an int >= 1'),
    (lambda: sam_optax.Chunks(2.5), 'm must be an int >= 1'),
    (lambda: sam_optax.Chunks(4, shared=1), 'shared must be True or'),
    (lambda: sam_optax.Chunks(4, batch_argnames=[1]), 'batch_argnames'),
    (lambda: sam_optax.sam(loss_fn, layout='per-device'),
     'layout must be None'),
])
def test_bad_layouts_fail_at_construction(build, message):
  with pytest.raises((ValueError, TypeError), match=message):
    build()


def test_layouts_read_like_the_call():
  assert repr(sam_optax.PerDevice('d', sync=True)) == (
      "PerDevice('d', sync=True)")
  assert repr(sam_optax.PerDevice('d', chunks=sam_optax.Chunks(
      4, mode='vectorized'))) == "PerDevice('d', chunks=Chunks(4, mode="\
          "'vectorized'))"
  assert sam_optax.Chunks(8) == sam_optax.Chunks(8)  # frozen, comparable
  with pytest.raises(dataclasses.FrozenInstanceError):
    sam_optax.Chunks(8).m = 4
  for factory in (sam_optax.sam, sam_optax.asam, sam_optax.xsam):
    parameters = inspect.signature(factory).parameters
    assert 'layout' in parameters
    for old in ('axis_name', 'sync_perturbation', 'axis_index_groups',
                'chunk_size', 'chunk_mode', 'shared_perturbation'):
      assert old not in parameters


def test_summed_gradient_inside_shard_map_is_an_error():
  tx = sam_optax.sam(loss_fn, RHO, layout=sam_optax.PerDevice('d'))

  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)  # summed over the devices
    return tx.update(grads, state, params, x=x, y=y)

  fn = jax.jit(jax.shard_map(step, mesh=MESH,
                             in_specs=(P(), P(), P('d'), P('d')),
                             out_specs=(P(), P())))
  params, state = jax.device_put((PARAMS, tx.init(PARAMS)), REPLICATED)
  with pytest.raises(ValueError, match="pcast"):
    fn(params, state, *jax.device_put((X, Y), SPLIT))


def test_mesh_helpers_check_their_axis():
  with pytest.raises(ValueError, match="not 'batch'"):
    sam_optax.mesh_chunks(MESH, 'batch')
  with pytest.raises(ValueError, match='multiple of 8'):
    sam_optax.shard_batch({'x': jnp.ones((12, 2))}, MESH, 'd')


def test_chunks_of_an_explicitly_sharded_batch_that_do_not_lay_evenly():
  mesh = jax.make_mesh((DEVICES,), ('d',), axis_types=(
      jax.sharding.AxisType.Explicit,))
  batch = sam_optax.shard_batch({'x': X, 'y': Y}, mesh, 'd')
  chunks = X.shape[0] // (X.shape[0] // 2)  # 2 chunks over 8 devices
  with pytest.raises(ValueError, match=f'its {chunks} chunks .* do not lay'):
    sam_optax.chunked_value_and_grad(loss_fn, X.shape[0] // 2)(
        jax.device_put(PARAMS, NamedSharding(mesh, P())), **batch)
