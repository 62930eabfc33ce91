"""SAM with Flax NNX, BatchNorm and Dropout, on ``nnx.Optimizer``.

A Flax NNX MLP (Linear -> BatchNorm -> ReLU -> Dropout, twice, and a linear
read-out) is trained on MNIST-1D (generated locally by the ``mnist1d``
package, no download) with ``nnx.Optimizer(model, optax.chain(
sam_optax.sam(sam_optax.nnx.loss_fn(loss)), optax.adamw(...)),
wrt=nnx.Param)``. The model holds its RNG stream (``nnx.Dropout(rate,
rngs=rngs)``) and its running statistics, as in the Flax tutorials; the
loss is the plain loop's ``loss(model, x, y)``.

The train step is the plain AdamW step plus one line: ``before =
sam_optax.nnx.snapshot(model)``, taken before the clean pass and passed to
``optimizer.update(model, grads, snapshot=before, x=x, y=y)``. SAM's
perturbed pass runs on a copy of the model rebuilt from the snapshot at
w + eps, so

1. it draws the dropout mask the clean pass drew (the snapshot holds the
   RNG count before the clean pass advanced it), and the next step draws a
   new one;
2. the running statistics are the clean pass's: the copy's are dropped.

On the first and the last step the example checks both by hand (plain
``nnx.split`` / ``nnx.merge``, eps = rho g / ||g||): the stored statistics
are the clean pass's and not those of w + eps, and the perturbed loss SAM
records is L(w + eps) under the clean pass's mask -- under the next mask
(a snapshot taken after the clean pass) it would be another value. See
docs/guide/frameworks.md for the pitfalls this avoids.

``adamw``'s weight decay acts on the clean weights w, not on w + eps.

Run::

  python examples/flax_nnx.py
  python examples/flax_nnx.py --method asam --rho 0.5
  python examples/flax_nnx.py --chunks 25     # m-sharpness, 25 per chunk
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
import sam_optax.nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mnist1d_common  # noqa: E402  (MNIST-1D, generated locally)


def load_mnist1d(num_samples: int, seed: int):
  """MNIST-1D generated locally (80% train, 20% test), clean labels."""
  data = mnist1d_common.load_data(num_samples, data_seed=seed)
  return (data['x'], data['y']), (data['x_test'], data['y_test'])


class MLP(nnx.Module):
  """(Linear, BatchNorm, ReLU, Dropout) x 2 and a linear read-out.

  Its state is parameters (``nnx.Param``), running statistics
  (``nnx.BatchStat``) and the dropout stream's key and count. ``model.train()``
  and ``model.eval()`` switch dropout and the statistics.
  """

  def __init__(self, din: int, hidden: int, dout: int, dropout: float, *,
               rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(din, hidden, rngs=rngs)
    self.norm1 = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
    self.linear2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.norm2 = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
    self.out = nnx.Linear(hidden, dout, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x):
    for linear, norm in ((self.linear1, self.norm1),
                         (self.linear2, self.norm2)):
      x = self.dropout(nnx.relu(norm(linear(x))))
    return self.out(x)


def loss_fn(model: MLP, x, y):
  """The plain loop's loss, unchanged for SAM."""
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_tx(args):
  """The optimizer of ``args`` (an optax.chain: it takes keyword arguments)."""
  base = optax.adamw(args.lr, weight_decay=args.weight_decay)
  if args.method == 'none':
    return optax.chain(base)
  # A chunk layout splits x and y; the snapshot goes whole to every chunk.
  layout = None if args.chunks is None else sam_optax.Chunks(
      args.chunks, batch_argnames=('x', 'y'))
  front = sam_optax.sam if args.method == 'sam' else sam_optax.asam
  return optax.chain(
      front(sam_optax.nnx.loss_fn(loss_fn), rho=args.rho, layout=layout),
      base)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
  before = sam_optax.nnx.snapshot(model)  # the one line SAM adds
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads, snapshot=before, x=x, y=y)
  return loss


@nnx.jit
def evaluate_batch(model: MLP, x, y):
  logits = model(x)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return losses.sum(), jnp.sum(jnp.argmax(logits, -1) == y)


def evaluate(model: MLP, x, y, batch_size: int):
  """Mean loss and accuracy with the running statistics, in equal batches."""
  model.eval()
  loss = correct = 0.0
  for i in range(0, len(x), batch_size):
    batch_loss, batch_correct = evaluate_batch(
        model, x[i:i + batch_size], y[i:i + batch_size])
    loss, correct = loss + float(batch_loss), correct + float(batch_correct)
  model.train()
  return loss / len(x), correct / len(x)


def make_reference(graphdef, rho: float):
  """The clean and the perturbed pass by hand, with nnx.split / nnx.merge."""

  def loss_and_rest(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest)
    loss = loss_fn(model, x, y)
    return loss, nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))

  @jax.jit
  def reference(params, rest, x, y):
    """Clean statistics, perturbed ones, L(w + eps) with the clean mask and
    with the next mask (the RNG count the clean pass leaves)."""
    (_, clean), grads = jax.value_and_grad(loss_and_rest, has_aux=True)(
        params, rest, x, y)
    norm = optax.tree.norm(grads)
    eps = jax.tree.map(lambda g: rho * g / jnp.maximum(norm, 1e-12), grads)
    point = optax.apply_updates(params, eps)
    perturbed_loss, perturbed = loss_and_rest(point, rest, x, y)
    next_mask_loss, _ = loss_and_rest(point, clean, x, y)
    return clean, perturbed, perturbed_loss, next_mask_loss

  return reference


