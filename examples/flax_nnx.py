"""SAM with Flax NNX: ``nnx.Optimizer`` forwards keyword arguments to SAM.

A Flax NNX MLP with dropout is trained on MNIST-1D (generated locally by the
``mnist1d`` package, no download) with ``optax.chain(sam_optax.sam(...),
optax.adamw(...))`` inside ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

How the pieces fit:

* ``loss_fn(params, **batch)`` takes the ``nnx.State`` of the parameters (the
  pure arrays that ``nnx.Optimizer`` hands to ``tx.update``) and rebuilds the
  model with ``nnx.merge(graphdef, params)`` inside;
* the clean pass differentiates the same loss through ``nnx.value_and_grad``;
* ``optimizer.update(model, grads, x=x, y=y, dropout_key=key)`` forwards the
  keyword arguments to ``tx.update``, which forwards them to ``loss_fn`` for
  the perturbed pass -- the same batch and the same dropout key, hence the
  same dropout mask, in both passes;
* ``adamw``'s weight decay acts on the clean weights w, not on w + eps.

Run::

  python examples/flax_nnx.py
  python examples/flax_nnx.py --method asam --rho 0.5
  python examples/flax_nnx.py --quick
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

from flax import nnx
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


class MLP(nnx.Module):
  """Two hidden layers with dropout; parameters are its only state."""

  def __init__(self, din: int, hidden: int, dout: int, dropout: float, *,
               rngs: nnx.Rngs):
    self.hidden1 = nnx.Linear(din, hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, dout, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, dropout_key: Optional[jax.Array] = None):
    # An explicit key (not an nnx.Rngs held by the model) keeps the model's
    # state to its parameters and lets SAM replay the same mask.
    deterministic = dropout_key is None
    rngs = None if deterministic else nnx.Rngs(dropout=dropout_key)
    x = nnx.relu(self.hidden1(x))
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    x = nnx.relu(self.hidden2(x))
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    return self.out(x)


def model_loss(model: MLP, x, y, dropout_key=None):
  logits = model(x, dropout_key)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_loss_fn(graphdef):
  """SAM's handle: a loss of the parameters' ``nnx.State``."""

  def loss_fn(params, x, y, dropout_key):
    model = nnx.merge(graphdef, params)
    return model_loss(model, x, y, dropout_key)

  return loss_fn


@nnx.jit
def train_step(model, optimizer, x, y, dropout_key):
  loss, grads = nnx.value_and_grad(model_loss)(model, x, y, dropout_key)
  # Keyword arguments travel optimizer.update -> tx.update -> loss_fn.
  optimizer.update(model, grads, x=x, y=y, dropout_key=dropout_key)
  return loss


@nnx.jit
def evaluate_batch(model, x, y):
  logits = model(x)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return losses.sum(), jnp.sum(jnp.argmax(logits, -1) == y)


def evaluate(model, x, y, batch_size: int):
  """Mean loss and accuracy, in batches of one shape (one compile)."""
  loss = correct = 0.0
  for i in range(0, len(x), batch_size):
    batch_loss, batch_correct = evaluate_batch(
        model, x[i:i + batch_size], y[i:i + batch_size]
    )
    loss, correct = loss + float(batch_loss), correct + float(batch_correct)
  return loss / len(x), correct / len(x)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--method', choices=('sam', 'asam', 'none'),
                      default='sam', help="'none': plain adamw")
  parser.add_argument('--rho', type=float, default=None,
                      help='default: 0.05 for sam, 0.5 for asam')
  parser.add_argument('--epochs', type=int, default=20)
  parser.add_argument('--batch-size', type=int, default=100)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--dropout', type=float, default=0.1)
  parser.add_argument('--lr', type=float, default=3e-3)
  parser.add_argument('--weight-decay', type=float, default=1e-4)
  parser.add_argument('--num-samples', type=int, default=5000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny run that takes a few seconds')
  args = parser.parse_args(argv)
  if args.quick:
    args.epochs, args.num_samples, args.hidden, args.batch_size = 2, 500, 32, 50
  if args.rho is None:
    args.rho = 0.5 if args.method == 'asam' else 0.05
  if args.rho < 0:
    parser.error(f'--rho must be >= 0, got {args.rho}.')
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  (x_train, y_train), (x_test, y_test) = load_mnist1d(
      args.num_samples, args.seed
  )
  model = MLP(x_train.shape[1], args.hidden, 10, args.dropout,
              rngs=nnx.Rngs(args.seed))
  # Raises if the model holds state other than nnx.Param (batch statistics,
  # an nnx.Rngs): such state would have to be passed to loss_fn too.
  graphdef, _ = nnx.split(model, nnx.Param)
  loss_fn = make_loss_fn(graphdef)

  base = optax.adamw(args.lr, weight_decay=args.weight_decay)
  if args.method == 'sam':
    tx = optax.chain(sam_optax.sam(loss_fn, rho=args.rho), base)
  elif args.method == 'asam':
    tx = optax.chain(sam_optax.asam(loss_fn, rho=args.rho), base)
  else:
    tx = base
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  key = jax.random.key(args.seed + 1)
  rng = np.random.default_rng(args.seed)
  steps_per_epoch = len(x_train) // args.batch_size
  losses, perturbed = [], []
  start = time.perf_counter()
  desc = 'adamw' if args.method == 'none' else f'{args.method} rho={args.rho:g}'
  with tqdm.tqdm(total=args.epochs * steps_per_epoch, desc=desc,
                 disable=args.no_progress) as bar:
    for _ in range(args.epochs):
      order = rng.permutation(len(x_train))
      for i in range(steps_per_epoch):
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        key, dropout_key = jax.random.split(key)
        loss = train_step(model, optimizer, x_train[idx], y_train[idx],
                          dropout_key)
        losses.append(loss)
        if args.method != 'none':
          # The diagnostics live in the SAM state, the first in the chain.
          state = nnx.as_pure(optimizer.opt_state)
          perturbed.append(optax.tree.get(state, 'perturbed_loss'))
        bar.update()
  seconds = time.perf_counter() - start

  test_loss, test_acc = evaluate(model, x_test, y_test, args.batch_size)
  train_loss, train_acc = evaluate(model, x_train, y_train, args.batch_size)
  losses = np.asarray(losses)
  result = {
      'method': args.method,
      'rho': args.rho,
      'steps': int(optimizer.step[...]),
      'train_loss': float(train_loss),
      'train_acc': float(train_acc),
      'test_loss': float(test_loss),
      'test_acc': float(test_acc),
      'first_loss': float(losses[0]),
      'last_loss': float(losses[-10:].mean()),
      'seconds': seconds,
  }
  print(f'\n{desc}: {result["steps"]} steps in {seconds:.1f} s; '
        f'train loss {result["train_loss"]:.3f} (acc {train_acc:.3f}), '
        f'test loss {result["test_loss"]:.3f} (acc {test_acc:.3f})')
  if perturbed:
    gap = np.asarray(perturbed)[-steps_per_epoch:] - losses[-steps_per_epoch:]
    result['perturbed_minus_clean'] = float(gap.mean())
    print(f'last epoch: mean L(w + eps) - L(w) = {gap.mean():.4f} '
          '(read from the SAM state)')
  return result


if __name__ == '__main__':
  main()
