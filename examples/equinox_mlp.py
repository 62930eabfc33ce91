"""SAM with Equinox: an MLP with dropout in an ``eqx.filter_jit`` loop.

An MLP with dropout is trained on MNIST-1D (generated locally by the
``mnist1d`` package, no download) with ``optax.chain(sam_optax.sam(
sam_optax.equinox.loss_fn(batch_loss, model), rho), optax.sgd(lr,
momentum))``; ``--rho 0`` is exactly SGD.

How the pieces fit:

* ``batch_loss(model, x, y, key)`` is written the Equinox way, for the whole
  model; ``sam_optax.equinox.loss_fn(batch_loss, model)`` keeps the model's
  static part (its functions and sizes) and rebuilds the model with
  ``eqx.combine`` at the weights SAM asks for, w or w + eps;
* the jitted step (``eqx.filter_jit``) takes the clean gradient with
  ``eqx.filter_value_and_grad(batch_loss)`` and calls ``tx.update(grads,
  opt_state, eqx.filter(model, eqx.is_array), x=x, y=y, key=key)``: the
  keyword arguments go on to the loss for the perturbed pass, and
  ``eqx.apply_updates`` applies the result to the model;
* the loop splits a new dropout ``key`` each step and gives it to both
  passes: the perturbed pass drops the units the clean pass dropped.

On the first step the example checks that the perturbed loss SAM records in
its state is L(w + eps) with eps = rho g / ||g|| computed by hand under the
same dropout key, and that another key would have given another value.

Run::

  python examples/equinox_mlp.py
  python examples/equinox_mlp.py --rho 0      # plain SGD with momentum
  python examples/equinox_mlp.py --quick
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import sam_optax
import sam_optax.equinox

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mnist1d_common  # noqa: E402  (MNIST-1D, generated locally)


def load_mnist1d(num_samples: int, seed: int):
  """MNIST-1D generated locally (80% train, 20% test), clean labels."""
  data = mnist1d_common.load_data(num_samples, data_seed=seed)
  return (data['x'], data['y']), (data['x_test'], data['y_test'])


class MLP(eqx.Module):
  """Linear layers with ReLU and dropout between them."""

  layers: list
  dropout: eqx.nn.Dropout

  def __init__(self, din: int, width: int, depth: int, dout: int,
               dropout: float, *, key):
    sizes = [din] + [width] * depth + [dout]
    keys = jax.random.split(key, len(sizes) - 1)
    self.layers = [eqx.nn.Linear(a, b, key=k)
                   for a, b, k in zip(sizes[:-1], sizes[1:], keys)]
    self.dropout = eqx.nn.Dropout(dropout)

  def __call__(self, x, *, key=None):
    """One example; dropout with ``key``, none without (evaluation)."""
    keys = [None] * len(self.layers) if key is None else list(
        jax.random.split(key, len(self.layers)))
    for layer, layer_key in zip(self.layers[:-1], keys):
      x = jax.nn.relu(layer(x))
      x = self.dropout(x, key=layer_key, inference=key is None)
    return self.layers[-1](x)


def batch_loss(model, x, y, key):
  """Mean cross-entropy on a batch, one dropout key per example."""
  keys = jax.random.split(key, len(x))
  logits = jax.vmap(lambda xi, ki: model(xi, key=ki))(x, keys)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_steps(tx):
  """The jitted train step and evaluation."""

  @eqx.filter_jit
  def train_step(model, opt_state, x, y, key):
    loss, grads = eqx.filter_value_and_grad(batch_loss)(model, x, y, key)
    updates, opt_state = tx.update(grads, opt_state,
                                   eqx.filter(model, eqx.is_array),
                                   x=x, y=y, key=key)
    return eqx.apply_updates(model, updates), opt_state, loss

  @eqx.filter_jit
  def evaluate(model, x, y):
    logits = jax.vmap(model)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  return train_step, evaluate


@eqx.filter_jit
def perturbed_loss_by_hand(model, x, y, key, rho):
  """L(w + eps), eps = rho g / ||g||, under ``key`` and under another key.

  Written with ``eqx.partition`` / ``eqx.combine``, without the adapter.
  """
  params, static = eqx.partition(model, eqx.is_array)
  loss = lambda p, k: batch_loss(eqx.combine(p, static), x, y, k)
  grads = jax.grad(loss)(params, key)
  norm = optax.tree.norm(grads)
  eps = jax.tree.map(lambda g: rho * g / jnp.maximum(norm, 1e-12), grads)
  point = eqx.apply_updates(params, eps)
  return loss(point, key), loss(point, jax.random.fold_in(key, 1))


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rho', type=float, default=0.05,
                      help='0 is plain SGD with momentum')
  parser.add_argument('--epochs', type=int, default=20)
  parser.add_argument('--batch-size', type=int, default=100)
  parser.add_argument('--width', type=int, default=128)
  parser.add_argument('--depth', type=int, default=2,
                      help='hidden layers of the MLP')
  parser.add_argument('--dropout', type=float, default=0.1)
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--num-samples', type=int, default=5000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny run that takes a few seconds')
  args = parser.parse_args(argv)
  if args.quick:
    args.epochs, args.num_samples, args.width, args.batch_size = 3, 500, 32, 50
  if args.rho < 0:
    parser.error(f'--rho must be >= 0, got {args.rho}.')
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  (x_train, y_train), (x_test, y_test) = load_mnist1d(
      args.num_samples, args.seed)
  key, model_key = jax.random.split(jax.random.key(args.seed))
  model = MLP(x_train.shape[1], args.width, args.depth, 10, args.dropout,
              key=model_key)
  tx = optax.chain(
      sam_optax.sam(sam_optax.equinox.loss_fn(batch_loss, model),
                    rho=args.rho),
      optax.sgd(args.lr, momentum=args.momentum))
  opt_state = tx.init(eqx.filter(model, eqx.is_array))
  train_step, evaluate = make_steps(tx)

  rng = np.random.default_rng(args.seed)
  steps_per_epoch = len(x_train) // args.batch_size
  losses, perturbed = [], []
  expected_first = other_key_first = None
  desc = f'sam rho={args.rho:g}' if args.rho else 'sgd'
  start = time.perf_counter()
  with tqdm.tqdm(total=args.epochs * steps_per_epoch, desc=desc,
                 disable=args.no_progress) as bar:
    for _ in range(args.epochs):
      order = rng.permutation(len(x_train))
      for i in range(steps_per_epoch):
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        x, y = x_train[idx], y_train[idx]
        key, dropout_key = jax.random.split(key)
        if expected_first is None:
          expected_first, other_key_first = (float(v) for v in (
              perturbed_loss_by_hand(model, x, y, dropout_key,
                                     jnp.float32(args.rho))))
        model, opt_state, loss = train_step(model, opt_state, x, y,
                                            dropout_key)
        losses.append(float(loss))
        # The diagnostics live in the SAM state, the first in the chain.
        perturbed.append(float(opt_state[0].perturbed_loss))
        bar.update()
  seconds = time.perf_counter() - start
  np.testing.assert_allclose(perturbed[0], expected_first, rtol=1e-4,
                             atol=1e-6)
  if args.dropout > 0 and args.rho > 0:
    assert abs(other_key_first - expected_first) > 1e-4 * abs(
        expected_first), 'another dropout key should show'

  test_loss, test_acc = evaluate(model, x_test, y_test)
  train_loss, train_acc = evaluate(model, x_train, y_train)
  losses, perturbed = np.asarray(losses), np.asarray(perturbed)
  gap = perturbed[-steps_per_epoch:] - losses[-steps_per_epoch:]
  result = {
      'rho': args.rho,
      'steps': len(losses),
      'train_loss': float(train_loss),
      'train_acc': float(train_acc),
      'test_loss': float(test_loss),
      'test_acc': float(test_acc),
      'first_loss': float(losses[0]),
      'last_loss': float(losses[-steps_per_epoch:].mean()),
      'perturbed_minus_clean': float(gap.mean()),
      'first_perturbed_loss': float(perturbed[0]),
      'first_perturbed_loss_by_hand': expected_first,
      'seconds': seconds,
  }
  print(f'\n{desc}: {result["steps"]} steps in {seconds:.1f} s; '
        f'train loss {result["train_loss"]:.3f} (acc {train_acc:.3f}), '
        f'test loss {result["test_loss"]:.3f} (acc {test_acc:.3f})')
  print(f'last epoch: mean L(w + eps) - L(w) = {gap.mean():.4f} (read from '
        f'the SAM state); first step: {perturbed[0]:.5f} recorded, '
        f'{expected_first:.5f} by hand')
  return result


if __name__ == '__main__':
  main()
