"""Cost of Hessian-vector products and spectrum steps relative to a gradient.

On the small 1-D CNN of the other benchmarks and on a small MLP, timed side by
side in one run (interleaved rounds, medians), all jitted:

- ``grad``: one gradient, ``jax.grad(loss)`` -- the unit;
- ``hvp (fwd-over-rev)``: ``sharpness.hessian_vector_product`` (`jax.jvp` of
  `jax.grad`), what every Hessian helper uses;
- ``hvp (rev-over-rev)``: ``jax.grad`` of ``<grad, v>``, the textbook
  alternative, for comparison;
- ``power step``: ``hessian_top_eigenvalue`` with ``tolerance=0`` and
  K iterations, divided by K (one HVP, a dot product, a norm);
- ``lanczos step``: ``hessian_eigenvalues`` with m Lanczos steps (full
  reorthogonalization), divided by m;
- ``hutchinson probe``: ``hessian_trace`` with N probes, divided by N;
- ``grad (inside a loop)``: N gradients in a `jax.lax.fori_loop`, divided by
  N -- the fair unit for the iterative helpers, whose HVPs run in a loop body
  (on XLA:CPU, convolutions in a loop body lose their fast path:
  https://github.com/jax-ml/jax/issues/12868).

Theory: an HVP costs about 2-4 gradients (one forward-mode pass through the
backward pass). Run ``python benchmarks/bench_hessian.py`` (``--quick`` for a
smoke run); writes benchmarks/results/hessian.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax import sharpness

from _common import (cnn_init, cnn_loss, machine, median_ms, random_batch,
                     time_interleaved, write_section)


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


def make_fns(loss_fn, params, batch, steps):
  """Jitted callables (no arguments) for every measured operation."""
  vector = jax.tree.map(lambda p: jnp.ones_like(p) / np.sqrt(p.size), params)
  kwargs = {'batch': batch}

  grad = jax.jit(jax.grad(loss_fn))
  hvp = jax.jit(lambda p, v, b: sharpness.hessian_vector_product(
      loss_fn, p, v, loss_kwargs={'batch': b}))

  @jax.jit
  def hvp_rev(p, v, b):
    inner = lambda q: sum(
        jnp.vdot(g, u) for g, u in zip(jax.tree.leaves(jax.grad(loss_fn)(q, b)),
                                        jax.tree.leaves(v)))
    return jax.grad(inner)(p)

  power = jax.jit(lambda p, b: sharpness.hessian_top_eigenvalue(
      loss_fn, p, num_iterations=steps, tolerance=0.0,
      loss_kwargs={'batch': b}))
  lanczos = jax.jit(lambda p, b: sharpness.hessian_eigenvalues(
      loss_fn, p, k=1, num_iterations=steps, loss_kwargs={'batch': b}))
  trace = jax.jit(lambda p, b: sharpness.hessian_trace(
      loss_fn, p, num_samples=steps, loss_kwargs={'batch': b}))

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
  del kwargs
  fns = {
      'grad': functools.partial(grad, params, batch),
      'grad (inside a loop)': functools.partial(grad_loop, params, batch),
      'hvp (fwd-over-rev)': functools.partial(hvp, params, vector, batch),
      'hvp (rev-over-rev)': functools.partial(hvp_rev, params, vector, batch),
      'power step': functools.partial(power, params, batch),
      'lanczos step': functools.partial(lanczos, params, batch),
      'hutchinson probe': functools.partial(trace, params, batch),
  }
  per_call = {'grad (inside a loop)': steps, 'power step': steps, 'lanczos step': steps,
              'hutchinson probe': steps}
  return fns, per_call


def measure(name, loss_fn, params, batch, steps, repeats, calls):
  fns, per_call = make_fns(loss_fn, params, batch, steps)
  times = time_interleaved(fns, repeats, calls)
  for op, k in per_call.items():
    times[op] = [t / k for t in times[op]]
  rows = []
  for op in fns:
    ratio = statistics.median(
        t / g for t, g in zip(times[op], times['grad']))
    in_loop = statistics.median(
        t / g for t, g in zip(times[op], times['grad (inside a loop)']))
    rows.append((name, op, median_ms(times, op), ratio, in_loop))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--repeats', type=int, default=9)
  parser.add_argument('--calls', type=int, default=2)
  parser.add_argument('--steps', type=int, default=8,
                      help='power / Lanczos steps and probes per call')
  parser.add_argument('--batch-size', type=int, default=128)
  args = parser.parse_args(argv)
  repeats, calls, steps = ((2, 1, 2) if args.quick
                           else (args.repeats, args.calls, args.steps))
  batch_size = 16 if args.quick else args.batch_size
  batch = random_batch(jax.random.key(1), batch_size)
  if args.quick:  # A smoke run: one tiny model, every code path.
    models = {'MLP': (mlp_loss, mlp_init(jax.random.key(0), (40, 16, 10)))}
  else:
    models = {
        'CNN': (cnn_loss, cnn_init(jax.random.key(0))),
        'MLP': (mlp_loss, mlp_init(jax.random.key(0))),
    }
  rows = []
  sizes = {}
  for name, (loss_fn, params) in models.items():
    sizes[name] = sum(p.size for p in jax.tree.leaves(params))
    rows += measure(name, loss_fn, params, batch, steps, repeats, calls)

  lines = [
      '## Hessian-vector products (bench_hessian.py)',
      '',
      f'Machine: {machine()}.',
      'Models: ' + ', '.join(f'{k} ({v:,} parameters)'
                             for k, v in sizes.items())
      + ' (CNN: the 1-D CNN of bench_step; MLP: 40-256-256-10 ReLU), batch'
      f' {batch_size}. Median of {repeats} interleaved rounds of'
      f' {calls} calls; power, Lanczos and Hutchinson are timed over'
      f' {steps} steps per call and divided by {steps}. The ratio is the'
      ' median over rounds of (time / gradient time in the same round).',
      '',
      '| model | operation | ms | x gradient | x gradient inside a loop |',
      '|---|---|---:|---:|---:|',
  ]
  for model, op, ms, ratio, in_loop in rows:
    lines.append(f'| {model} | {op} | {ms:.3f} | {ratio:.2f} |'
                 f' {in_loop:.2f} |')
  lines += [
      '',
      'Expected: an HVP costs 2-4 gradients; a power step is one HVP plus two'
      ' reductions; a Lanczos step adds the full reorthogonalization'
      ' (O(m n) per step); a Hutchinson probe adds drawing a Rademacher'
      ' vector.',
      '',
      'The iterative helpers run their HVPs in a `lax` loop body. On XLA:CPU'
      ' the convolutions of a gradient lose their fast path inside a loop'
      ' body (https://github.com/jax-ml/jax/issues/12868): compare the CNN'
      ' rows `grad` and `grad (inside a loop)`. The last column divides by'
      ' the gradient inside a loop, the like-for-like unit; the MLP (no'
      ' convolutions) is unaffected.',
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
