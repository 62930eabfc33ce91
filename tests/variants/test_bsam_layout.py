"""bSAM under `layout=`: chunks and devices, on the 8 fake CPU devices.

Every check compares with `reference_step`, bSAM written out by hand from the
equations for a list of perturbation groups (each group: its examples and
its noise key; its own noise, g, ascent and g_eps; g_eps and sqrt(s g^2)
averaged over the groups, as the authors' ``build_bsam_optimizer`` does over
its ``msharpness`` sub-batches), never with the transformation under test.
"""

import functools
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
STEPS = 2
HP = dict(learning_rate=0.125, num_data=40, rho=0.25, betas=(0.875, 0.75),
          prior_prec=2.0, damping=0.125, s_init=2.0, seed=3)


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
  xs = jax.random.normal(keys[3], (STEPS, BATCH, 5))
  ys = jax.random.normal(keys[4], (STEPS, BATCH, 2))
  return params, xs, ys


PARAMS, XS, YS = make_problem()


# ------------------------------------------------------------- reference --


def normal_like(key, params):
  """xi: leaf i is N(0, 1) from fold_in(key, i) (bsam's documented noise)."""
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      jax.random.normal(jax.random.fold_in(key, i), leaf.shape)
      for i, leaf in enumerate(leaves)])


@jax.jit
def reference_group(w, s, key, x, y):
  """One perturbation: (L(w + rho g / s), g_eps, sqrt(s g^2), ||g||)."""
  n, rho = HP['num_data'], HP['rho']
  xi = normal_like(key, w)
  theta = jax.tree.map(lambda a, e, p: a + e / jnp.sqrt(n * p), w, xi, s)
  g = jax.grad(loss_fn)(theta, x, y)
  point = jax.tree.map(lambda a, b, p: a + rho * b / p, w, g, s)
  g_eps = jax.grad(loss_fn)(point, x, y)
  scaled = jax.tree.map(lambda p, b: jnp.sqrt(p * b ** 2), s, g)
  norm = jnp.sqrt(sum(jnp.sum(b ** 2) for b in jax.tree.leaves(g)))
  return loss_fn(point, x, y), g_eps, scaled, norm


def reference_step(w, m, s, key, groups):
  """bSAM's step; ``groups(sub)`` lists each group's (key, x, y)."""
  b1, b2 = HP['betas']
  delta = HP['prior_prec'] / HP['num_data']
  key, sub = jax.random.split(key)
  results = [reference_group(w, s, *group) for group in groups(sub)]
  loss, g_eps, scaled, norm = jax.tree.map(
      lambda *xs: sum(xs) / len(xs), *results)
  m = jax.tree.map(lambda a, b, c: b1 * a + (1 - b1) * (b + delta * c),
                   m, g_eps, w)
  w = jax.tree.map(lambda a, b, p: a - HP['learning_rate'] * b / p, w, m, s)
  s = jax.tree.map(lambda p, c: b2 * p + (1 - b2) * (
      c + HP['damping'] + delta), s, scaled)
  return w, m, s, key, loss, norm


def reference(groups_of):
  """STEPS steps; ``groups_of(sub, x, y)`` lists the groups of a batch."""
  w = PARAMS
  m = jax.tree.map(jnp.zeros_like, w)
  s = jax.tree.map(lambda a: jnp.full_like(a, HP['s_init']), w)
  key = jax.random.key(HP['seed'])
  for t in range(STEPS):
    w, m, s, key, loss, norm = reference_step(
        w, m, s, key, functools.partial(groups_of, x=XS[t], y=YS[t]))
  return w, m, s, key, loss, norm


def slices(x, y, n):
  size = x.shape[0] // n
  return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size])
          for i in range(n)]


def whole(sub, x, y):
  return [(sub, x, y)]