def _stats(state):
  """The running statistics of a pure state (their paths end in mean / var)."""
  return {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
      state)[0] if jax.tree_util.keystr(path[-1:]) in ("['mean']", "['var']")}


def _max_gap(a: dict, b: dict) -> float:
  return max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in a)


def check_step(reference, before, model, sam_state, x, y,
               check_perturbed_loss: bool) -> float:
  """Checks one SAM step; returns the clean-vs-perturbed statistics gap.

  ``before`` is ``(params, rest)`` split from the model before the step.
  The model's statistics must be the clean pass's (and not w + eps's); with
  ``check_perturbed_loss`` (plain SAM on the whole batch) the perturbed loss
  in SAM's state must be L(w + eps) under the clean pass's dropout mask (to
  float precision), and the next mask must give a visibly different value.
  """
  clean, perturbed, perturbed_loss, next_mask_loss = reference(*before, x, y)
  clean, perturbed = _stats(clean), _stats(perturbed)
  stored = _stats(nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param))))
  for k, want in clean.items():
    np.testing.assert_allclose(stored[k], want, rtol=1e-5, atol=1e-6)
  gap = _max_gap(clean, perturbed)
  assert gap > 0, 'the perturbed pass should see other statistics'
  assert _max_gap(stored, perturbed) > 0.5 * gap
  if check_perturbed_loss:
    got = float(sam_state.perturbed_loss[...])
    np.testing.assert_allclose(got, perturbed_loss, rtol=1e-5)
    assert abs(float(next_mask_loss - perturbed_loss)) > 1e-5 * abs(
        float(perturbed_loss)), 'another dropout mask should show'
  return gap


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--method', choices=('sam', 'asam', 'none'),
                      default='sam', help="'none': plain adamw")
  parser.add_argument('--rho', type=float, default=None,
                      help='default: 0.05 for sam, 0.5 for asam')
  parser.add_argument('--chunks', type=int, default=None, metavar='M',
                      help='m-sharpness: one perturbation per M examples '
                      '(layout=sam_optax.Chunks(M)); M divides the batch')
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
  if args.chunks is not None and (args.method == 'none'
                                  or args.batch_size % args.chunks):
    parser.error('--chunks M needs --method sam or asam and an M that'
                 f' divides --batch-size {args.batch_size}.')
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  (x_train, y_train), (x_test, y_test) = load_mnist1d(
      args.num_samples, args.seed)
  model = MLP(x_train.shape[1], args.hidden, 10, args.dropout,
              rngs=nnx.Rngs(args.seed, dropout=args.seed + 1))
  optimizer = nnx.Optimizer(model, make_tx(args), wrt=nnx.Param)
  reference = make_reference(nnx.graphdef(model), args.rho)
  sharpness_aware = args.method != 'none'

  rng = np.random.default_rng(args.seed)
  steps_per_epoch = len(x_train) // args.batch_size
  losses, perturbed, gaps = [], [], []
  start = time.perf_counter()
  desc = 'adamw' if not sharpness_aware else f'{args.method} rho={args.rho:g}'
  if args.chunks is not None:
    desc += f' m={args.chunks}'
  with tqdm.tqdm(total=args.epochs * steps_per_epoch, desc=desc,
                 disable=args.no_progress) as bar:
    for epoch in range(args.epochs):
      order = rng.permutation(len(x_train))
      for i in range(steps_per_epoch):
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        x, y = x_train[idx], y_train[idx]
        checked = sharpness_aware and (
            (epoch == 0 and i == 0)
            or (epoch == args.epochs - 1 and i == steps_per_epoch - 1))
        if checked:
          _, params, rest = nnx.split(model, nnx.Param, ...)
          before = (nnx.as_pure(params), nnx.as_pure(rest))
        losses.append(train_step(model, optimizer, x, y))
        if sharpness_aware:
          # The diagnostics live in the SAM state, the first in the chain.
          sam_state = optimizer.opt_state[0]
          perturbed.append(sam_state.perturbed_loss[...])
          if checked:
            gaps.append(check_step(
                reference, before, model, sam_state, x, y,
                check_perturbed_loss=(
                    args.method == 'sam' and args.chunks is None)))
        bar.update()
  seconds = time.perf_counter() - start

  test_loss, test_acc = evaluate(model, x_test, y_test, args.batch_size)
  train_loss, train_acc = evaluate(model, x_train, y_train, args.batch_size)
  losses = np.asarray(losses)
  result = {
      'method': args.method,
      'rho': args.rho,
      'chunks': args.chunks,
      'steps': len(losses),
      'train_loss': float(train_loss),
      'train_acc': float(train_acc),
      'test_loss': float(test_loss),
      'test_acc': float(test_acc),
      'first_loss': float(losses[0]),
      'last_loss': float(losses[-10:].mean()),
      'stats_gap': gaps,
      'seconds': seconds,
  }
  print(f'\n{desc}: {result["steps"]} steps in {seconds:.1f} s; '
        f'train loss {result["train_loss"]:.3f} (acc {train_acc:.3f}), '
        f'test loss {result["test_loss"]:.3f} (acc {test_acc:.3f}) '
        '(evaluated with the running statistics)')
  if perturbed:
    gap = np.asarray(perturbed)[-steps_per_epoch:] - losses[-steps_per_epoch:]
    result['perturbed_minus_clean'] = float(gap.mean())
    print(f'last epoch: mean L(w + eps) - L(w) = {gap.mean():.4f} '
          '(read from the SAM state)')
    print('running statistics came from the clean pass (checked on the first '
          'and last step); the perturbed pass would have changed them by up '
          'to ' + ', '.join(f'{g:.2e}' for g in gaps))
  return result


if __name__ == '__main__':
  main()
