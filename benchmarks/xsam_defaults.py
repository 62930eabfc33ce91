"""XSAM's defaults from evidence: rho_max / rho and the alpha range on MNIST-1D.

The paper's probe radius (rho_max = 2 rho) and alpha grid (0..2, step 0.1)
were tuned on CIFAR ResNets. This script trains the MNIST-1D CNN of
examples/mnist1d_common.py with SGD (momentum, cosine learning rate), SAM and
XSAM (probe once per epoch) at the same settings, with and without symmetric
label noise, over a few seeds, and tabulates the final clean test accuracy.

One compiled epoch function per optimizer structure is shared by every run
(rho and rho_max are injected hyperparameters set in the optimizer state), so
the sweep spends its time training, not compiling.

  python benchmarks/xsam_defaults.py            # the full sweep (~15 min, 2 cores)
  python benchmarks/xsam_defaults.py --quick    # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import itertools
import math
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / 'examples'))

import _common  # noqa: E402
import mnist1d_common as m1d  # noqa: E402
import sam_optax  # noqa: E402


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='a few-second smoke run; writes nothing')
  parser.add_argument('--epochs', type=int, default=40)
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--noise', type=float, nargs='+', default=[0.0, 0.2])
  parser.add_argument('--rhos', type=float, nargs='+', default=[0.05, 0.15])
  parser.add_argument('--ratios', type=float, nargs='+', default=[0.5, 1.0, 2.0,
                                                                   4.0],
                      help='rho_max / rho values (alpha_max = 2)')
  parser.add_argument('--alpha-maxes', type=float, nargs='+',
                      default=[1.0, 3.0],
                      help='alpha ranges tried at rho_max = 2 rho')
  parser.add_argument('--no-shipped', dest='shipped', action='store_false',
                      help='skip the rows for the shipped defaults')
  parser.add_argument('--no-max-angle', dest='max_angle_rows',
                      action='store_false',
                      help='skip the rows for the max_angle option')
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--batch-size', type=int, default=100)
  parser.add_argument('--samples', type=int, default=5000)
  args = parser.parse_args(argv)
  if args.quick:
    args.epochs, args.seeds, args.noise = 1, [0], [0.2]
    args.rhos, args.ratios, args.alpha_maxes = [0.05], [2.0], []
    args.samples, args.shipped, args.max_angle_rows = 1000, False, False
  return args


class Structure:
  """One compiled epoch function for one optimizer structure."""

  def __init__(self, kind, alpha_max, lr_schedule, probe_every, shapes,
               max_angle=None):
    base = optax.sgd(lr_schedule, momentum=0.9)
    if kind == 'sgd':
      self.tx = base
    elif kind == 'sam':
      self.tx = optax.chain(
          sam_optax.inject_hyperparams(sam_optax.sam)(m1d.loss_fn, rho=0.05),
          base)
    elif kind == 'xsam_default':
      # Exactly the shipped defaults: xsam(loss_fn), nothing else set.
      self.tx = optax.chain(sam_optax.xsam(m1d.loss_fn), base)
    else:
      self.tx = optax.chain(
          sam_optax.inject_hyperparams(sam_optax.xsam)(
              m1d.loss_fn, rho=0.05, rho_max=0.1, probe_every=probe_every,
              alpha_max=alpha_max, max_angle=max_angle),
          base)
    params = m1d.init_params(jax.random.PRNGKey(0))
    self.compiled = m1d.make_epoch_fn(self.tx).lower(
        params, self.tx.init(params), *shapes).compile()
    self.kind = kind

  def init(self, params, rho=None, rho_max=None):
    state = self.tx.init(params)
    if self.kind in ('sam', 'xsam'):
      state[0].hyperparams['rho'] = jnp.asarray(rho, jnp.float32)
    if self.kind == 'xsam':
      state[0].hyperparams['rho_max'] = jnp.asarray(rho_max, jnp.float32)
    return state


def train(structure, data, seed, epochs, batch_size, **hyperparams):
  """Final clean test accuracy, and the mean probed alpha for XSAM."""
  params = m1d.init_params(jax.random.PRNGKey(seed))
  state = structure.init(params, **hyperparams)
  x, y = data['x'], data['y']
  steps = len(y) // batch_size
  rng = np.random.default_rng(seed)
  alphas = []
  for _ in range(epochs):
    order = rng.permutation(len(y))[: steps * batch_size]
    params, state, _ = structure.compiled(
        params, state, jnp.asarray(x[order].reshape(steps, batch_size, -1)),
        jnp.asarray(y[order].reshape(steps, batch_size)))
    if structure.kind == 'xsam':
      alphas.append(float(state[0].inner_state.alpha))
    elif structure.kind == 'xsam_default':  # not wrapped in inject
      alphas.append(float(state[0].alpha))
  accuracy, _ = m1d.evaluate(params, jnp.asarray(data['x_test']),
                             jnp.asarray(data['y_test']))
  return float(accuracy), (statistics.mean(alphas) if alphas else None)


def configs(args):
  """(label, structure key, hyperparams) for every run of one setting."""
  out = [('SGD', ('sgd', None, None, None), {})]
  for rho in args.rhos:
    out.append((f'SAM rho={rho:g}', ('sam', None, None, None), {'rho': rho}))
  for rho in args.rhos:
    for ratio in args.ratios:
      out.append((f'XSAM rho={rho:g} rho_max={ratio:g}rho alpha<=2',
                  ('xsam', 2.0, None, None), {'rho': rho, 'rho_max': ratio * rho}))
    for alpha_max in args.alpha_maxes:
      out.append((f'XSAM rho={rho:g} rho_max=2rho alpha<={alpha_max:g}',
                  ('xsam', alpha_max, None, None), {'rho': rho, 'rho_max': 2 * rho}))
  if args.shipped:
    out.append(('XSAM as shipped: xsam(loss_fn), probe_every=100',
                ('xsam_default', None, 100, None), {}))
    out.append(('XSAM rho=0.15 rho_max=1rho alpha<=2, probe_every=10',
                ('xsam', 2.0, 10, None), {'rho': 0.15, 'rho_max': 0.15}))
  if args.max_angle_rows:
    for ratio in (2.0, 4.0):
      out.append((f'XSAM rho=0.15 rho_max={ratio:g}rho alpha<=2,'
                  ' max_angle=pi/2', ('xsam', 2.0, None, math.pi / 2),
                  {'rho': 0.15, 'rho_max': ratio * 0.15}))
  return out


def main(argv=None):
  args = parse_args(argv)
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  steps = (int(args.samples * 0.8)) // args.batch_size
  lr = optax.cosine_decay_schedule(args.lr, args.epochs * steps)
  shapes = (
      jax.ShapeDtypeStruct((steps, args.batch_size, 40), jnp.float32),
      jax.ShapeDtypeStruct((steps, args.batch_size), jnp.int32),
  )
  runs = configs(args)
  structures = {}
  start = time.perf_counter()
  for _, key, _ in runs:
    if key not in structures:
      structures[key] = Structure(key[0], key[1], lr, key[2] or steps,
                                  shapes, max_angle=key[3])
  compile_s = time.perf_counter() - start

  results = {}  # (noise, label) -> list of (accuracy, mean alpha)
  todo = list(itertools.product(args.noise, args.seeds, runs))
  start = time.perf_counter()
  for noise, seed, (label, key, hp) in tqdm(todo, desc='xsam defaults'):
    data = m1d.load_data(args.samples, label_noise=noise, seed=0)
    results.setdefault((noise, label), []).append(
        train(structures[key], data, seed, args.epochs, args.batch_size, **hp))
  train_s = time.perf_counter() - start

  noise_cols = ' | '.join(f'noise {n:g}' for n in args.noise)
  lines = [
      f'| optimizer | {noise_cols} | mean probed alpha (noise'
      f' {args.noise[-1]:g}) |',
      '|---' * (len(args.noise) + 2) + '|',
  ]
  sgd = {n: statistics.mean(a for a, _ in results[(n, 'SGD')])
         for n in args.noise}
  for label, _, _ in runs:
    cells = []
    for n in args.noise:
      accs = [100 * a for a, _ in results[(n, label)]]
      spread = (max(accs) - min(accs)) / 2
      delta = statistics.mean(accs) - 100 * sgd[n]
      cells.append(f'{statistics.mean(accs):.1f} ± {spread:.1f}'
                   + ('' if label == 'SGD' else f' ({delta:+.1f})'))
    alphas = [al for _, al in results[(args.noise[-1], label)]
              if al is not None]
    alpha_cell = f'{statistics.mean(alphas):.2f}' if alphas else '-'
    lines.append(f'| {label} | ' + ' | '.join(cells) + f' | {alpha_cell} |')
  table = '\n'.join(lines)
  print(table)
  print(f'compile {compile_s:.0f} s, training {train_s:.0f} s')

  if args.quick:
    return table
  command = 'python benchmarks/xsam_defaults.py ' + ' '.join(
      argv if argv is not None else sys.argv[1:])
  markdown = f"""## XSAM defaults from evidence (MNIST-1D)

