"""SAM with Equinox: an ``eqx.nn.MLP``, ``eqx.partition`` and ``eqx.combine``.

An ``eqx.nn.MLP`` is trained on MNIST-1D (generated locally by the
``mnist1d`` package, no download) with ``optax.chain(sam_optax.sam(loss_fn,
rho), optax.sgd(lr, momentum))``; ``--rho 0`` is exactly SGD.

How the pieces fit:

* ``params, static = eqx.partition(model, eqx.is_inexact_array)`` splits the
  model once into its trainable arrays (a model-shaped pytree with ``None``
  elsewhere) and the rest (the activation functions, the sizes);
* ``loss_fn(params, x, y)`` -- SAM's handle -- closes over ``static`` and
  rebuilds the model with ``eqx.combine(params, static)``, so SAM can call it
  at the perturbed weights w + eps, which it builds leaf by leaf (the
  ``None`` leaves are no leaves at all to ``jax.tree.map``);
* the jitted step (``eqx.filter_jit``) takes the clean gradient with
  ``jax.value_and_grad(loss_fn)`` and calls ``tx.update(grads, opt_state,
  params, x=x, y=y)``: the keyword arguments go on to ``loss_fn`` for the
  perturbed pass, and ``eqx.apply_updates`` applies the result;
* evaluation takes the whole model, ``eqx.combine(params, static)``, through
  ``eqx.filter_jit``, which traces its arrays and keeps the rest static.

On the first step the example checks that the perturbed loss SAM records in
its state is L(w + eps) with eps = rho g / ||g|| computed by hand.

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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mnist1d_common  # noqa: E402  (MNIST-1D, generated locally)


def load_mnist1d(num_samples: int, seed: int):
  """MNIST-1D generated locally (80% train, 20% test), clean labels."""
  data = mnist1d_common.load_data(num_samples, data_seed=seed)
  return (data['x'], data['y']), (data['x_test'], data['y_test'])


def batch_loss(model, x, y):
  """Mean cross-entropy of ``model`` (one example at a time) on a batch."""
  logits = jax.vmap(model)(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_loss_fn(static):
  """SAM's handle: ``loss_fn(params, x, y)``, params from `eqx.partition`."""

  def loss_fn(params, x, y):
    return batch_loss(eqx.combine(params, static), x, y)

  return loss_fn


def make_steps(loss_fn, tx):
  """The jitted train step and evaluation."""

  @eqx.filter_jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, x=x, y=y)
    return eqx.apply_updates(params, updates), opt_state, loss

  @eqx.filter_jit
  def evaluate(model, x, y):
    logits = jax.vmap(model)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  return train_step, evaluate


@eqx.filter_jit
def perturbed_loss_by_hand(loss_fn, params, x, y, rho):
  """L(w + eps), eps = rho g / ||g||: what SAM's first step should record."""
  grads = jax.grad(loss_fn)(params, x, y)
  norm = optax.tree.norm(grads)
  eps = jax.tree.map(lambda g: rho * g / jnp.maximum(norm, 1e-12), grads)
  return loss_fn(eqx.apply_updates(params, eps), x, y)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rho', type=float, default=0.05,
                      help='0 is plain SGD with momentum')
  parser.add_argument('--epochs', type=int, default=20)
  parser.add_argument('--batch-size', type=int, default=100)
  parser.add_argument('--width', type=int, default=128)
  parser.add_argument('--depth', type=int, default=2,
                      help='hidden layers of the MLP')
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
  model = eqx.nn.MLP(x_train.shape[1], 10, args.width, args.depth,
                     key=jax.random.key(args.seed))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  loss_fn = make_loss_fn(static)
  tx = optax.chain(sam_optax.sam(loss_fn, rho=args.rho),
                   optax.sgd(args.lr, momentum=args.momentum))
  opt_state = tx.init(params)
  train_step, evaluate = make_steps(loss_fn, tx)

  rng = np.random.default_rng(args.seed)
  steps_per_epoch = len(x_train) // args.batch_size
  losses, perturbed = [], []
  expected_first = None
  desc = f'sam rho={args.rho:g}' if args.rho else 'sgd'
  start = time.perf_counter()
  with tqdm.tqdm(total=args.epochs * steps_per_epoch, desc=desc,
                 disable=args.no_progress) as bar:
    for _ in range(args.epochs):
      order = rng.permutation(len(x_train))
      for i in range(steps_per_epoch):
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        x, y = x_train[idx], y_train[idx]
        if expected_first is None:
          expected_first = float(perturbed_loss_by_hand(
              loss_fn, params, x, y, jnp.float32(args.rho)))
        params, opt_state, loss = train_step(params, opt_state, x, y)
        losses.append(float(loss))
        # The diagnostics live in the SAM state, the first in the chain.
        perturbed.append(float(opt_state[0].perturbed_loss))
        bar.update()
  seconds = time.perf_counter() - start
  np.testing.assert_allclose(perturbed[0], expected_first, rtol=1e-4,
                             atol=1e-6)

  model = eqx.combine(params, static)
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
