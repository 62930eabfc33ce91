"""SAM with Flax NNX, BatchNorm and Dropout: the four things to get right.

A Flax NNX MLP (Linear -> BatchNorm -> ReLU -> Dropout, twice, and a linear
read-out) is trained on MNIST-1D (generated locally by the ``mnist1d``
package, no download) with ``optax.chain(sam_optax.sam(loss_fn, rho,
has_aux=True), optax.adamw(...))``, in NNX's functional style: the model is
split once with ``nnx.split(model, nnx.Param, nnx.BatchStat)`` and the
jitted train step works on the two states.

The four traps, and how the code below avoids them:

1. ``nnx.merge(graphdef, params, batch_stats, copy=True)`` inside the loss.
   The states from ``nnx.split`` hold ``nnx.Variable`` objects, and merging
   without ``copy=True`` puts those very objects into the model: the forward
   pass in training mode then writes the new running statistics into the
   caller's ``batch_stats``. Inside a gradient pass (a deeper trace than the
   jitted step that holds ``batch_stats``) that raises flax's
   ``TraceContextError`` ("Cannot mutate BatchStat from a different trace
   level"); called eagerly it silently overwrites the statistics. (Merging ``nnx.as_pure`` states, plain
   arrays, is the other way out.)
2. The batch statistics are closed over by ``loss_fn`` -- ``make_loss_fn(
   graphdef, batch_stats)`` is called inside the step -- not passed to
   ``tx.update`` as a keyword. Every keyword argument with a leading
   dimension counts as per-example data for the chunk layouts
   (``layout=sam_optax.Chunks(m)``, ``--chunks``), which would take a
   (hidden,) mean for a batch: an error when ``hidden`` differs from the
   batch size, chunks of statistics when it does not. Since ``loss_fn`` changes every step, so
   does the transformation built on it: ``make_tx(loss_fn)`` is called
   inside the jitted step (an optax transformation is a pair of pure
   functions, so this costs nothing at run time; its state does not depend
   on the loss, so it is initialized once). ``nnx.Optimizer`` holds one
   transformation built once, which is why it is not used here; for a model
   whose only state is ``nnx.Param`` it forwards ``update``'s keyword
   arguments to SAM as they are.
3. The running statistics come from the clean pass only: the step stores the
   aux of its own ``value_and_grad`` at w, and SAM drops the aux of its
   perturbed pass at w + eps (``has_aux=True``). On the first and the last
   step the example checks that the stored statistics are the clean pass's
   and shows how far those of w + eps would have been.
4. The dropout mask is the same in both passes: a typed key
   (``jax.random.key``, a scalar, so no chunk layout splits it) is passed to
   ``tx.update(..., dropout_key=key)``, which forwards it to ``loss_fn``;
   the loss builds ``nnx.Rngs(dropout=key)`` from it in each pass. On the
   first and the last step the example checks that the perturbed loss SAM
   records equals L(w + eps) computed by hand with that key (eps = rho g /
   ||g||), and that another key would have given another value.

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
from typing import Any, Callable, Optional, Sequence

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
  """(Linear, BatchNorm, ReLU, Dropout) x 2 and a linear read-out.

  Its state is parameters (``nnx.Param``) and running statistics
  (``nnx.BatchStat``). Training mode and the dropout key are arguments of
  the call, not attributes: the graphdef stays the same in training and
  evaluation, and the model holds no ``nnx.Rngs`` whose counter SAM's two
  passes would advance differently.
  """

  def __init__(self, din: int, hidden: int, dout: int, dropout: float, *,
               rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(din, hidden, rngs=rngs)
    self.norm1 = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
    self.linear2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.norm2 = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
    self.out = nnx.Linear(hidden, dout, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, *, train: bool,
               dropout_key: Optional[jax.Array] = None):
    # A fresh Rngs from the same key gives the same masks on every call.
    rngs = nnx.Rngs(dropout=dropout_key) if train else None
    for linear, norm in ((self.linear1, self.norm1),
                         (self.linear2, self.norm2)):
      x = nnx.relu(norm(linear(x), use_running_average=not train))
      x = self.dropout(x, deterministic=not train, rngs=rngs)
    return self.out(x)


def make_loss_fn(graphdef, batch_stats) -> Callable[..., Any]:
  """``loss_fn(params, x, y, dropout_key) -> (loss, new_batch_stats)``.

  ``batch_stats`` (this step's running statistics) is closed over, so that
  ``tx.update`` is given only the batch and the key.
  """

  def loss_fn(params, x, y, dropout_key):
    # copy=True: the model gets its own Variables; the forward pass below
    # updates the running statistics in *them*, not in `batch_stats`.
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = model(x, train=True, dropout_key=dropout_key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, nnx.state(model, nnx.BatchStat)

  return loss_fn


def make_tx_factory(args) -> Callable[[Callable[..., Any]], Any]:
  """``make_tx(loss_fn)``: the optimizer of ``args``, for one step's loss."""
  layout = None if args.chunks is None else sam_optax.Chunks(args.chunks)

  def make_tx(loss_fn):
    base = optax.adamw(args.lr, weight_decay=args.weight_decay)
    if args.method == 'none':
      return base
    front = sam_optax.sam if args.method == 'sam' else sam_optax.asam
    return optax.chain(
        front(loss_fn, rho=args.rho, has_aux=True, layout=layout), base)

  return make_tx


def make_steps(graphdef, make_tx, rho: float):
  """The jitted train step, evaluation, and the reference passes."""

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y, dropout_key):
    loss_fn = make_loss_fn(graphdef, batch_stats)
    # The clean pass: the gradient SAM starts from, and the new statistics.
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, x, y, dropout_key)
    # Keyword arguments travel tx.update -> loss_fn: the same batch and the
    # same dropout key (hence mask) at w + eps. Its aux is dropped.
    updates, opt_state = make_tx(loss_fn).update(
        grads, opt_state, params, x=x, y=y, dropout_key=dropout_key)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  @jax.jit
  def evaluate_batch(params, batch_stats, x, y):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = model(x, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses.sum(), jnp.sum(jnp.argmax(logits, -1) == y)

  def evaluate(params, batch_stats, x, y, batch_size: int):
    """Mean loss and accuracy, in batches of one shape (one compile)."""
    loss = correct = 0.0
    for i in range(0, len(x), batch_size):
      batch_loss, batch_correct = evaluate_batch(
          params, batch_stats, x[i:i + batch_size], y[i:i + batch_size])
      loss, correct = loss + float(batch_loss), correct + float(batch_correct)
    return loss / len(x), correct / len(x)

  @jax.jit
  def reference(params, batch_stats, x, y, dropout_key):
    """The clean and the perturbed pass by hand.

    Returns the clean statistics, the perturbed ones, L(w + eps) with
    ``dropout_key`` and L(w + eps) with another key (another mask).
    """
    loss_fn = make_loss_fn(graphdef, batch_stats)
    (_, clean), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, x, y, dropout_key)
    norm = optax.tree.norm(grads)
    eps = jax.tree.map(lambda g: rho * g / jnp.maximum(norm, 1e-12), grads)
    perturbed_params = optax.apply_updates(params, eps)
    perturbed_loss, perturbed = loss_fn(perturbed_params, x, y, dropout_key)
    other_mask_loss, _ = loss_fn(perturbed_params, x, y,
                                 jax.random.fold_in(dropout_key, 1))
    return clean, perturbed, perturbed_loss, other_mask_loss

  return train_step, evaluate, reference


