"""The framework adapters against SAM written out by hand in each framework.

Each adapter trains a tiny model with dropout and BatchNorm through the
framework's own optimizer wrapper (``nnx.Optimizer``, a Linen
``TrainState``, an ``eqx.filter_jit`` loop) and must match, to float
tolerance, SAM written by hand with split / merge (eps = rho g / ||g||, the
same dropout key in both passes, the clean pass's statistics kept). A probe
model reads the dropout mask of each pass off the gradients.
"""

from __future__ import annotations

import subprocess
import sys

import equinox as eqx
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
import sam_optax.equinox
import sam_optax.linen
import sam_optax.nnx

RHO, LR, STEPS, RATE = 0.1, 0.1, 3, 0.5
X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).normal(size=(8, 1)), jnp.float32)


def sam_by_hand(loss_and_aux, params, *args):
  """One SAM step written out: (loss, clean aux, update, perturbed aux)."""
  (loss, aux), g0 = jax.value_and_grad(loss_and_aux, has_aux=True)(
      params, *args)
  norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(g0)))
  point = jax.tree.map(lambda p, g: p + RHO * g / norm, params, g0)
  g, perturbed_aux = jax.grad(loss_and_aux, has_aux=True)(point, *args)
  new = jax.tree.map(lambda p, u: p - LR * u, params, g)
  return loss, aux, new, perturbed_aux


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def max_gap(a, b) -> float:
  """The largest difference between two trees' leaves (bools as 0 / 1)."""
  return max(float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def sam_then_sgd(loss_fn, **options):
  return optax.chain(sam_optax.sam(loss_fn, rho=RHO, **options),
                     optax.sgd(LR))


# ---------------------------------------------------------------- Flax NNX


class NNXNet(nnx.Module):
  """Linear -> BatchNorm -> Dropout (holding its Rngs) -> Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
    self.dropout = nnx.Dropout(RATE, rngs=rngs)
    self.linear2 = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, x):
    return self.linear2(self.dropout(self.norm(self.linear1(x))))


def nnx_loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def nnx_train_step():
  """The adapter's step: one line (the snapshot) more than plain AdamW's."""

  @nnx.jit
  def train_step(model, optimizer, x, y):
    before = sam_optax.nnx.snapshot(model)
    loss, grads = nnx.value_and_grad(nnx_loss)(model, x, y)
    optimizer.update(model, grads, snapshot=before, x=x, y=y)
    return loss

  return train_step


def test_importing_sam_optax_imports_no_framework():
  code = ('import sys, sam_optax; bad = [m for m in sys.modules if'
          " m.split('.')[0] in ('flax', 'equinox')]; assert not bad, bad")
  subprocess.run([sys.executable, '-c', code], check=True)


def test_nnx_adapter_matches_split_merge_by_hand():
  model = NNXNet(nnx.Rngs(0, dropout=1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  @jax.jit
  def by_hand(params, rest):
    def loss_and_rest(params, rest):
      m = nnx.merge(graphdef, params, rest)
      loss = nnx_loss(m, X, Y)
      return loss, tuple(nnx.as_pure(nnx.state(m, kind)) for kind in (
          nnx.Not(nnx.Param), nnx.BatchStat))
    return sam_by_hand(loss_and_rest, params, rest)

  optimizer = nnx.Optimizer(model, sam_then_sgd(sam_optax.nnx.loss_fn(
      nnx_loss)), wrt=nnx.Param)
  train_step = nnx_train_step()
  for _ in range(STEPS):
    want_loss, (rest, clean), params, (_, perturbed) = by_hand(params, rest)
    loss = train_step(model, optimizer, X, Y)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)), params)
    stats = nnx.as_pure(nnx.state(model, nnx.BatchStat))
    assert_trees_close(stats, clean)
    # The perturbed pass saw other statistics; the model kept the clean's.
    gap = max_gap(clean, perturbed)
    assert gap > 1e-4 and max_gap(stats, perturbed) > 0.5 * gap
    # One clean pass per step advances the dropout stream by one.
  assert int(model.dropout.rngs.count[...]) == STEPS


class Probe(nnx.Module):
  """loss = sum(dropout(1) * w): its gradient is the dropout mask / (1 - p)."""

  def __init__(self, rngs: nnx.Rngs):
    self.w = nnx.Param(jnp.zeros(64))
    self.dropout = nnx.Dropout(RATE, rngs=rngs)

  def __call__(self):
    return jnp.sum(self.dropout(jnp.ones(64)) * self.w)


def probe_loss(model):
  return model()


def nnx_probe_masks(loss_fn, take_snapshot: bool):
  """(clean, perturbed) masks of STEPS steps through nnx.Optimizer.

  With sgd(1) after SAM the update is -grad L(w + eps), so -update is the
  perturbed pass's mask / (1 - p), and the clean gradient the clean pass's.
  """
  model = Probe(nnx.Rngs(0, dropout=1))
  tx = optax.chain(sam_optax.sam(loss_fn, rho=RHO), optax.sgd(1.0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    kwargs = {'snapshot': sam_optax.nnx.snapshot(model)} if (
        take_snapshot) else {}
    grads = nnx.grad(probe_loss)(model)
    updates = optimizer.update(model, grads, **kwargs)
    return grads['w'][...] > 0, -updates['w'] > 0

  masks = [train_step(model, optimizer) for _ in range(STEPS)]
  return [np.asarray(c) for c, _ in masks], [np.asarray(p) for _, p in masks]


def test_nnx_dropout_mask_same_in_both_passes_and_new_each_step():
  clean, perturbed = nnx_probe_masks(sam_optax.nnx.loss_fn(probe_loss),
                                     take_snapshot=True)
  for c, p in zip(clean, perturbed):
    np.testing.assert_array_equal(p, c)
    assert 10 < c.sum() < 54  # a mask, about half kept
  for a, b in zip(clean, clean[1:]):
    assert np.any(a != b)


def test_nnx_closed_over_rngs_reuse_the_first_mask():
  """The pitfall the snapshot avoids: a loss_fn closing over the RNG state.

  The model split once outside the step, ``loss_fn`` merging the closed-over
  state: its RNG count is a constant, so every perturbed pass draws the
  step-0 mask while the clean passes move on.
  """
  graphdef, _, frozen = nnx.split(Probe(nnx.Rngs(0, dropout=1)),
                                  nnx.Param, ...)

  def closed_over(params):
    return probe_loss(nnx.merge(graphdef, params, frozen, copy=True))

  clean, perturbed = nnx_probe_masks(closed_over, take_snapshot=False)
  np.testing.assert_array_equal(perturbed[0], clean[0])
  for p in perturbed[1:]:
    np.testing.assert_array_equal(p, clean[0])  # the step-0 mask again
  assert np.any(perturbed[1] != clean[1])


def test_nnx_loss_given_straight_to_sam_names_the_adapter():
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))

  def loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  optimizer = nnx.Optimizer(model, sam_then_sgd(loss), wrt=nnx.Param)
  grads = nnx.grad(loss)(model, X, Y)
  with pytest.raises(TypeError, match=r'sam_optax\.nnx\.loss_fn\(loss\)'):
    optimizer.update(model, grads, x=X, y=Y)


def test_nnx_adapter_without_snapshot_says_how():
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, sam_then_sgd(sam_optax.nnx.loss_fn(
      nnx_loss)), wrt=nnx.Param)
  grads = nnx.grad(nnx_loss)(model, X, Y)
  with pytest.raises(TypeError, match=r'snapshot\(model\)` before'):
    optimizer.update(model, grads, x=X, y=Y)


def test_nnx_adapter_keeps_the_loss_own_errors():
  """A bug inside an adapted loss is not blamed on the missing adapter."""

  def buggy(model, x):
    return model(x).mean() + None

  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, sam_then_sgd(sam_optax.nnx.loss_fn(
      buggy)), wrt=nnx.Param)
  grads = nnx.grad(lambda m: m(X).mean())(model)
  with pytest.raises(TypeError, match='unsupported operand') as info:
    optimizer.update(model, grads, snapshot=sam_optax.nnx.snapshot(model),
                     x=X)
  assert 'sam_optax.nnx.loss_fn(loss)' not in str(info.value)


def test_nnx_snapshot_split_by_chunks_is_an_error_and_batch_argnames_fix_it():
  """A chunk layout must not split the snapshot as if it were per-example."""

  class Scale(nnx.Module):

    def __init__(self, size):
      self.w = nnx.Param(jnp.linspace(0.5, 1.0, size))

    def __call__(self, x):
      return x[:, 0] * jnp.sum(self.w)

  def loss(model, x):
    return jnp.mean(model(x) ** 2)

  def step(size, layout):
    model = Scale(size)
    optimizer = nnx.Optimizer(model, sam_then_sgd(
        sam_optax.nnx.loss_fn(loss), layout=layout), wrt=nnx.Param)
    grads = nnx.grad(loss)(model, X)
    optimizer.update(model, grads, snapshot=sam_optax.nnx.snapshot(model),
                     x=X)
    return model.w[...]

  # A parameter with one row per example (8): split with x, unless named.
  with pytest.raises(ValueError, match='snapshot.*batch_argnames'):
    step(8, sam_optax.Chunks(4))
  moved = step(5, sam_optax.Chunks(4, batch_argnames=('x',)))
  assert np.all(np.isfinite(moved))
  assert np.all(moved < jnp.linspace(0.5, 1.0, 5))


# ---------------------------------------------------------------- Linen


class LinenNet(nn.Module):
  """Dense -> BatchNorm -> Dropout -> Dense."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(
        nn.Dense(4)(x))
    return nn.Dense(1)(nn.Dropout(RATE, deterministic=not train)(x))


