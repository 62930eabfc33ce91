"""The layout battery: the variants under the `layout=`s, on 8 CPU devices.

A layout only decides which examples each perturbation sees, so the
reference for a layout is the variant run alone (``layout=None``) on each
perturbation group's examples -- m examples per chunk or device, the whole
global batch for ``sync=True`` and ``shared=True`` -- averaged over the
groups. (The single-group math of each variant is checked against
independent references in test_sam_asam.py and test_xsam.py.)

Every layout maps a variant's group step in the same way (pipeline/groups.py),
whatever the variant, so the battery runs the pairs that can fail apart:
every variant under a sequential map over chunks and under vectorized chunks
inside shard_map's per-device step, and every layout under the variants
whose step carries what a layout could mishandle -- a state beyond the
diagnostics (friendly_sam's average, looksam's stored direction), a key and
a `lax.cond` whose branch every group must agree on (random_sam). esam's
per-example selection is checked under every layout against its own
reference in variants/test_esam.py, bsam's noise in variants/test_bsam_layout.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from variants import LAYOUT_VARIANTS

DEVICES = 8
BATCH = 64
MESH = jax.make_mesh((DEVICES,), ('d',))
REPLICATED = NamedSharding(MESH, P())
SPLIT = NamedSharding(MESH, P('d'))


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params['w1'] + params['b1'])
  return jnp.mean((h @ params['w2'] - y) ** 2)


_keys = jax.random.split(jax.random.key(1), 5)
PARAMS = {'w1': jax.random.normal(_keys[0], (5, 6)),
          'b1': 0.1 * jax.random.normal(_keys[1], (6,)),
          'w2': jax.random.normal(_keys[2], (6, 2))}
X = jax.random.normal(_keys[3], (BATCH, 5))
Y = jax.random.normal(_keys[4], (BATCH, 2))
RHO = 0.2

# layout, examples per perturbation group, whether it runs per device.
LAYOUTS = {
    'chunks_sequential': (sam_optax.Chunks(8), 8, False),
    'chunks_vectorized': (sam_optax.Chunks(8, mode='vectorized'), 8, False),
    'chunks_on_mesh': (sam_optax.Chunks(
        8, mode=sam_optax.mesh_chunks(MESH, 'd')), 8, False),
    'chunks_shared': (sam_optax.Chunks(16, shared=True), BATCH, False),
    'per_device': (sam_optax.PerDevice('d'), 8, True),
    'per_device_sync': (sam_optax.PerDevice('d', sync=True), BATCH, True),
    'per_device_chunks': (sam_optax.PerDevice('d', chunks=sam_optax.Chunks(
        4, mode='vectorized')), 4, True),
}


EVERY_VARIANT_UNDER = ('chunks_sequential', 'per_device_chunks')
EVERY_LAYOUT_UNDER = ('sam', 'friendly_sam', 'looksam', 'random_sam')
PAIRS = [(variant, name) for variant in LAYOUT_VARIANTS for name in LAYOUTS
         if name in EVERY_VARIANT_UNDER or variant.name in EVERY_LAYOUT_UNDER]


@functools.cache
def _reference(name, m):
  variant = {v.name: v for v in LAYOUT_VARIANTS}[name]
  tx = variant.make(loss_fn, rho=RHO)
  # One compiled update for the equal-shaped groups (and, cached, for every
  # layout with the same m).
  alone = jax.jit(lambda x, y: tx.update(
      jax.grad(loss_fn)(PARAMS, x, y), tx.init(PARAMS), PARAMS, x=x, y=y))
  outs, states = zip(*[alone(X[i * m:(i + 1) * m], Y[i * m:(i + 1) * m])
                       for i in range(BATCH // m)])
  mean = lambda trees: jax.tree.map(lambda *v: np.mean(v, axis=0), *trees)
  return mean(outs), mean(states)


def reference(variant, m):
  """The variant alone on each group of m examples, averaged over groups."""
  return _reference(variant.name, m)


def run(variant, layout, per_device):
  tx = variant.make(loss_fn, rho=RHO, layout=layout)
  state = tx.init(PARAMS)
  if not per_device:
    if isinstance(layout, sam_optax.Chunks) and layout.shared:
      _, grads = sam_optax.chunked_value_and_grad(loss_fn, layout.m)(
          PARAMS, x=X, y=Y)
    else:
      grads = jax.grad(loss_fn)(PARAMS, X, Y)
    batch = (sam_optax.shard_batch({'x': X, 'y': Y}, MESH, 'd')
             if isinstance(layout.mode, sam_optax.MeshChunks)
             else {'x': X, 'y': Y})
    return jax.jit(tx.update)(grads, state, PARAMS, **batch)

  def step(params, state, x, y):
    local = jax.lax.pcast(params, 'd', to='varying')
    return tx.update(jax.grad(loss_fn)(local, x, y), state, params, x=x, y=y)

  fn = jax.jit(jax.shard_map(step, mesh=MESH,
                             in_specs=(P(), P(), P('d'), P('d')),
                             out_specs=(P(), P())))
  params, state = jax.device_put((PARAMS, state), REPLICATED)
  return fn(params, state, *jax.device_put((X, Y), SPLIT))


def test_the_pairs_cover_every_variant_and_every_layout():
  assert {v.name for v, _ in PAIRS} == {v.name for v in LAYOUT_VARIANTS}
  assert {name for _, name in PAIRS} == set(LAYOUTS)
  assert set(EVERY_LAYOUT_UNDER) <= {v.name for v in LAYOUT_VARIANTS}


@pytest.mark.parametrize('variant,layout_name', PAIRS,
                         ids=[f'{v.name}-{name}' for v, name in PAIRS])
def test_variant_under_layout(variant, layout_name):
  layout, m, per_device = LAYOUTS[layout_name]
  out, state = run(variant, layout, per_device)
  want_out, want_state = reference(variant, m)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(want_out)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  # The diagnostics mean the same under every layout: the mean over the
  # perturbation groups of each group's own value.
  for field in state._fields:  # a field may be a pytree (looksam's g_v)
    for got, want in zip(jax.tree.leaves(getattr(state, field)),
                         jax.tree.leaves(getattr(want_state, field))):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                 rtol=2e-4, atol=2e-5, err_msg=field)
