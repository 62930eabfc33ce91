"""SAM with Flax Linen and BatchNorm: running statistics from the clean pass.

A small 1-D CNN with BatchNorm is trained on MNIST-1D (generated locally by
the ``mnist1d`` package, no download) on ``sam_optax.linen.TrainState`` with
``optax.chain(sam_optax.sam(sam_loss, has_aux=True), optax.sgd(...))``.

``sam_loss = sam_optax.linen.loss_fn(model.apply, loss)`` turns the loss
written for the model, ``loss(model, x, y)`` with ``model(x, train=True)``,
into ``sam_loss(params, *, batch_stats, rngs, x, y) -> (loss,
new_batch_stats)`` (``apply`` with ``mutable=['batch_stats']``). The train
step's clean pass takes its gradient *and* the new running statistics; SAM's
perturbed pass at w + eps calls the same function and drops its aux, so the
running statistics never see the perturbed weights -- as in the original SAM
code. On the first and the last step the example shows the difference this
makes: the statistics stored in the state (the clean pass's) against those a
forward pass at w + eps would have produced (eps = rho g / ||g||, written out
by hand here with ``model.apply``).

flax's ``TrainState.apply_gradients`` calls ``tx.update`` without keyword
arguments, so the perturbed pass could not get the batch;
``sam_optax.linen.TrainState`` adds a ``batch_stats`` field and forwards
``loss_kwargs`` (with the statistics the clean pass started from).

Run::

  python examples/flax_linen_batchnorm.py
  python examples/flax_linen_batchnorm.py --quick
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import sam_optax
import sam_optax.linen

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mnist1d_common  # noqa: E402  (MNIST-1D, generated locally)


def load_mnist1d(num_samples: int, seed: int):
  """MNIST-1D generated locally (80% train, 20% test), clean labels."""
  data = mnist1d_common.load_data(num_samples, data_seed=seed)
  return (data['x'], data['y']), (data['x_test'], data['y_test'])


class CNN(nn.Module):
  """Two Conv-BatchNorm-ReLU blocks, global average pooling, a dense head."""

  channels: int = 32

  @nn.compact
  def __call__(self, x, train: bool):
    x = x[..., None]  # (batch, length, 1 channel)
    for features, stride in ((self.channels, 1), (2 * self.channels, 2)):
      x = nn.Conv(features, (5,), strides=stride, use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
    return nn.Dense(10)(x.mean(axis=1))


def loss(model, x, y):
  """The loss written for the model: ``model(x, train=True)`` is its apply."""
  logits = model(x, train=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_steps(model: CNN, rho: float):
  """The jitted train step, evaluation and the clean-pass check."""
  sam_loss = sam_optax.linen.loss_fn(model.apply, loss)

  @jax.jit
  def train_step(state: sam_optax.linen.TrainState, x, y):
    # Clean pass: gradient and the new running statistics.
    (value, new_stats), grads = jax.value_and_grad(sam_loss, has_aux=True)(
        state.params, batch_stats=state.batch_stats, x=x, y=y)
    # SAM's perturbed pass gets x, y and this state's batch_stats; its aux
    # (the statistics at w + eps) is dropped.
    state = state.apply_gradients(grads=grads, batch_stats=new_stats,
                                  loss_kwargs={'x': x, 'y': y})
    return state, value

  @jax.jit
  def evaluate_batch(state, x, y):
    logits = model.apply(
        {'params': state.params, 'batch_stats': state.batch_stats},
        x,
        train=False,
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses.sum(), jnp.sum(jnp.argmax(logits, -1) == y)

  def evaluate(state, x, y, batch_size: int):
    """Mean loss and accuracy, in batches of one shape (one compile)."""
    total = correct = 0.0
    for i in range(0, len(x), batch_size):
      batch_loss, batch_correct = evaluate_batch(
          state, x[i:i + batch_size], y[i:i + batch_size]
      )
      total, correct = total + float(batch_loss), correct + float(batch_correct)
    return total / len(x), correct / len(x)

  def loss_by_hand(params, batch_stats, x, y):
    logits, mutated = model.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True,
        mutable=['batch_stats'])
    value = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return value, mutated['batch_stats']

  @jax.jit
  def reference_stats(state, x, y):
    """Running statistics of a clean and of a perturbed pass, by hand."""
    grads, clean = jax.grad(loss_by_hand, has_aux=True)(
        state.params, state.batch_stats, x, y
    )
    norm = optax.tree.norm(grads)
    eps = jax.tree.map(lambda g: rho * g / jnp.maximum(norm, 1e-12), grads)
    _, perturbed = loss_by_hand(
        optax.apply_updates(state.params, eps), state.batch_stats, x, y
    )
    return clean, perturbed

  return sam_loss, train_step, evaluate, reference_stats


def check_clean_statistics(before, after, x, y, reference_stats) -> float:
  """Shows that ``after.batch_stats`` are the clean pass's, not w + eps's.

  A sanity check of this example's wiring (it stores the clean pass's aux;
  the transformation drops its own). Returns the largest difference between
  the statistics of the clean and the perturbed pass (what would have been
  stored had the perturbed pass's aux been kept).
  """
  clean, perturbed = reference_stats(before, x, y)
  stored = jax.tree.leaves(after.batch_stats)
  for got, want in zip(stored, jax.tree.leaves(clean)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  gap = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(perturbed))
  )
  assert gap > 0, 'the perturbed pass should see other statistics'
  # And the stored statistics are not those of the perturbed pass.
  far = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(stored, jax.tree.leaves(perturbed))
  )
  assert far > 0.5 * gap, (far, gap)
  return gap


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rho', type=float, default=0.05)
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=100)
  parser.add_argument('--channels', type=int, default=32)
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--num-samples', type=int, default=5000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny run that takes a few seconds')
  args = parser.parse_args(argv)
  if args.quick:
    args.epochs, args.num_samples, args.channels, args.batch_size = (
        2, 500, 8, 50)
  if args.rho <= 0:
    parser.error(f'--rho must be > 0 for this demonstration, got {args.rho}.')
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  (x_train, y_train), (x_test, y_test) = load_mnist1d(
      args.num_samples, args.seed
  )
  model = CNN(channels=args.channels)
  variables = model.init(jax.random.key(args.seed), x_train[:2], train=False)
  sam_loss, train_step, evaluate, reference_stats = make_steps(model, args.rho)
  tx = optax.chain(
      sam_optax.sam(sam_loss, rho=args.rho, has_aux=True),
      optax.sgd(args.lr, momentum=0.9),
  )
  state = sam_optax.linen.TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      tx=tx,
  )

  rng = np.random.default_rng(args.seed)
  steps_per_epoch = len(x_train) // args.batch_size
  total = args.epochs * steps_per_epoch
  gaps = []
  start = time.perf_counter()
  with tqdm.tqdm(total=total, desc=f'sam rho={args.rho:g}',
                 disable=args.no_progress) as bar:
    for epoch in range(args.epochs):
      order = rng.permutation(len(x_train))
      for i in range(steps_per_epoch):
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        x, y = x_train[idx], y_train[idx]
        before = state
        state, loss = train_step(state, x, y)
        first = epoch == 0 and i == 0
        if first or (epoch == args.epochs - 1 and i == steps_per_epoch - 1):
          gaps.append(check_clean_statistics(before, state, x, y,
                                             reference_stats))
        bar.update()
  seconds = time.perf_counter() - start

  test_loss, test_acc = evaluate(state, x_test, y_test, args.batch_size)
  train_loss, train_acc = evaluate(state, x_train, y_train, args.batch_size)
  result = {
      'steps': int(state.step),
      'train_loss': float(train_loss),
      'train_acc': float(train_acc),
      'test_loss': float(test_loss),
      'test_acc': float(test_acc),
      'last_batch_loss': float(loss),
      'perturbed_loss': float(state.opt_state[0].perturbed_loss),
      'stats_gap': gaps,
      'seconds': seconds,
  }
  print(f'\nsam rho={args.rho:g}: {result["steps"]} steps in {seconds:.1f} s; '
        f'train loss {train_loss:.3f} (acc {train_acc:.3f}), '
        f'test loss {test_loss:.3f} (acc {test_acc:.3f})')
  print('running statistics came from the clean pass (checked on the first '
        'and last step); the perturbed pass would have changed them by up to '
        + ', '.join(f'{g:.2e}' for g in gaps))
  return result


if __name__ == '__main__':
  main()