def linen_loss(model, x, y):
  return jnp.mean((model(x, train=True) - y) ** 2)


def test_linen_adapter_and_train_state_match_apply_by_hand():
  net = LinenNet()
  variables = net.init(jax.random.key(0), X, train=False)
  sam_loss = sam_optax.linen.loss_fn(net.apply, linen_loss)
  state = sam_optax.linen.TrainState.create(
      apply_fn=net.apply, params=variables['params'],
      batch_stats=variables['batch_stats'],
      tx=sam_then_sgd(sam_loss, has_aux=True))

  @jax.jit
  def train_step(state, key):
    rngs = {'dropout': key}
    (loss, stats), grads = jax.value_and_grad(sam_loss, has_aux=True)(
        state.params, batch_stats=state.batch_stats, rngs=rngs, x=X, y=Y)
    state = state.apply_gradients(grads=grads, batch_stats=stats,
                                  loss_kwargs=dict(rngs=rngs, x=X, y=Y))
    return state, loss

  @jax.jit
  def by_hand(params, batch_stats, key):
    def loss_and_stats(params):
      out, mutated = net.apply(
          {'params': params, 'batch_stats': batch_stats}, X, train=True,
          rngs={'dropout': key}, mutable=['batch_stats'])
      return jnp.mean((out - Y) ** 2), mutated['batch_stats']
    return sam_by_hand(loss_and_stats, params)

  params, stats = variables['params'], variables['batch_stats']
  for step in range(STEPS):
    key = jax.random.key(10 + step)
    want_loss, clean, params, perturbed = by_hand(params, stats, key)
    stats = clean
    state, loss = train_step(state, key)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_trees_close(state.params, params)
    assert_trees_close(state.batch_stats, clean)
    gap = max_gap(clean, perturbed)
    assert gap > 1e-4 and max_gap(state.batch_stats, perturbed) > 0.5 * gap
  assert int(state.step) == STEPS