Final clean test accuracy (%) of the MNIST-1D CNN
(examples/mnist1d_common.py, {m1d.SEQUENCE_LENGTH}-sample signals,
{int(args.samples * 0.8)} train / {args.samples - int(args.samples * 0.8)}
test, {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9 with a
cosine learning rate from {args.lr:g}; every sharpness-aware optimizer is
chained in front of that same SGD). Mean ± half-range over seeds
{args.seeds} (initialization and data order); in brackets the difference to
SGD. "noise" is the fraction of training labels replaced by a wrong class.
XSAM probes once per epoch (probe_every={steps}) unless the row says otherwise,
on the alpha grid 0..alpha_max step 0.1; "as shipped" is `xsam(loss_fn)` with
every default. The last column is the probed alpha averaged over epochs and seeds.

{table}

Machine: {_common.machine()}; {compile_s:.0f} s compiling, {train_s:.0f} s
training.

Command: `{command.strip()}`
"""
  path = _common.write_section('xsam_defaults', markdown)
  print('wrote', path)
  plot(args, runs, results, HERE / 'results' / 'xsam_defaults.png')
  return table


def plot(args, runs, results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(args.noise), figsize=(5 * len(args.noise),
                                                        4), squeeze=False)
  for ax, n in zip(axes[0], args.noise):
    mean = lambda label: 100 * statistics.mean(
        a for a, _ in results[(n, label)])
    ax.axhline(mean('SGD'), color='k', ls='--', label='SGD')
    for i, rho in enumerate(args.rhos):
      color = f'C{i}'
      ax.axhline(mean(f'SAM rho={rho:g}'), color=color, ls=':',
                 label=f'SAM rho={rho:g}')
      ys = [mean(f'XSAM rho={rho:g} rho_max={r:g}rho alpha<=2')
            for r in args.ratios]
      ax.plot(args.ratios, ys, 'o-', color=color,
              label=f'XSAM rho={rho:g}, alpha<=2')
    ax.set_xscale('log', base=2)
    ax.set_xlabel('rho_max / rho')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(f'MNIST-1D, label noise {n:g}')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print('wrote', path)


if __name__ == '__main__':
  main()
