"""m-sharpness in miniature: SAM's test accuracy vs examples per perturbation.

The SAM paper (Foret et al., 2021, section 4.1 and figure 3) trains with the
perturbation computed on m examples at a time -- each TPU replica perturbs
with its own minibatch gradient -- and finds that smaller m generalizes
better. This script repeats the experiment on MNIST-1D with 8 (fake CPU)
devices under `jax.pmap`, at one global batch and one rho, for every m:

* m < per-device batch:  ``layout=PerDevice('i', chunks=Chunks(m))`` --
  chunks inside each device, each with its own perturbation;
* m = per-device batch:  ``layout=PerDevice('i')`` -- one perturbation per
  device, the paper's default setting;
* per-device < m < batch: ``PerDevice('i', sync=True, groups=...)`` --
  devices in groups of m / per-device share a perturbation;
* m = global batch:      ``PerDevice('i', sync=True)`` -- plain SAM on the
  global batch;

plus SGD (rho = 0) for reference. Prints a table (mean +- std over seeds of
the final test accuracy) and writes a PNG and a markdown table to ``--out``.

  python examples/msharpness.py            # full run (a few minutes on CPU)
  python examples/msharpness.py --quick    # seconds, for the test suite
"""

from __future__ import annotations

import os

# 8 fake CPU devices. They share this machine's cores: on a loaded machine one
# device can wait for CPU time longer than XLA's default 40 s collective
# timeout (which aborts the process), so that timeout is raised too.
for _flag in ('--xla_force_host_platform_device_count=8',
              '--xla_cpu_collective_call_warn_stuck_timeout_seconds=120',
              '--xla_cpu_collective_call_terminate_timeout_seconds=1200'):
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                               + _flag).strip()

import argparse  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import mnist1d_common as m1d  # noqa: E402

import sam_optax  # noqa: E402

AXIS = 'i'