def test_linen_stock_train_state_gives_the_batch_to_nobody():
  """flax's TrainState.apply_gradients forwards no keywords: ours does."""
  from flax.training import train_state  # pylint: disable=g-import-not-at-top

  def loss_fn(params, x, y):
    return jnp.mean((x @ params['w'] - y) ** 2)

  params = {'w': jnp.ones((3, 1))}
  grads = jax.grad(loss_fn)(params, X, Y)
  stock = train_state.TrainState.create(apply_fn=None, params=params,
                                        tx=sam_then_sgd(loss_fn))
  with pytest.raises(TypeError, match=r'x=x, y=y.*sam_optax\.linen\.Train'):
    stock.apply_gradients(grads=grads)
  ours = sam_optax.linen.TrainState.create(apply_fn=None, params=params,
                                           tx=sam_then_sgd(loss_fn))
  ours = ours.apply_gradients(grads=grads, loss_kwargs=dict(x=X, y=Y))
  _, _, want, _ = sam_by_hand(lambda p: (loss_fn(p, X, Y), None), params)
  assert_trees_close(ours.params, want)


# ---------------------------------------------------------------- Equinox


class EqxNet(eqx.Module):
  """Linear -> BatchNorm (an eqx.nn.State) -> Dropout -> Linear."""

  linear1: eqx.nn.Linear
  norm: eqx.nn.BatchNorm
  dropout: eqx.nn.Dropout
  linear2: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.linear1 = eqx.nn.Linear(3, 4, key=k1)
    self.norm = eqx.nn.BatchNorm(4, axis_name='batch', momentum=0.5,
                                 mode='ema')
    self.dropout = eqx.nn.Dropout(RATE)
    self.linear2 = eqx.nn.Linear(4, 1, key=k2)

  def __call__(self, x, state, key):
    h, state = self.norm(self.linear1(x), state)
    return self.linear2(self.dropout(h, key=key)), state


