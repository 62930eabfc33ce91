"""A Flax NNX character transformer with dropout, trained with SAM through nnx.Optimizer.

A tiny decoder-only transformer (embedding, one pre-norm block: causal
``nnx.MultiHeadAttention`` with dropout, ``nnx.LayerNorm``, an MLP with
``nnx.Dropout``), its ``nnx.Rngs`` held by the model as in the Flax
tutorials, trained by ``nnx.Optimizer`` with ``sam_optax.sam`` before AdamW.
The SAM step is the plain AdamW step plus one line. The dropout masks of the
perturbed pass are checked against L(w + eps) recomputed by hand, with
eps = rho g / ||g||, from the step's snapshot (its RNG state) and from the
next step's.
"""

from __future__ import annotations

import difflib
import inspect

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import sam_optax
import sam_optax.nnx

VOCAB, SEQ, WIDTH, HEADS, BATCH = 16, 8, 16, 2, 8
DROPOUT, RHO, LR = 0.2, 0.05, 1e-2


class Block(nnx.Module):
  """Pre-norm block: causal attention with dropout, then an MLP with dropout."""

  def __init__(self, rngs: nnx.Rngs):
    self.attention_norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        HEADS, WIDTH, dropout_rate=DROPOUT, deterministic=False, decode=False,
        rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.up = nnx.Linear(WIDTH, 4 * WIDTH, rngs=rngs)
    self.dropout = nnx.Dropout(DROPOUT, rngs=rngs)
    self.down = nnx.Linear(4 * WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    causal = nnx.make_causal_mask(x[..., 0])
    x = x + self.attention(self.attention_norm(x), mask=causal)
    hidden = self.dropout(nnx.gelu(self.up(self.mlp_norm(x))))
    return x + self.down(hidden)


class CharTransformer(nnx.Module):
  """Token and position embeddings, one block, LayerNorm, logits."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.position = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (SEQ, WIDTH)))
    self.block = Block(rngs)
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[...]
    return self.head(self.norm(self.block(x)))


def loss(model, batch):
  logits = model(batch['inputs'])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['targets']).mean()


def adamw_step(model, optimizer, batch):
  loss_value, grads = nnx.value_and_grad(loss)(model, batch)
  optimizer.update(model, grads)
  return loss_value


def sam_step(model, optimizer, batch):
  before = sam_optax.nnx.snapshot(model)
  loss_value, grads = nnx.value_and_grad(loss)(model, batch)
  optimizer.update(model, grads, snapshot=before, batch=batch)
  return loss_value


def random_batch(seed: int, size: int = BATCH):
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (size, SEQ + 1))
  return {'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
          'targets': jnp.asarray(tokens[:, 1:], jnp.int32)}


def sam_optimizer(model, **options):
  tx = optax.chain(
      sam_optax.sam(sam_optax.nnx.loss_fn(loss), rho=RHO, **options),
      optax.adamw(LR))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def new_model():
  return CharTransformer(nnx.Rngs(params=0, dropout=1))


def test_sam_step_is_the_adamw_step_plus_one_line():
  plain = inspect.getsource(adamw_step).splitlines()
  with_sam = inspect.getsource(sam_step).splitlines()
  assert len(with_sam) == len(plain) + 1
  diff = [line for line in difflib.ndiff(plain[1:], with_sam[1:])
          if line[:1] in '+-']
  assert diff == [
      '+   before = sam_optax.nnx.snapshot(model)',
      '-   optimizer.update(model, grads)',
      '+   optimizer.update(model, grads, snapshot=before, batch=batch)',
  ]


@nnx.jit
def observed_step(model, optimizer, batch):
  """`sam_step`, also returning what the mask test recomputes by hand.

  One compiled program for both tests below (nnx.jit caches on the model's
  structure, the same for every `new_model()`).
  """
  before = sam_optax.nnx.snapshot(model)
  loss_value, grads = nnx.value_and_grad(loss)(model, batch)
  optimizer.update(model, grads, snapshot=before, batch=batch)
  return (loss_value, before, nnx.as_pure(grads),
          optimizer.opt_state[0].perturbed_loss[...])


def test_transformer_with_dropout_trains_with_sam_and_adamw():
  model = new_model()
  optimizer = sam_optimizer(model)
  batch = random_batch(0)
  losses = [float(observed_step(model, optimizer, batch)[0])
            for _ in range(30)]
  assert all(np.isfinite(losses))
  assert abs(losses[0] - np.log(VOCAB)) < 0.5  # starts near chance
  # Dropout makes single steps noisy: compare the ends, with a margin.
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  # One clean pass a step: each dropout stream moved on by 30 draws.
  assert int(model.block.dropout.rngs.count[...]) == 30


def point_loss(before, grads, rng_source):
  """L(w + rho g / ||g||) on the model of `before`, drawing the RNG of `rng_source`."""
  params = nnx.as_pure(nnx.state(
      nnx.merge(before.graphdef, before.state), nnx.Param))
  g = nnx.as_pure(grads)
  norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
  point = jax.tree.map(lambda w, d: w + RHO * d / norm, params, g)
  model = before.model(point)
  rng_model = nnx.merge(rng_source.graphdef, rng_source.state)
  nnx.update(model, nnx.state(rng_model, nnx.RngState))
  return loss(model, random_batch(0))


def mlp_mask(snapshot):
  """The MLP dropout mask that a pass starting from `snapshot` draws."""
  model = nnx.merge(snapshot.graphdef, snapshot.state)
  return model.block.dropout(jnp.ones((BATCH, SEQ, 4 * WIDTH))) != 0


def test_dropout_masks_same_in_both_passes_and_new_each_step():
  model = new_model()
  optimizer = sam_optimizer(model)
  batch = random_batch(0)
  steps = [observed_step(model, optimizer, batch)[1:] for _ in range(3)]
  recompute = jax.jit(point_loss)
  for (before, grads, perturbed), (after, _, _) in zip(steps, steps[1:]):
    same = float(recompute(before, grads, before))
    other = float(recompute(before, grads, after))
    perturbed = float(perturbed)
    # The perturbed pass drew the clean pass's masks (the snapshot's RNG) ...
    np.testing.assert_allclose(perturbed, same, rtol=1e-5)
    # ... and the next step's RNG state draws other masks, another loss.
    assert abs(perturbed - other) > 1e-3, (perturbed, other)
    mask, next_mask = mlp_mask(before), mlp_mask(after)
    assert 0.6 < float(mask.mean()) < 0.95  # about 1 - DROPOUT kept
    assert np.any(np.asarray(mask != next_mask))


def test_per_device_sam_inside_shard_map_on_8_devices():
  mesh = jax.make_mesh((8,), ('batch',))
  model = new_model()
  optimizer = sam_optimizer(model, layout=sam_optax.PerDevice('batch'))
  graphdef, state = nnx.split((model, optimizer))

  def varying(x):
    return 'batch' in jax.typeof(x).manual_axis_type.varying

  def device_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    # Each device's own gradient: its parameters marked varying over 'batch'.
    nnx.update(model, jax.lax.pcast(nnx.as_pure(nnx.state(model, nnx.Param)),
                                    'batch', to='varying'))
    value = sam_step(model, optimizer, batch)
    new = nnx.as_pure(nnx.state((model, optimizer)))
    spread = jax.lax.pmax(jnp.max(jnp.stack([
        jnp.max(jnp.abs(x - jax.lax.pmean(x, 'batch')))
        for x in jax.tree.leaves(new) if varying(x)])), 'batch')
    new = jax.tree.map(
        lambda x: jax.lax.pmean(x, 'batch') if varying(x) else x, new)
    return new, jax.lax.pmean(value, 'batch'), spread

  step = jax.jit(jax.shard_map(device_step, mesh=mesh,
                               in_specs=(P(), P('batch')),
                               out_specs=(P(), P(), P())))
  state = jax.device_put(nnx.as_pure(state), NamedSharding(mesh, P()))
  batch = jax.device_put(random_batch(0, 16), NamedSharding(mesh, P('batch')))
  losses = []
  for _ in range(5):
    state, value, spread = step(state, batch)
    losses.append(float(value))
    # The all-reduced update keeps the device copies of the weights equal.
    assert float(spread) < 1e-6
  assert losses[-1] < losses[0] - 0.3, losses
