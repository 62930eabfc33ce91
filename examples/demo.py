"""The main demo: SGD vs SAM, ASAM and XSAM on MNIST-1D with label noise.

Trains the same small 1-D CNN (examples/mnist1d_common.py) with each
optimizer from the same initialization and data order, then prints a table
(test accuracy, final train loss, the top Hessian eigenvalue of the training
loss at the final weights, time per step) and writes a plot of test accuracy
over epochs. MNIST-1D is generated locally by the `mnist1d` package; nothing
is downloaded. Every sharpness-aware optimizer is the same base optimizer
(SGD with momentum) with one transformation chained in front of it.

  python examples/demo.py                      # the defaults, a few minutes
  python examples/demo.py --noise 0 --epochs 40 --optimizers sgd sam
  python examples/demo.py --quick              # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

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


def plot(histories, labels, path, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for name, result in histories.items():
    epochs = np.arange(1, len(result.test_accuracy) + 1)
    ax.plot(epochs, 100 * np.asarray(result.test_accuracy), label=labels[name])
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--noise', type=float, default=0.2,
                      help='fraction of training labels made wrong')
  parser.add_argument('--epochs', type=int, default=40)
  parser.add_argument('--batch-size', type=int, default=100)
  parser.add_argument('--samples', type=int, default=5000,
                      help='MNIST-1D examples in total (80%% train)')
  parser.add_argument('--optimizers', nargs='+', default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='out', help='folder for the plot')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny run (2 epochs, 1000 samples) for tests')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  eigen_iterations = 50
  if args.quick:
    args.epochs, args.samples, eigen_iterations = 1, 1000, 3

  data = m1d.load_data(num_samples=args.samples, label_noise=args.noise,
                       seed=args.seed)
  print(f'MNIST-1D: {len(data["y"])} train / {len(data["y_test"])} test'
        f' examples, {args.noise:.0%} of training labels wrong;'
        f' {args.epochs} epochs, batch {args.batch_size},'
        f' SGD momentum {MOMENTUM}, cosine learning rate from'
        f' {LEARNING_RATE}.')
  steps_per_epoch = len(data['y']) // args.batch_size
  labels = {name: OPTIMIZERS[name][0] for name in args.optimizers}
  results, rows = {}, []
  for name in args.optimizers:
    print(f'training {labels[name]} ...', flush=True)
    make_tx = make_tx_factory(name, steps_per_epoch, args.epochs)
    result = m1d.train(make_tx, data, epochs=args.epochs,
                       batch_size=args.batch_size, seed=args.seed,
                       progress=not args.no_progress, desc=labels[name])
    results[name] = result
    rows.append((
        labels[name],
        100 * result.test_accuracy[-1],
        100 * result.best_test_accuracy,
        result.train_loss[-1],
        top_eigenvalue(result.params, data, num_iterations=eigen_iterations),
        1e3 * float(np.median(result.step_time)),
    ))

  header = ('optimizer', 'test acc %', 'best test acc %', 'train loss',
            'lambda_max', 'ms / step')
  widths = [max(len(header[0]), *(len(r[0]) for r in rows))] + [
      len(h) for h in header[1:]]
  print()
  print('  '.join(h.ljust(w) for h, w in zip(header, widths)))
  for row in rows:
    cells = [row[0].ljust(widths[0])] + [
        f'{v:.2f}'.rjust(w) if i != 3 else f'{v:.3f}'.rjust(w)
        for i, (v, w) in enumerate(zip(row[1:], widths[1:]), start=1)]
    print('  '.join(cells))
  print('\n(test acc: after the last epoch; lambda_max: top Hessian eigenvalue'
        ' of the training loss on 1000 training examples, by power iteration'
        ' with sam_optax.sharpness.)')

  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'demo_test_accuracy.png')
  plot(results, labels, path,
       f'MNIST-1D, {args.noise:.0%} label noise')
  print(f'wrote {path}')
  return rows


if __name__ == '__main__':
  start = time.perf_counter()
  main()
  print(f'done in {time.perf_counter() - start:.0f} s')