def eqx_loss(model, model_state, x, y, key):
  keys = jax.random.split(key, x.shape[0])
  out, model_state = jax.vmap(model, axis_name='batch', in_axes=(0, None, 0),
                              out_axes=(0, None))(x, model_state, keys)
  return jnp.mean((out - y) ** 2), model_state


def test_equinox_adapter_matches_combine_by_hand():
  model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
  sam_loss = sam_optax.equinox.loss_fn(eqx_loss, model)
  tx = sam_then_sgd(sam_loss, has_aux=True)
  opt_state = tx.init(eqx.filter(model, eqx.is_array))

  @eqx.filter_jit
  def train_step(model, state, opt_state, key):
    (loss, new_state), grads = eqx.filter_value_and_grad(
        eqx_loss, has_aux=True)(model, state, X, Y, key)
    updates, opt_state = tx.update(
        grads, opt_state, eqx.filter(model, eqx.is_array), model_state=state,
        x=X, y=Y, key=key)
    return eqx.apply_updates(model, updates), new_state, opt_state, loss

  # BatchNorm's state index holds a bool array: the reference moves the
  # float leaves only.
  params, static = eqx.partition(model, eqx.is_inexact_array)

  @eqx.filter_jit
  def by_hand(params, state, key):
    def loss_and_state(params):
      return eqx_loss(eqx.combine(params, static), state, X, Y, key)
    return sam_by_hand(loss_and_state, params)

  want_state = state
  for step in range(STEPS):
    key = jax.random.key(10 + step)
    want_loss, clean, params, perturbed = by_hand(params, want_state, key)
    want_state = clean
    model, state, opt_state, loss = train_step(model, state, opt_state, key)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_trees_close(eqx.filter(model, eqx.is_inexact_array), params)
    assert_trees_close(state, clean)
    gap = max_gap(clean, perturbed)
    assert gap > 1e-4 and max_gap(state, perturbed) > 0.5 * gap


def test_equinox_loss_given_straight_to_sam_names_the_adapter():
  model = eqx.nn.MLP(3, 1, 4, 1, key=jax.random.key(0))

  def loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)

  params = eqx.filter(model, eqx.is_array)
  grads = eqx.filter_grad(loss)(model, X, Y)

  def update(loss_fn):
    tx = sam_then_sgd(loss_fn)
    return eqx.filter_jit(tx.update)(grads, tx.init(params), params, x=X,
                                     y=Y)[0]

  with pytest.raises(TypeError, match=r'sam_optax\.equinox\.loss_fn'):
    update(loss)
  # The adapter is the fix.
  updates = update(sam_optax.equinox.loss_fn(loss, model))
  static = eqx.filter(model, eqx.is_array, inverse=True)
  _, _, want, _ = sam_by_hand(
      lambda p: (loss(eqx.combine(p, static), X, Y), None), params)
  assert_trees_close(eqx.apply_updates(params, updates), want)