def make_layout(m: int, batch: int, devices: int,
                chunk_mode: str) -> sam_optax.PerDevice:
  """The layout that perturbs once per m examples (see `check_m`)."""
  per_device = batch // devices
  if m < per_device:
    return sam_optax.PerDevice(
        AXIS, chunks=sam_optax.Chunks(m, mode=chunk_mode))
  if m == per_device:
    return sam_optax.PerDevice(AXIS)
  if m == batch:
    return sam_optax.PerDevice(AXIS, sync=True)
  size = m // per_device
  groups = [list(range(g * size, (g + 1) * size))
            for g in range(devices // size)]
  return sam_optax.PerDevice(AXIS, sync=True, groups=groups)


def make_sam(loss_fn, rho: float, m: int, batch: int, devices: int,
             chunk_mode: str):
  """The SAM transformation that perturbs once per m examples."""
  return sam_optax.sam(loss_fn, rho,
                       layout=make_layout(m, batch, devices, chunk_mode))


def check_m(m: int, batch: int, devices: int) -> None:
  per_device = batch // devices
  if m < per_device and per_device % m == 0:
    return
  if m >= per_device and m % per_device == 0 and devices % (
      m // per_device) == 0:
    return
  raise ValueError(
      f'm={m} does not fit a batch of {batch} on {devices} devices'
      f' ({per_device} per device): m must divide {per_device}, or be'
      f' {per_device} times a divisor of {devices}.'
  )


def train(tx, data, *, seeds, epochs, batch, devices, lr, progress, desc):
  """Trains the MNIST-1D CNN under pmap once per seed; final test accuracies.

  The pmapped epoch (a `jax.lax.scan` over its steps) is compiled once and
  reused for every seed.
  """
  tx = optax.chain(tx, optax.sgd(lr, momentum=0.9))

  def epoch(params, state, xs, ys):
    def step(carry, batch_):
      params, state = carry
      x, y = batch_
      loss, grads = jax.value_and_grad(m1d.loss_fn)(params, {'x': x, 'y': y})
      updates, state = tx.update(grads, state, params, batch={'x': x, 'y': y})
      return (optax.apply_updates(params, updates), state), loss

    (params, state), losses = jax.lax.scan(step, (params, state), (xs, ys))
    return params, state, jax.lax.pmean(jnp.mean(losses), AXIS)

  epoch = jax.pmap(epoch, axis_name=AXIS)
  replicate = lambda t: jax.tree.map(
      lambda v: jnp.broadcast_to(v, (devices,) + jnp.shape(v)), t)
  x, y = np.asarray(data['x']), np.asarray(data['y'])
  x_test, y_test = jnp.asarray(data['x_test']), jnp.asarray(data['y_test'])
  steps = len(y) // batch
  accuracies = []
  for seed in range(seeds):
    params = m1d.init_params(jax.random.PRNGKey(seed))
    params, state = replicate(params), replicate(tx.init(params))
    rng = np.random.default_rng(seed)
    iterator = range(epochs)
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      iterator = tqdm(iterator, desc=f'{desc} seed {seed}', leave=False)
    for _ in iterator:
      order = rng.permutation(len(y))[:steps * batch]
      # Device d gets a contiguous slice of every global batch.
      xs = x[order].reshape(steps, devices, batch // devices, -1)
      ys = y[order].reshape(steps, devices, batch // devices)
      params, state, _ = epoch(params, state, xs.swapaxes(0, 1),
                               ys.swapaxes(0, 1))
      # One execution at a time: overlapping collective programs on fake
      # CPU devices can starve XLA's thread pool on a small machine.
      jax.block_until_ready(params)
    final = jax.tree.map(lambda v: v[0], params)
    accuracies.append(float(m1d.evaluate(final, x_test, y_test)[0]))
  return accuracies


def plot(rows, path, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  sam_rows = [r for r in rows if r['m'] is not None]
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  ms = [r['m'] for r in sam_rows]
  ax.errorbar(ms, [100 * r['mean'] for r in sam_rows],
              yerr=[100 * r['std'] for r in sam_rows], marker='o',
              capsize=4, label='SAM')
  sgd = [r for r in rows if r['m'] is None]
  if sgd:
    ax.axhline(100 * sgd[0]['mean'], color='gray', ls='--', label='SGD')
  ax.set_xscale('log', base=2)
  ax.set_xticks(ms)
  ax.set_xticklabels([str(m) for m in ms])
  ax.set_xlabel('m (examples per perturbation)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--m', type=int, nargs='+', default=[4, 16, 64, 0],
                      help='examples per perturbation; 0 = the global batch')
  parser.add_argument('--rho', type=float, default=0.1)
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--epochs', type=int, default=30)
  parser.add_argument('--samples', type=int, default=5000,
                      help='MNIST-1D examples in total (80%% train)')
  parser.add_argument('--noise', type=float, default=0.0,
                      help='fraction of training labels made wrong')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--chunk-mode', default='sequential',
                      choices=['sequential', 'vectorized'])
  parser.add_argument('--no-sgd', action='store_true',
                      help='skip the SGD (rho=0) reference row')
  parser.add_argument('--out', default='out', help='folder for PNG and table')
  parser.add_argument('--quick', action='store_true',
                      help='tiny run for tests: 1 epoch, 640 samples,'
                      ' batch 64, 1 seed, m in {4, 32}, no SGD row')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  if args.quick:
    args.epochs, args.samples, args.batch_size, args.seeds = 1, 640, 64, 1
    args.m, args.no_sgd = [4, 32], True
  devices = jax.local_device_count()
  if args.batch_size % devices:
    raise ValueError(f'--batch-size {args.batch_size} must be a multiple of'
                     f' the {devices} devices.')
  ms = [args.batch_size if m == 0 else m for m in args.m]
  for m in ms:
    check_m(m, args.batch_size, devices)

  data = m1d.load_data(num_samples=args.samples, label_noise=args.noise)
  title = (f'MNIST-1D, {len(data["y"])} train, batch {args.batch_size} on'
           f' {devices} devices, rho={args.rho}, {args.epochs} epochs,'
           f' {args.seeds} seeds')
  print(title, flush=True)
  configs = ([] if args.no_sgd else [None]) + ms
  rows = []
  for m in configs:
    start = time.perf_counter()
    if m is None:  # rho = 0 is exactly data-parallel SGD (one pmean)
      tx = sam_optax.sam(m1d.loss_fn, 0.0,
                          layout=sam_optax.PerDevice(AXIS))
    else:
      tx = make_sam(m1d.loss_fn, args.rho, m, args.batch_size, devices,
                    args.chunk_mode)
    accuracies = train(
        tx, data, seeds=args.seeds, epochs=args.epochs,
        batch=args.batch_size, devices=devices, lr=args.lr,
        progress=not args.no_progress, desc='sgd' if m is None else f'm={m}')
    rows.append(dict(
        m=m, label='SGD (rho=0)' if m is None else (
            f'SAM m={m}' + (' (full batch)' if m == args.batch_size else '')),
        mean=float(np.mean(accuracies)), std=float(np.std(accuracies)),
        accuracies=accuracies, seconds=time.perf_counter() - start))
    print(f'  {rows[-1]["label"]:<24} test accuracy'
          f' {100 * rows[-1]["mean"]:.2f} +- {100 * rows[-1]["std"]:.2f} %'
          f'  ({rows[-1]["seconds"]:.0f} s)', flush=True)

  lines = [f'm-sharpness on {title}.', '',
           '| setting | test accuracy (%) | per seed | time (s) |',
           '|---|---|---|---|']
  for r in rows:
    lines.append(
        f'| {r["label"]} | {100 * r["mean"]:.2f} +- {100 * r["std"]:.2f} |'
        f' {", ".join(f"{100 * a:.1f}" for a in r["accuracies"])} |'
        f' {r["seconds"]:.0f} |')
  table = '\n'.join(lines)
  print(table)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'msharpness.md').write_text(table + '\n')
  plot(rows, out / 'msharpness.png', title)
  print(f'wrote {out / "msharpness.png"} and {out / "msharpness.md"}')
  return rows


if __name__ == '__main__':
  main()