def chunks_of(m):
  def groups(sub, x, y):
    return [(jax.random.fold_in(sub, i), *c)
            for i, c in enumerate(slices(x, y, x.shape[0] // m))]
  return groups


def per_device(sub, x, y):
  return [(jax.random.fold_in(sub, d), *c)
          for d, c in enumerate(slices(x, y, DEVICES))]


def per_device_chunks(m):
  def groups(sub, x, y):
    out = []
    for d, (xd, yd) in enumerate(slices(x, y, DEVICES)):
      out += chunks_of(m)(jax.random.fold_in(sub, d), xd, yd)
    return out
  return groups


def sync_groups(n):
  """PerDevice(sync=True, groups=n consecutive groups): one per group."""
  def groups(sub, x, y):
    return [(jax.random.fold_in(sub, i), *c)
            for i, c in enumerate(slices(x, y, n))]
  return groups


# ------------------------------------------------------------------ runs --


def assert_matches(got, want, atol=2e-5):
  (params, state), (w, m, s, key, loss, norm) = got, want
  for a, b in zip(jax.tree.leaves((params, state.momentum, state.precision)),
                  jax.tree.leaves((w, m, s))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol,
                               rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(state.key),
                                np.asarray(jax.random.key_data(key)))
  np.testing.assert_allclose(state.perturbed_loss, loss, rtol=1e-4)
  np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-4)
  assert int(state.count) == STEPS


def run_jit(layout):
  tx = sam_optax.bsam(loss_fn, **HP, layout=layout)
  params, state = PARAMS, tx.init(PARAMS)
  update = jax.jit(tx.update)
  mesh = isinstance(getattr(layout, 'mode', None), sam_optax.MeshChunks)
  for t in range(STEPS):
    batch = {'x': XS[t], 'y': YS[t]}
    if mesh:
      batch = sam_optax.shard_batch(batch, MESH, 'd')
    updates, state = update(params, state, params, **batch)
    params = optax.apply_updates(params, updates)
  return params, state


def run_pmap(layout):
  tx = sam_optax.bsam(loss_fn, **HP, layout=layout)

  def step(params, state, x, y):
    updates, state = tx.update(params, state, params, x=x, y=y)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(step, axis_name='d', in_axes=(None, None, 0, 0))
  params, state = PARAMS, tx.init(PARAMS)
  for t in range(STEPS):
    params, state = step(params, state,
                         XS[t].reshape(DEVICES, -1, 5),
                         YS[t].reshape(DEVICES, -1, 2))
    # The state and the weights stay identical on every device.
    for leaf in jax.tree.leaves((params, state)):
      for d in range(1, DEVICES):
        np.testing.assert_array_equal(np.asarray(leaf[d]),
                                      np.asarray(leaf[0]))
    params, state = jax.tree.map(lambda a: a[0], (params, state))
  return params, state


MESH = jax.make_mesh((DEVICES,), ('d',))
REPLICATED = NamedSharding(MESH, P())
SPLIT = NamedSharding(MESH, P('d'))


def run_shard_map(layout, check_vma=True):
  tx = sam_optax.bsam(loss_fn, **HP, layout=layout)

  def step(params, state, x, y):
    # The incoming updates only give the structure: the replicated params.
    updates, state = tx.update(params, state, params, x=x, y=y)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(
      step, mesh=MESH, in_specs=(P(), P(), P('d'), P('d')),
      out_specs=(P(), P()), check_vma=check_vma))
  params, state = jax.device_put((PARAMS, tx.init(PARAMS)), REPLICATED)
  for t in range(STEPS):
    x, y = jax.device_put((XS[t], YS[t]), SPLIT)
    params, state = step(params, state, x, y)
  return params, state


@functools.cache
def want(name):
  return reference({
      'whole': whole,
      'chunks8': chunks_of(8),
      'per_device': per_device,
      'per_device_chunks4': per_device_chunks(4),
      'sync_groups2': sync_groups(2),
  }[name])


# ---------------------------------------------------------------- chunks --


def test_no_layout_matches_the_reference():
  assert_matches(run_jit(None), want('whole'))


@pytest.mark.parametrize('mode', ['sequential', 'vectorized'])
def test_chunks_each_draw_their_noise_and_perturbation(mode):
  got = run_jit(sam_optax.Chunks(8, mode=mode))
  assert_matches(got, want('chunks8'))
  # Eight perturbations are not one: the layout changes the step.
  assert not np.allclose(got[0]['w1'], want('whole')[0]['w1'], atol=1e-4)


@pytest.mark.parametrize('mode', ['sequential', 'vectorized'])
def test_shared_chunks_are_the_whole_batch(mode):
  assert_matches(run_jit(sam_optax.Chunks(16, mode=mode, shared=True)),
                 want('whole'))


def test_chunks_laid_over_a_mesh():
  layout = sam_optax.Chunks(8, mode=sam_optax.mesh_chunks(MESH, 'd'))
  assert_matches(run_jit(layout), want('chunks8'))


def test_chunks_with_batch_argnames_leave_other_arguments_whole():
  def scaled_loss(params, x, y, scale):
    return scale[0] * loss_fn(params, x, y)

  scale = jnp.ones([3])  # not per-example: every chunk gets it whole
  tx = sam_optax.bsam(scaled_loss, **HP, layout=sam_optax.Chunks(
      8, batch_argnames=('x', 'y')))
  params, state = PARAMS, tx.init(PARAMS)
  update = jax.jit(tx.update)
  for t in range(STEPS):
    updates, state = update(params, state, params, x=XS[t], y=YS[t],
                            scale=scale)
    params = optax.apply_updates(params, updates)
  assert_matches((params, state), want('chunks8'))


def test_chunks_keep_bfloat16_params_and_a_float32_state():
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), PARAMS)
  tx = sam_optax.bsam(loss_fn, **HP, layout=sam_optax.Chunks(8))
  updates, state = jax.jit(tx.update)(params, tx.init(params), params,
                                      x=XS[0], y=YS[0])
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  for leaf in jax.tree.leaves((state.momentum, state.precision)):
    assert leaf.dtype == jnp.float32
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_shared_chunks_keep_a_float16_models_gradients_in_float32():
  # Gradients around 1e6 overflow float16: bsam takes them in float32, and
  # their mean over the chunks stays float32, so the step is the whole
  # batch's (rounding it back to float16 would make it inf: a skipped step).
  def big_loss(params, x, y):
    return 1e6 * loss_fn(params, x, y)

  params = jax.tree.map(lambda a: a.astype(jnp.float16), PARAMS)
  hp = dict(HP, rho=1e-8, num_data=1e9)  # g_eps ~ g, the noise tiny
  assert not all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(
      jax.grad(big_loss)(params, XS[0], YS[0])))

  def step(layout):
    tx = sam_optax.bsam(big_loss, **hp, layout=layout)
    return jax.jit(tx.update)(params, tx.init(params), params, x=XS[0],
                              y=YS[0])

  (whole_updates, whole_state), (updates, state) = (
      step(None), step(sam_optax.Chunks(16, shared=True)))
  assert int(whole_state.skipped_steps) == int(state.skipped_steps) == 0
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(whole_updates)):
    assert a.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=4e-3)