def _max_gap(a, b) -> float:
  return max(float(jnp.max(jnp.abs(u - v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_step(reference, before, stored_stats, sam_state, x, y, key,
               check_perturbed_loss: bool) -> float:
  """Checks one SAM step's wiring; returns the clean-vs-perturbed stats gap.

  ``before`` is ``(params, batch_stats)`` going into the step. The stored
  statistics must be the clean pass's (and not w + eps's); with
  ``check_perturbed_loss`` (plain SAM on the whole batch) the perturbed loss
  in SAM's state must be L(w + eps) under the same dropout mask (to float
  precision), and another mask must give a visibly different value.
  """
  clean, perturbed, perturbed_loss, other_mask_loss = reference(
      *before, x, y, key)
  for got, want in zip(jax.tree.leaves(stored_stats), jax.tree.leaves(clean)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  gap = _max_gap(clean, perturbed)
  assert gap > 0, 'the perturbed pass should see other statistics'
  assert _max_gap(stored_stats, perturbed) > 0.5 * gap
  if check_perturbed_loss:
    np.testing.assert_allclose(sam_state.perturbed_loss, perturbed_loss,
                               rtol=1e-5)
    assert abs(float(other_mask_loss - perturbed_loss)) > 1e-5 * abs(
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
              rngs=nnx.Rngs(args.seed))
  # Raises if the model holds any other state (an nnx.Rngs, say).
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  make_tx = make_tx_factory(args)
  # The state does not depend on the loss: any step's loss_fn will do.
  opt_state = make_tx(make_loss_fn(graphdef, batch_stats)).init(params)
  train_step, evaluate, reference = make_steps(graphdef, make_tx, args.rho)
  sharpness_aware = args.method != 'none'

  key = jax.random.key(args.seed + 1)
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
        key, dropout_key = jax.random.split(key)
        before = (params, batch_stats)
        params, batch_stats, opt_state, loss = train_step(
            params, batch_stats, opt_state, x, y, dropout_key)
        losses.append(loss)
        if sharpness_aware:
          # The diagnostics live in the SAM state, the first in the chain.
          perturbed.append(opt_state[0].perturbed_loss)
          first = epoch == 0 and i == 0
          if first or (epoch == args.epochs - 1 and i == steps_per_epoch - 1):
            gaps.append(check_step(
                reference, before, batch_stats, opt_state[0], x, y,
                dropout_key, check_perturbed_loss=(
                    args.method == 'sam' and args.chunks is None)))
        bar.update()
  seconds = time.perf_counter() - start

  test_loss, test_acc = evaluate(params, batch_stats, x_test, y_test,
                                 args.batch_size)
  train_loss, train_acc = evaluate(params, batch_stats, x_train, y_train,
                                   args.batch_size)
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
