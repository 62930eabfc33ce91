"""Cost of Hessian-vector products and spectrum steps relative to a gradient.

On the small 1-D CNN of the other benchmarks (two `lax.conv` layers) and on
a small MLP, timed side by side in one run (interleaved rounds, medians),
every helper under `jax.jit`:

- ``grad``: one gradient, ``jax.grad(loss)`` -- the unit;
- ``grad (inside a loop)``: N gradients in a `jax.lax.fori_loop`, divided
  by N (on XLA:CPU a convolution in a loop body loses its fast path:
  https://github.com/jax-ml/jax/issues/12868);
- ``hvp (fwd-over-rev)``: ``sharpness.hessian_vector_product`` (`jax.jvp`
  of `jax.grad`), what every Hessian helper uses; ``hvp (rev-over-rev)``:
  ``jax.grad`` of ``<grad, v>``, the textbook alternative;
- ``power step``: ``hessian_top_eigenvalue`` with ``tolerance=0`` and
  K iterations, divided by K (one HVP, a dot product, a norm; the three
  HVPs of the final +-mu split included);
- ``lanczos step``: ``hessian_eigenvalues`` with m = K Lanczos steps (full
  reorthogonalization), divided by K;
- ``hutchinson probe``: ``hessian_trace`` with N = K probes, divided by K;

each of the three helpers with ``unroll=False`` (`lax` loops) and
``unroll=True`` (Python loops traced into the program); the table names
which one the default ``unroll=None`` picks for the model. Compile time
(the first call, lowering included) is reported as unrolled / looped.

Second table: Hutch++ against Hutchinson at an equal budget of N HVPs on a
small MLP and a small CNN, whose exact trace comes from a dense
``jax.hessian``: the std of each estimate over many keys.

Run ``python benchmarks/bench_hessian.py`` (``--quick`` for a smoke run);
writes benchmarks/results/hessian.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

from sam_optax import sharpness
from sam_optax._src.sharpness import loops

from _common import (cnn_init, cnn_loss, machine, median_ms, random_batch,
                     time_interleaved, write_section)

HELPERS = ('power step', 'lanczos step', 'hutchinson probe')


def mlp_init(key, sizes=(40, 256, 256, 10)):
  keys = jax.random.split(key, len(sizes) - 1)
  return {
      f'layer{i}': {
          'kernel': jax.random.normal(k, (a, b)) / np.sqrt(a),
          'bias': jnp.zeros(b),
      }
      for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def mlp_loss(params, batch):
  h = batch['x']
  layers = [params[f'layer{i}'] for i in range(len(params))]
  for layer in layers[:-1]:
    h = jax.nn.relu(h @ layer['kernel'] + layer['bias'])
  logits = h @ layers[-1]['kernel'] + layers[-1]['bias']
  labels = jax.nn.one_hot(batch['y'], logits.shape[-1])
  return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))


def default_unroll(loss_fn, params, batch) -> bool:
  """What ``unroll=None`` picks for this model on this backend."""
  _, unravel = flatten_util.ravel_pytree(params)
  size = sum(p.size for p in jax.tree.leaves(params))
  matvec = lambda x: flatten_util.ravel_pytree(
      sharpness.hessian_vector_product(
          loss_fn, params, unravel(x), loss_kwargs={'batch': batch}))[0]
  return loops.resolve(None, matvec, size)


def helper_fns(loss_fn, steps, unroll):
  kw = lambda b: {'loss_kwargs': {'batch': b}, 'unroll': unroll}
  return {
      'power step': jax.jit(lambda p, b: sharpness.hessian_top_eigenvalue(
          loss_fn, p, num_iterations=steps, tolerance=0.0, **kw(b))),
      'lanczos step': jax.jit(lambda p, b: sharpness.hessian_eigenvalues(
          loss_fn, p, k=1, num_iterations=steps, **kw(b))),
      'hutchinson probe': jax.jit(lambda p, b: sharpness.hessian_trace(
          loss_fn, p, num_samples=steps, **kw(b))),
  }


def make_fns(loss_fn, params, batch, steps):
  """Callables (no arguments) for every measured operation; compile times."""
  vector = jax.tree.map(lambda p: jnp.ones_like(p) / np.sqrt(p.size), params)

  grad = jax.jit(jax.grad(loss_fn))
  hvp = jax.jit(lambda p, v, b: sharpness.hessian_vector_product(
      loss_fn, p, v, loss_kwargs={'batch': b}))

  @jax.jit
  def hvp_rev(p, v, b):
    inner = lambda q: sum(
        jnp.vdot(g, u) for g, u in zip(jax.tree.leaves(jax.grad(loss_fn)(q, b)),
                                        jax.tree.leaves(v)))
    return jax.grad(inner)(p)

  @jax.jit
  def grad_loop(p, b):
    # `steps` gradients inside a fori_loop (each at a slightly moved point,
    # so none is hoisted): what a gradient costs inside a loop body.
    step = lambda i, q: jax.tree.map(lambda x, g: x - 1e-6 * g, q,
                                     jax.grad(loss_fn)(q, b))
    return jax.lax.fori_loop(0, steps, step, p)

  # The two HVPs agree (a correctness check before timing).
  a = jax.tree.leaves(hvp(params, vector, batch))
  b = jax.tree.leaves(hvp_rev(params, vector, batch))
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=2e-3, atol=1e-5)
  fns = {
      'grad': functools.partial(grad, params, batch),
      'grad (inside a loop)': functools.partial(grad_loop, params, batch),
      'hvp (fwd-over-rev)': functools.partial(hvp, params, vector, batch),
      'hvp (rev-over-rev)': functools.partial(hvp_rev, params, vector, batch),
  }
  per_call = {'grad (inside a loop)': steps}
  compile_s = {}
  outs = {}
  for unroll in (False, True):
    for op, fn in helper_fns(loss_fn, steps, unroll).items():
      name = (op, unroll)
      start = time.perf_counter()
      outs[name] = jax.block_until_ready(fn(params, batch))  # compiles
      compile_s[name] = time.perf_counter() - start
      fns[name] = functools.partial(fn, params, batch)
      per_call[name] = steps
  # Both loop forms give the same numbers (up to rounding).
  for op in HELPERS:
    for x, y in zip(jax.tree.leaves(outs[op, False]),
                    jax.tree.leaves(outs[op, True])):
      if jnp.issubdtype(x.dtype, jnp.floating):
        np.testing.assert_allclose(x, y, rtol=2e-2, atol=1e-3)
  return fns, per_call, compile_s


def measure(name, loss_fn, params, batch, steps, repeats, calls):
  fns, per_call, compile_s = make_fns(loss_fn, params, batch, steps)
  times = time_interleaved(fns, repeats, calls)
  for op, k in per_call.items():
    times[op] = [t / k for t in times[op]]
  ratio = lambda op, unit='grad': statistics.median(
      t / g for t, g in zip(times[op], times[unit]))
  pick = default_unroll(loss_fn, params, batch)
  rows = []
  for op in ('grad', 'grad (inside a loop)', 'hvp (fwd-over-rev)',
             'hvp (rev-over-rev)'):
    rows.append((name, op, f'{median_ms(times, op):.3f}', f'{ratio(op):.2f}',
                 '', '', '', ''))
  for op in HELPERS:
    looped, unrolled = ratio((op, False)), ratio((op, True))
    rows.append((
        name, op, f'{median_ms(times, (op, pick)):.3f}', f'{looped:.2f}',
        f'{unrolled:.2f}', f'{unrolled if pick else looped:.2f}'
        f' (unroll={pick})', f'{looped / unrolled:.1f}',
        f'{compile_s[op, True] / compile_s[op, False]:.1f}'))
  return rows, pick


def cnn_small_init(key):
  return cnn_init(key, length=40, channels=4)


def exact_spectrum(loss_fn, params, batch):
  """(tr(H), eigenvalues sorted by size) of the dense `jax.hessian`."""
  flat, unravel = flatten_util.ravel_pytree(params)
  h = jax.jit(jax.hessian(lambda x: loss_fn(unravel(x), batch)))(flat)
  eigenvalues = np.linalg.eigvalsh(np.asarray(h, np.float64))
  return float(jnp.trace(h)), eigenvalues[np.argsort(np.abs(eigenvalues))]


def trace_variance(name, loss_fn, params, batch, budgets, num_keys):
  """Rows: Hutchinson vs Hutch++ at each budget of HVPs, `num_keys` keys."""
  exact, eigenvalues = exact_spectrum(loss_fn, params, batch)
  squares = np.square(eigenvalues)
  rows = []
  for budget in budgets:
    share = squares[-(budget // 3):].sum() / squares.sum()
    estimates = {}
    for method in ('hutchinson', 'hutch++'):
      fn = jax.jit(lambda p, key, m=method: sharpness.hessian_trace(
          loss_fn, p, num_samples=budget, method=m, key=key,
          loss_kwargs={'batch': batch}))
      outs = [fn(params, jax.random.key(1000 + i)) for i in range(num_keys)]
      estimates[method] = (np.array([float(o.trace) for o in outs]),
                           np.array([float(o.standard_error) for o in outs]))
    (hutch, hutch_se), (pp, pp_se) = (estimates['hutchinson'],
                                      estimates['hutch++'])
    rows.append((name, eigenvalues.size, budget, share, exact, hutch.mean(),
                 hutch.std(ddof=1), hutch_se.mean(), pp.mean(),
                 pp.std(ddof=1), pp_se.mean(),
                 hutch.std(ddof=1) / pp.std(ddof=1)))
  return rows


def compile_cost(loss_fn, params, batch, counts, repeats):
  """Rows (count, compile looped / unrolled s, run looped / unrolled ms).

  ``hessian_top_eigenvalue(num_iterations=count, tolerance=0)`` under jit:
  lowering + compiling timed once per form, runs as interleaved medians.
  """
  rows = []
  for count in counts:
    compiled, fns = {}, {}
    for unroll in (False, True):
      fn = jax.jit(lambda p, b, u=unroll: sharpness.hessian_top_eigenvalue(
          loss_fn, p, num_iterations=count, tolerance=0.0, unroll=u,
          loss_kwargs={'batch': b}))
      start = time.perf_counter()
      exe = fn.lower(params, batch).compile()
      compiled[unroll] = time.perf_counter() - start
      fns[unroll] = functools.partial(exe, params, batch)
    times = time_interleaved(fns, repeats, 1)
    run = {u: statistics.median(times[u]) for u in fns}
    saved = run[False] - run[True]
    extra = max(compiled[True] - compiled[False], 0.0)
    amortized = extra / saved if saved > 0 else float('inf')
    rows.append((count, compiled[False], compiled[True],
                 1e3 * run[False], 1e3 * run[True],
                 statistics.median(a / b for a, b in zip(times[False],
                                                         times[True])),
                 amortized))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--repeats', type=int, default=9)
  parser.add_argument('--calls', type=int, default=2)
  parser.add_argument('--steps', type=int, default=8,
                      help='power / Lanczos steps and probes per call')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--budget', type=int, nargs='+', default=[30, 150],
                      help='HVPs per trace estimate (variance table)')
  parser.add_argument('--keys', type=int, default=100,
                      help='keys per trace estimator (variance table)')
  parser.add_argument('--compile-counts', type=int, nargs='*',
                      default=[10, 100],
                      help='power iterations for the compile-time table')
  args = parser.parse_args(argv)
  repeats, calls, steps = ((2, 1, 2) if args.quick
                           else (args.repeats, args.calls, args.steps))
  budgets, num_keys = ([6], 4) if args.quick else (args.budget, args.keys)
  batch_size = 16 if args.quick else args.batch_size
  if args.quick:  # A smoke run: a tiny CNN, every code path (the MLP's
    # rows run the same code on another model).
    batch = random_batch(jax.random.key(1), batch_size, length=8)
    models = {
        'CNN': (cnn_loss, cnn_init(jax.random.key(0), length=8, channels=2)),
    }
    small = models
  else:
    batch = random_batch(jax.random.key(1), batch_size)
    models = {
        'CNN': (cnn_loss, cnn_init(jax.random.key(0))),
        'MLP': (mlp_loss, mlp_init(jax.random.key(0))),
    }
    small = {
        'CNN (4 channels)': (cnn_loss, cnn_small_init(jax.random.key(0))),
        'MLP (40-16-10)': (mlp_loss,
                           mlp_init(jax.random.key(0), (40, 16, 10))),
    }
  rows, sizes, picks = [], {}, {}
  for name, (loss_fn, params) in models.items():
    sizes[name] = sum(p.size for p in jax.tree.leaves(params))
    model_rows, picks[name] = measure(name, loss_fn, params, batch, steps,
                                      repeats, calls)
    rows += model_rows
  counts = [2] if args.quick else args.compile_counts
  cnn_loss_fn, cnn_params = models['CNN']
  compile_rows = compile_cost(cnn_loss_fn, cnn_params, batch, counts,
                              repeats if args.quick else 5)
  variance = [row for name, (loss_fn, params) in small.items()
              for row in trace_variance(name, loss_fn, params, batch, budgets,
                                        num_keys)]

  lines = [
      '## Hessian-vector products (bench_hessian.py)',
      '',
      f'Machine: {machine()}.',
      'Models: ' + ', '.join(f'{k} ({v:,} parameters)'
                             for k, v in sizes.items())
      + ' (CNN: the 1-D CNN of bench_step, two `lax.conv` layers; MLP:'
      f' 40-256-256-10 ReLU), batch {batch_size}. Median of {repeats}'
      f' interleaved rounds of {calls} calls, every helper under `jax.jit`;'
      f' power, Lanczos and Hutchinson are timed over {steps} steps per call'
      f' and divided by {steps}. A ratio is the median over rounds of'
      ' (time / gradient time in the same round). The default `unroll=None`'
      ' picks: ' + ', '.join(f'{k} unroll={v}' for k, v in picks.items())
      + '. Compile: first-call time unrolled / looped (one sample each).',
      'Command: `python benchmarks/bench_hessian.py`',
      '',
      '| model | operation | ms (default) | x gradient, unroll=False |'
      ' x gradient, unroll=True | x gradient, default |'
      ' speed-up of unrolling | compile, unrolled / looped |',
      '|---|---|---:|---:|---:|---:|---:|---:|',
  ]
  for row in rows:
    lines.append('| ' + ' | '.join(row) + ' |')
  lines += [
      '',
      'Expected: an HVP costs 2-4 gradients; a power step is one HVP plus two'
      ' reductions; a Lanczos step adds the full reorthogonalization'
      ' (O(m n) per step); a Hutchinson probe adds drawing a Rademacher'
      ' vector. On XLA:CPU a convolution in a `lax` loop body (and in a'
      ' `lax.cond` branch) loses its fast path: compare the CNN rows `grad`'
      ' and `grad (inside a loop)`, and the CNN helpers with `unroll=False`.'
      ' `unroll=True` traces every HVP into the program (static counts), at'
      ' a compile time that grows with the count; the default does so only'
      ' on CPU for a model whose curvature product holds a convolution, so'
      ' the MLP (and GPU / TPU) keep the compact loops.',
      '',
      'Compile time of unrolling: `hessian_top_eigenvalue(num_iterations=K,'
      ' tolerance=0)` on the CNN under `jax.jit`, lowering + compiling timed'
      ' once per form (noisy: one sample on a shared machine), a call timed'
      ' as the median of 5 interleaved rounds; "amortized after": the calls'
      ' after which the run time saved pays for the extra compile time.',
      '',
      '| K | compile, unroll=False (s) | compile, unroll=True (s) |'
      ' compile, unrolled / looped | call, unroll=False (ms) |'
      ' call, unroll=True (ms) | call, looped / unrolled |'
      ' amortized after (calls) |',
      '|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for count, c_loop, c_unr, r_loop, r_unr, speed, amortized in compile_rows:
    lines.append(
        f'| {count} | {c_loop:.2f} | {c_unr:.2f} | {c_unr / c_loop:.1f} |'
        f' {r_loop:.1f} | {r_unr:.1f} | {speed:.1f} | {amortized:.1f} |')
  lines += [
      '',
      'Trace estimators at an equal budget of N HVPs (Hutch++: k = N // 3'
      ' sketch vectors, N - 2k probes),'
      f' {num_keys} keys each, batch {batch_size}; exact trace from a dense'
      ' `jax.hessian`. std: over the keys; SE: the mean `standard_error` the'
      ' helper reports.',
      '',
      '| model | n | N | top-k share of ‖H‖_F² | exact tr(H) |'
      ' Hutchinson mean | Hutchinson std |'
      ' Hutchinson SE | Hutch++ mean | Hutch++ std | Hutch++ SE |'
      ' std Hutchinson / Hutch++ |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for (name, size, budget, share, exact, h_mean, h_std, h_se, p_mean,
       p_std, p_se, ratio) in variance:
    lines.append(
        f'| {name} | {size:,} | {budget} | {share:.2f} | {exact:.4f} |'
        f' {h_mean:.4f} | {h_std:.4f} |'
        f' {h_se:.4f} | {p_mean:.4f} | {p_std:.4f} | {p_se:.4f} |'
        f' {ratio:.2f} |')
  lines += [
      '',
      'Reading: Hutch++ takes the k top directions exactly and samples the'
      ' rest, so it wins (ratio > 1) when those k eigenvalues carry most of'
      ' ‖H‖_F² (a decaying spectrum, the "top-k share" column near 1);'
      ' otherwise the two thirds of the budget spent on the sketch leave too'
      ' few probes for the rest and Hutchinson is the better estimator at'
      ' the same budget (ratio < 1).',
  ]
  if args.quick:
    lines.insert(2, '_Quick smoke run (`--quick`): too few repeats to quote._')
    lines.insert(3, '')
  markdown = '\n'.join(lines)
  print(markdown)
  if not args.quick:
    path = write_section('hessian', markdown)
    print(f'\nwrote {path}')
  return rows


if __name__ == '__main__':
  main()