# --------------------------------------------------------------- devices --

DEVICE_LAYOUTS = {
    'default': (sam_optax.PerDevice('d'), 'per_device'),
    'sync': (sam_optax.PerDevice('d', sync=True), 'whole'),
    'sync_groups': (sam_optax.PerDevice(
        'd', sync=True, groups=[[0, 1, 2, 3], [4, 5, 6, 7]]), 'sync_groups2'),
    'chunks': (sam_optax.PerDevice('d', chunks=sam_optax.Chunks(4)),
               'per_device_chunks4'),
    'sync_shared_chunks': (sam_optax.PerDevice(
        'd', sync=True, chunks=sam_optax.Chunks(4, shared=True)), 'whole'),
    'shared_chunks': (sam_optax.PerDevice(
        'd', chunks=sam_optax.Chunks(4, shared=True, mode='vectorized')),
        'per_device'),
}


@pytest.mark.parametrize('name', list(DEVICE_LAYOUTS))
def test_pmap(name):
  layout, reference_name = DEVICE_LAYOUTS[name]
  assert_matches(run_pmap(layout), want(reference_name))


@pytest.mark.parametrize('name', ['default', 'sync', 'chunks',
                                  'sync_shared_chunks'])
def test_shard_map(name):
  layout, reference_name = DEVICE_LAYOUTS[name]
  assert_matches(run_shard_map(layout), want(reference_name))


def test_shard_map_without_vma_checks():
  assert_matches(run_shard_map(sam_optax.PerDevice('d'), check_vma=False),
                 want('per_device'))


ALL_REDUCE = re.compile(r'\ball-reduce(?:-start)?\(')


def shard_map_step_of(layout):
  tx = sam_optax.bsam(loss_fn, **HP, layout=layout)
  step = jax.jit(jax.shard_map(
      lambda p, st, x, y: tx.update(p, st, p, x=x, y=y), mesh=MESH,
      in_specs=(P(), P(), P('d'), P('d')), out_specs=(P(), P())))
  params, state = jax.device_put((PARAMS, tx.init(PARAMS)), REPLICATED)
  x, y = jax.device_put((XS[0], YS[0]), SPLIT)
  return len(ALL_REDUCE.findall(
      step.lower(params, state, x, y).compile().as_text()))


def test_one_all_reduce_per_step_and_one_more_with_sync():
  # Per device: g_eps, sqrt(s g^2), the loss and ||g|| in one all-reduce,
  # like data-parallel SGD's; sync=True adds the average of g.
  assert shard_map_step_of(sam_optax.PerDevice('d')) == 1
  assert shard_map_step_of(sam_optax.PerDevice('d', sync=True)) == 2


# ---------------------------------------------------------------- errors --


def test_bad_layouts_say_what_is_wrong():
  with pytest.raises(TypeError, match='bsam: layout must be None'):
    sam_optax.bsam(loss_fn, 0.1, num_data=10, layout='d')
  with pytest.raises(TypeError, match='bsam: layout must be None'):
    sam_optax.bsam(loss_fn, 0.1, num_data=10, layout=8)
  tx = sam_optax.bsam(loss_fn, 0.1, num_data=10, layout=sam_optax.Chunks(5))
  with pytest.raises(ValueError, match=r'bsam: a batch of 64 examples does'
                     r' not split into chunks of m=5'):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS, x=XS[0], y=YS[0])
  tx = sam_optax.bsam(loss_fn, 0.1, num_data=10,
                      layout=sam_optax.Chunks(4, shared=True))
  with pytest.raises(ValueError, match='bsam: the batch arrays disagree'):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS, x=XS[0], y=YS[0][:32])
  tx = sam_optax.bsam(loss_fn, 0.1, num_data=10,
                      layout=sam_optax.PerDevice('d'))
  with pytest.raises(ValueError, match="no such axis is bound"):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS, x=XS[0], y=YS[0])
