"""A sharpness helper called directly, as the README shows it, against jax.jit.

On the small 1-D CNN of the other benchmarks, ``hessian_top_eigenvalue``
(K power iterations, ``tolerance=0``) called four ways:

- ``first direct call``: ``sharpness.hessian_top_eigenvalue(loss_fn,
  params, loss_kwargs=...)`` with a loss_fn never seen before: tracing,
  compiling and running (median over fresh loss functions);
- ``second direct call``: the same call again on a new batch of the same
  shapes: the compiled program is reused;
- ``jitted call``: the helper inside the user's own ``jax.jit``, after its
  compile: the floor;
- ``eager (before)``: the helper's undecorated body called directly (what
  every direct call cost before programs were reused: op by op, each `lax`
  loop compiled anew).

Then ``per_leaf=True`` on the CNN's leaves: the first direct call (one
program over every leaf) against the undecorated body (a program per
leaf's loop). The check: second direct call / jitted call <= 1.5.

Run ``python benchmarks/bench_helpers_call.py`` (``--quick`` for a smoke
run without the eager rows that writes nothing); writes
benchmarks/results/helpers_call.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from sam_optax import sharpness

from _common import cnn_init, cnn_loss, machine, random_batch, write_section

TARGET_RATIO = 1.5


def seconds(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def fresh_loss():
  """A loss_fn the helper has never seen (its programs are not cached)."""
  return lambda params, batch: cnn_loss(params, batch)


def measure(params, batches, iterations: int, repeats: int,
            eager: bool) -> dict:
  helper = sharpness.hessian_top_eigenvalue
  options = dict(num_iterations=iterations, tolerance=0.0)
  call = lambda f, b, h=helper, **extra: h(
      f, params, loss_kwargs={'batch': b}, **options, **extra)
  loss = fresh_loss()
  jitted = jax.jit(lambda p, b: helper(loss, p, loss_kwargs={'batch': b},
                                       **options))
  jax.block_until_ready(jitted(params, batches[0]))
  call(loss, batches[0])  # compiles the direct call's program once
  times = {name: [] for name in ('first direct call', 'second direct call',
                                 'jitted call', 'eager (before)')}
  for r in range(repeats):
    times['first direct call'].append(
        seconds(lambda: call(fresh_loss(), batches[r % len(batches)])))
    for name, fn in (
        ('second direct call', lambda b: call(loss, b)),
        ('jitted call', lambda b: jitted(params, b))):
      times[name].append(statistics.median(
          seconds(lambda b=b: fn(b)) for b in batches))
    if eager:
      times['eager (before)'].append(seconds(
          lambda: call(loss, batches[0], h=helper.__wrapped__)))
  return {name: statistics.median(t) for name, t in times.items() if t}


def per_leaf_compile(params, batch, iterations: int, eager: bool) -> dict:
  helper = sharpness.hessian_top_eigenvalue
  call = lambda h: h(fresh_loss(), params, loss_kwargs={'batch': batch},
                     num_iterations=iterations, tolerance=0.0, per_leaf=True)
  times = {'per_leaf first direct call': seconds(lambda: call(helper))}
  if eager:
    times['per_leaf eager (before)'] = seconds(
        lambda: call(helper.__wrapped__))
  return times


def report(times: dict, leaves: dict, iterations: int, num_leaves: int,
           batch_size: int) -> str:
  ratio = times['second direct call'] / times['jitted call']
  lines = [
      '## helpers_call', '',
      f'Machine: {machine()}.', '',
      f'`hessian_top_eigenvalue` on the small 1-D CNN (batch {batch_size},'
      f' {iterations} power iterations, `tolerance=0`); seconds, medians'
      ' (`python benchmarks/bench_helpers_call.py`).', '',
      '| call | seconds |', '|---|---:|',
      *[f'| {name} | {value:.3f} |' for name, value in times.items()],
      '',
      f'Second direct call / jitted call: **{ratio:.2f}x** (target <='
      f' {TARGET_RATIO}).', '',
      f'`per_leaf=True` over the CNN\'s {num_leaves} leaves, first call'
      ' (compile included):', '',
      '| call | seconds |', '|---|---:|',
      *[f'| {name} | {value:.2f} |' for name, value in leaves.items()],
  ]
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='a smoke run: tiny sizes, nothing written')
  args = parser.parse_args(argv)
  quick = args.quick
  batch_size = 16 if quick else 128
  iterations = 2 if quick else 20
  repeats = 1 if quick else 3
  key = jax.random.key(0)
  params = cnn_init(key, channels=4 if quick else 32)
  batches = [random_batch(k, batch_size)
             for k in jax.random.split(jax.random.key(1), 2 if quick else 4)]
  times = measure(params, batches, iterations, repeats, eager=not quick)
  leaves = per_leaf_compile(params, batches[0], iterations, eager=not quick)
  text = report(times, leaves, iterations, len(jax.tree.leaves(params)),
                batch_size)
  print(text)
  ratio = times['second direct call'] / times['jitted call']
  if not quick:
    assert ratio <= TARGET_RATIO, f'second direct / jitted = {ratio:.2f}'
    print(write_section('helpers_call', text))
  return times


if __name__ == '__main__':
  main()
