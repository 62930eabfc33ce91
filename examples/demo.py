"""The main demo: SGD vs SAM, ASAM and XSAM on MNIST-1D with label noise.

Trains the same small 1-D CNN (examples/mnist1d_common.py) with each
optimizer from the same initialization and data order, then prints a table
(test accuracy, final train loss, the top Hessian eigenvalue of the training
loss at the final weights, time per step and its ratio to SGD's) and writes a
plot of test accuracy over epochs. MNIST-1D is generated locally by the
`mnist1d` package; nothing is downloaded. Every sharpness-aware optimizer is
the same base optimizer (SGD with momentum) with one transformation chained
in front of it.

How the times are measured: the optimizers train side by side, in turn, one
epoch each (round-robin, each round starting one optimizer later than the
last), so a load on the machine that comes and goes falls on all of them
alike. Every epoch function is compiled before training; the first epoch of
each optimizer is a warm-up and is not timed. "ms / step" is the median over
the timed epochs; "x SGD" is the median, over the same rounds, of the
optimizer's epoch time divided by SGD's in that round. With fewer than two
epochs, or without SGD among the optimizers, the missing figures print as
"-": nothing is shown that was not measured this way.

  python examples/demo.py                      # the defaults, about 30 s
  python examples/demo.py --noise 0 --epochs 40 --optimizers sgd sam
  python examples/demo.py --quick              # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import mnist1d_common as m1d  # noqa: E402
import sam_optax  # noqa: E402
from sam_optax import sharpness  # noqa: E402

LEARNING_RATE, MOMENTUM = 0.05, 0.9

# The settings of each optimizer in this demo: the best of small sweeps on
# this very CNN and data (benchmarks/results/xsam_defaults.md for SAM and
# XSAM; ASAM's rho from {0.5, 1, 2} at 20% label noise, see the README).
# `steps_per_epoch` lets XSAM probe once per epoch, as in its paper.
OPTIMIZERS = {
    'sgd': ('SGD', lambda loss_fn, steps_per_epoch: None),
    'sam': ('SAM rho=0.15', lambda loss_fn, steps_per_epoch: sam_optax.sam(
        loss_fn, rho=0.15)),
    'asam': ('ASAM rho=1.0', lambda loss_fn, steps_per_epoch: sam_optax.asam(
        loss_fn, rho=1.0)),
    'xsam': ('XSAM rho=0.15', lambda loss_fn, steps_per_epoch: sam_optax.xsam(
        loss_fn, rho=0.15, rho_max=0.15, probe_every=steps_per_epoch)),
}


def make_tx_factory(name, steps_per_epoch, epochs):
  """make_tx(loss_fn): the optimizer in front of SGD with a cosine schedule."""
  front = OPTIMIZERS[name][1]

  def make_tx(loss_fn):
    learning_rate = optax.cosine_decay_schedule(LEARNING_RATE,
                                                steps_per_epoch * epochs)
    base = optax.sgd(learning_rate, momentum=MOMENTUM)
    sharpness_aware = front(loss_fn, steps_per_epoch)
    return base if sharpness_aware is None else optax.chain(sharpness_aware,
                                                            base)

  return make_tx


@functools.partial(jax.jit, static_argnames='num_iterations')
def _top_eigenvalue(params, batch, num_iterations):
  return sharpness.hessian_top_eigenvalue(
      m1d.loss_fn, params, num_iterations=num_iterations, tolerance=1e-3,
      loss_kwargs={'batch': batch}).eigenvalue


def top_eigenvalue(params, data, examples=1000, num_iterations=50):
  """lambda_max of the Hessian of the training loss (first `examples`)."""
  batch = {'x': jnp.asarray(data['x'][:examples]),
           'y': jnp.asarray(data['y'][:examples])}
  return float(_top_eigenvalue(params, batch, num_iterations))


@dataclasses.dataclass
class Run:
  """One optimizer's training: its compiled epoch, its state, its history.

  ``epoch_seconds`` holds the wall time of every epoch after the warm-up.
  """

  label: str
  epoch_fn: Callable[..., Any]
  params: Any
  opt_state: Any
  test_accuracy: list = dataclasses.field(default_factory=list)
  train_loss: list = dataclasses.field(default_factory=list)
  epoch_seconds: list = dataclasses.field(default_factory=list)

  @property
  def best_test_accuracy(self) -> float:
    return max(self.test_accuracy)


def round_robin(names, epochs, run_epoch, before_round=None, after_epoch=None,
                clock=time.perf_counter):
  """Runs ``run_epoch(name, epoch)`` for every epoch, the names in turn.

  Round ``e`` runs epoch ``e`` of every name, starting at name ``e mod n``
  (so no optimizer always runs first), before any name's epoch ``e + 1``.
  Only the ``run_epoch`` call is timed, and only from round 1 on: round 0 is
  the warm-up. ``run_epoch`` must return only once its work is done (block
  on the result). Untimed hooks, if given: ``before_round(epoch)`` (the
  round's data) and ``after_epoch(name, epoch)``, right after each epoch
  (evaluation, a progress bar).

  Returns:
    ``{name: [seconds of epoch 1, ..., epoch epochs - 1]}``.
  """
  names = list(names)
  seconds = {name: [] for name in names}
  for epoch in range(epochs):
    if before_round is not None:
      before_round(epoch)
    shift = epoch % len(names)
    for name in names[shift:] + names[:shift]:
      start = clock()
      run_epoch(name, epoch)
      elapsed = clock() - start
      if epoch > 0:
        seconds[name].append(elapsed)
      if after_epoch is not None:
        after_epoch(name, epoch)
  return seconds


def timing_summary(seconds, steps_per_epoch, reference='sgd'):
  """``{name: (median ms / step or None, median ratio to reference or None)}``.

  The ratio is taken round by round (epoch k of an optimizer against epoch
  k of the reference, run in the same round), then its median; None where
  there is no timed epoch or no reference.
  """
  summary = {}
  for name, times in seconds.items():
    ms = 1e3 * float(np.median(times)) / steps_per_epoch if times else None
    ratio = None
    if times and reference in seconds:
      ratio = float(np.median(np.asarray(times)
                              / np.asarray(seconds[reference])))
    summary[name] = (ms, ratio)
  return summary


def plot(runs, path, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for run in runs.values():
    epochs = np.arange(1, len(run.test_accuracy) + 1)
    ax.plot(epochs, 100 * np.asarray(run.test_accuracy), label=run.label)
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _cell(value: Optional[float], width: int, fmt: str) -> str:
  return ('-' if value is None else format(value, fmt)).rjust(width)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--noise', type=float, default=0.2,
                      help='fraction of training labels made wrong')
  parser.add_argument('--epochs', type=int, default=40,
                      help='the first is a warm-up: not timed')
  parser.add_argument('--batch-size', type=int, default=100)
  parser.add_argument('--samples', type=int, default=5000,
                      help='MNIST-1D examples in total (80%% train)')
  parser.add_argument('--optimizers', nargs='+', default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='out', help='folder for the plot')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny run (3 epochs, 1000 samples) for tests')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  eigen_iterations = 50
  if args.quick:
    args.epochs, args.samples, eigen_iterations = 3, 1000, 3
  if args.epochs < 1:
    parser.error(f'--epochs must be >= 1, got {args.epochs}.')
  names = list(dict.fromkeys(args.optimizers))

  data = m1d.load_data(num_samples=args.samples, label_noise=args.noise,
                       seed=args.seed)
  print(f'MNIST-1D: {len(data["y"])} train / {len(data["y_test"])} test'
        f' examples, {args.noise:.0%} of training labels wrong;'
        f' {args.epochs} epochs, batch {args.batch_size},'
        f' SGD momentum {MOMENTUM}, cosine learning rate from'
        f' {LEARNING_RATE}.')
  x, y = np.asarray(data['x']), np.asarray(data['y'])
  x_test, y_test = jnp.asarray(data['x_test']), jnp.asarray(data['y_test'])
  steps_per_epoch = len(y) // args.batch_size
  if steps_per_epoch == 0:
    parser.error(f'--batch-size {args.batch_size} is larger than the'
                 f' training set ({len(y)}).')

  # The same initialization for every optimizer; every epoch function is
  # compiled here, before anything is timed.
  params = m1d.init_params(jax.random.PRNGKey(args.seed))
  shape_x = jax.ShapeDtypeStruct((steps_per_epoch, args.batch_size,
                                  x.shape[1]), jnp.float32)
  shape_y = jax.ShapeDtypeStruct((steps_per_epoch, args.batch_size),
                                 jnp.int32)
  runs = {}
  for name in names:
    print(f'compiling {OPTIMIZERS[name][0]} ...', flush=True)
    tx = make_tx_factory(name, steps_per_epoch, args.epochs)(m1d.loss_fn)
    opt_state = tx.init(params)
    compiled = m1d.make_epoch_fn(tx).lower(params, opt_state, shape_x,
                                           shape_y).compile()
    runs[name] = Run(OPTIMIZERS[name][0], compiled, params, opt_state)

  # The same data order for every optimizer: one shuffle per epoch.
  rng = np.random.default_rng(args.seed)
  batches = {}

  def shuffle(epoch):
    order = rng.permutation(len(y))[:steps_per_epoch * args.batch_size]
    batches['epoch'] = epoch
    batches['xs'] = jnp.asarray(
        x[order].reshape(steps_per_epoch, args.batch_size, -1))
    batches['ys'] = jnp.asarray(
        y[order].reshape(steps_per_epoch, args.batch_size))
    jax.block_until_ready((batches['xs'], batches['ys']))


  def run_epoch(name, epoch):
    run = runs[name]
    assert batches['epoch'] == epoch
    xs, ys = batches['xs'], batches['ys']
    run.params, run.opt_state, losses = run.epoch_fn(
        run.params, run.opt_state, xs, ys)
    jax.block_until_ready((run.params, run.opt_state, losses))
    run.train_loss.append(losses)

  def after_epoch(name, epoch):
    del epoch
    run = runs[name]
    run.train_loss[-1] = float(jnp.mean(run.train_loss[-1]))
    accuracy, _ = m1d.evaluate(run.params, x_test, y_test)
    run.test_accuracy.append(float(accuracy))
    if bar is not None:
      bar.update()
      bar.set_postfix_str(f'{run.label}: test acc {float(accuracy):.3f}')

  print(f'training {", ".join(r.label for r in runs.values())} in turn,'
        ' one epoch each ...', flush=True)
  bar = None
  if not args.no_progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=args.epochs * len(names), desc='epochs, all optimizers',
               leave=False)
  seconds = round_robin(names, args.epochs, run_epoch, shuffle, after_epoch)
  if bar is not None:
    bar.close()
  for name, run in runs.items():
    run.epoch_seconds = seconds[name]
  timing = timing_summary(seconds, steps_per_epoch)
  timed_epochs = args.epochs - 1

  rows = []
  for name, run in runs.items():
    ms, ratio = timing[name]
    rows.append({
        'name': name,
        'label': run.label,
        'test_acc': 100 * run.test_accuracy[-1],
        'best_test_acc': 100 * run.best_test_accuracy,
        'train_loss': run.train_loss[-1],
        'lambda_max': top_eigenvalue(run.params, data,
                                     num_iterations=eigen_iterations),
        'ms_per_step': ms,
        'x_sgd': ratio,
        'epoch_seconds': list(run.epoch_seconds),
    })

  columns = (('optimizer', 'label', 's'), ('test acc %', 'test_acc', '.2f'),
             ('best test acc %', 'best_test_acc', '.2f'),
             ('train loss', 'train_loss', '.3f'),
             ('lambda_max', 'lambda_max', '.2f'),
             ('ms / step', 'ms_per_step', '.2f'), ('x SGD', 'x_sgd', '.2f'))
  widths = [max(len(columns[0][0]), *(len(r['label']) for r in rows))] + [
      max(len(title), 5) for title, _, _ in columns[1:]]
  print()
  print('  '.join(title.ljust(w) for (title, _, _), w in zip(columns, widths)))
  for row in rows:
    cells = [row['label'].ljust(widths[0])] + [
        _cell(row[key], w, fmt)
        for (_, key, fmt), w in zip(columns[1:], widths[1:])]
    print('  '.join(cells))
  print('\n(test acc: after the last epoch; lambda_max: top Hessian eigenvalue'
        ' of the training loss on 1000 training examples, by power iteration'
        ' with sam_optax.sharpness.)')
  if timed_epochs:
    plural = 's' if timed_epochs > 1 else ''
    print(f'(ms / step: median over {timed_epochs} timed epoch{plural}, the'
          ' optimizers run in turn, one epoch each, after one untimed'
          ' warm-up epoch; x SGD: median over those rounds of the epoch time'
          ' over SGD\'s in the same round'
          + ('' if 'sgd' in runs else '; "-": SGD was not run') + '.)')
  else:
    print('(no timed epochs: the only epoch was the untimed warm-up; run'
          ' with --epochs 2 or more for ms / step.)')

  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'demo_test_accuracy.png')
  plot(runs, path, f'MNIST-1D, {args.noise:.0%} label noise')
  print(f'wrote {path}')
  return rows


if __name__ == '__main__':
  start = time.perf_counter()
  main()
  print(f'done in {time.perf_counter() - start:.0f} s')
