"""The study's NNX ViT and transformer LM under PerDevice SAM on 8 devices, checked against per-device SAM by hand."""

from __future__ import annotations

import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sam_optax

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / 'benchmarks'
RHO, DEVICES = 0.05, 8


@pytest.fixture(scope='module', params=['vit_digits', 'char_lm'])
def task(request):
  paths = [str(BENCHMARKS), str(BENCHMARKS / 'tasks')]
  sys.path[:0] = paths
  yield importlib.import_module(request.param).TASK
  for path in paths:
    sys.path.remove(path)


def per_device_sam_by_hand(task, params, model_state, batch, key):
  """The mean over the 8 shards of grad L_i(w + rho g_i / ||g_i||)."""
  def shard_sam(shard):
    loss = lambda w: task.loss(w, batch=shard, model_state=model_state,
                               key=key)[0]
    g = jax.grad(loss)(params)
    norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
    point = jax.tree.map(lambda w, d: w + RHO * d / norm, params, g)
    return jax.grad(loss)(point)
  shards = jax.tree.map(
      lambda x: x.reshape(DEVICES, x.shape[0] // DEVICES, *x.shape[1:]), batch)
  grads = [shard_sam(jax.tree.map(lambda x, i=i: x[i], shards))
           for i in range(DEVICES)]
  return jax.tree.map(lambda *g: sum(g) / DEVICES, *grads)


@pytest.mark.slow
def test_per_device_sam_on_8_devices_is_per_device_sam(task):
  size = 'quick'
  data = {k: jnp.asarray(v) for k, v in task.load(size, 0).items()}
  params, model_state = task.init(jax.random.key(0), size)
  key = jax.random.key(1)
  batch = task.sample_batch(data, key, size)
  mesh = jax.make_mesh((DEVICES,), ('batch',))
  tx = sam_optax.sam(task.loss, rho=RHO, has_aux=True,
                     layout=sam_optax.PerDevice('batch'))

  def device_step(params, batch):
    local = jax.lax.pcast(params, 'batch', to='varying')
    (value, _), g = jax.value_and_grad(task.loss, has_aux=True)(
        local, batch=batch, model_state=model_state, key=key)
    updates, state = tx.update(g, tx.init(params), params, batch=batch,
                               model_state=model_state, key=key)
    return updates, state.perturbed_loss, jax.lax.pmean(value, 'batch')

  step = jax.jit(jax.shard_map(device_step, mesh=mesh,
                               in_specs=(P(), P('batch')),
                               out_specs=(P(), P(), P())))
  updates, perturbed, value = step(
      jax.device_put(params, NamedSharding(mesh, P())),
      sam_optax.shard_batch(batch, mesh, 'batch'))
  assert float(perturbed) > float(value)  # the climb went up

  expected = per_device_sam_by_hand(task, params, model_state, batch, key)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(expected))
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                               rtol=1e-4, atol=1e-5 * scale)
  # Not whole-batch SAM: each device climbs along its own gradient.
  whole = sam_optax.sam(task.loss, rho=RHO, has_aux=True)
  g = jax.grad(lambda w: task.loss(w, batch=batch, model_state=model_state,
                                   key=key)[0])(params)
  whole_updates = whole.update(g, whole.init(params), params, batch=batch,
                               model_state=model_state, key=key)[0]
  assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
      jax.tree.leaves(whole_updates), jax.tree.leaves(expected))) > 1e-3 * scale
