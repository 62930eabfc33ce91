"""Time per epoch of XSAM (one probe per epoch) against SAM, side by side.

The model is the MNIST-1D CNN of examples/mnist1d_common.py (batch 100, input
length 40); an epoch is one jitted `lax.scan` over its steps, as in training.
XSAM probes on the first step of the epoch (probe_every = steps per epoch),
so its extra cost per epoch is one probe (21 forward passes on one minibatch
for the default grid 0..2 step 0.1) plus the slerp's vector work on every
step. Two epoch lengths are timed: 40 steps (MNIST-1D: 4000 examples / 100)
and 400 steps (the paper's CIFAR setting: 50000 / 125). Random inputs of the
right shape are used: the content of the data does not change the time.

  python benchmarks/bench_xsam.py           # ~3 minutes on 2 shared cores
  python benchmarks/bench_xsam.py --quick   # a smoke run; writes nothing
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import jax
import optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / 'examples'))

import _common  # noqa: E402
import mnist1d_common as m1d  # noqa: E402
import sam_optax  # noqa: E402

TARGET = 1.05


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='a smoke run in seconds; writes nothing')
  parser.add_argument('--steps', type=int, nargs='+', default=[40, 400],
                      help='steps per epoch (one probe each)')
  parser.add_argument('--batch-size', type=int, default=100)
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.repeats, args.batch_size = [4], 2, 16
  return args


def optimizers(steps):
  base = lambda: optax.sgd(0.05, momentum=0.9)
  loss = m1d.loss_fn
  return {
      'SAM': optax.chain(sam_optax.sam(loss, rho=0.05), base()),
      'XSAM, probe once per epoch': optax.chain(
          sam_optax.xsam(loss, rho=0.05, probe_every=steps), base()),
      'XSAM, probe once per epoch, vmapped grid': optax.chain(
          sam_optax.xsam(loss, rho=0.05, probe_every=steps,
                         probe_batch_size=21), base()),
      'XSAM, no probe (alpha fixed)': optax.chain(
          sam_optax.xsam(loss, rho=0.05, probe_every=None, alpha=1.5),
          base()),
  }


def time_epochs(steps, batch_size, repeats, quick=False):
  key = jax.random.PRNGKey(0)
  params = m1d.init_params(key)
  kx, ky = jax.random.split(key)
  xs = jax.random.normal(kx, (steps, batch_size, m1d.SEQUENCE_LENGTH))
  ys = jax.random.randint(ky, (steps, batch_size), 0, m1d.NUM_CLASSES)
  fns = {}
  for name, tx in optimizers(steps).items():
    if quick and name not in ('SAM', 'XSAM, probe once per epoch'):
      continue  # a smoke run: compile as little as possible
    state = tx.init(params)
    compiled = m1d.make_epoch_fn(tx).lower(params, state, xs, ys).compile()
    fns[name] = (lambda c=compiled, s=state: c(params, s, xs, ys))
  return _common.time_interleaved(fns, repeats=repeats, calls=1)


def main(argv=None):
  args = parse_args(argv)
  rows = []
  ratios = {}
  for steps in args.steps:
    times = time_epochs(steps, args.batch_size, args.repeats, args.quick)
    for name in times:
      ratio = _common.paired_ratio(times, name, 'SAM')
      ratios[(steps, name)] = ratio
      rows.append(
          f'| {steps} | {name} | {_common.median_ms(times, name):.0f} |'
          f' {1e3 * statistics.median(times[name]) / steps:.2f} |'
          f' {ratio:.3f} |')
  table = '\n'.join([
      '| steps / epoch | optimizer | ms / epoch | ms / step | ratio to SAM |',
      '|---|---|---|---|---|',
      *rows,
  ])
  print(table)
  if args.quick:
    return ratios
  longest = max(args.steps)
  main_ratio = ratios[(longest, 'XSAM, probe once per epoch')]
  verdict = 'meets' if main_ratio <= TARGET else 'misses'
  n_params = sum(x.size for x in jax.tree.leaves(
      m1d.init_params(jax.random.PRNGKey(0))))
  markdown = f"""## XSAM vs SAM: time per epoch

MNIST-1D CNN (examples/mnist1d_common.py, {n_params} parameters), batch
{args.batch_size}, SGD momentum 0.9 after each transformation; an epoch is one
jitted `lax.scan` over its steps and XSAM probes once per epoch (21 forward
passes, grid 0..2 step 0.1; "vmapped grid" is `probe_batch_size=21`, the
default evaluates the grid with `lax.map` one point at a time). Medians of
{args.repeats} interleaved repeats; the ratio is the median of per-repeat
ratios to SAM measured side by side.

{table}

With {longest} steps per epoch (the paper's CIFAR setting) XSAM/SAM is
{main_ratio:.3f}, which {verdict} the target of {TARGET}. The probe's cost is
fixed per epoch, so short epochs pay proportionally more: at 40 steps per
epoch the probe's 21 forward passes are several percent of SAM's 80 gradient
evaluations; probe less often (`probe_every`) or on a coarser grid
(`alpha_step`) there.

Machine: {_common.machine()}.

Command: `python benchmarks/bench_xsam.py {' '.join(argv or sys.argv[1:])}`
"""
  print('wrote', _common.write_section('xsam', markdown))
  return ratios


if __name__ == '__main__':
  main()
