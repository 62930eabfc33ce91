"""Time per step of chain(sam, sgd) against its peers, on a small CNN.

Compared side by side in one run, interleaved, on the same batch:

- ``2x sgd``: two plain SGD steps (value_and_grad + update), the floor for
  any two-gradient method;
- ``hand-written``: a jitted SAM step written out by hand (grad, normalize,
  grad at w + eps, SGD);
- ``sam_optax.sam``: ``optax.chain(sam_optax.sam(loss, rho), optax.sgd(lr))``;
- ``optax.contrib.sam``: optax's SAM in opaque mode (sync_period=2), which
  gives the same update from one ``update`` call.

Run: ``python benchmarks/bench_step.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import optax

import sam_optax

from _common import (cnn_init, cnn_loss, machine, median_ms, paired_ratio,
                     random_batch, time_interleaved, write_section)

RHO, LR = 0.05, 0.1


def make_steps():
  sgd = optax.sgd(LR)

  @jax.jit
  def sgd_step(params, state, batch):
    loss, grads = jax.value_and_grad(cnn_loss)(params, batch)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  @jax.jit
  def hand_written_step(params, state, batch):
    loss, g0 = jax.value_and_grad(cnn_loss)(params, batch)
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(g0)))
    perturbed = jax.tree.map(lambda p, g: p + RHO * g / (norm + 1e-12),
                             params, g0)
    grads = jax.grad(cnn_loss)(perturbed, batch)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  ours = optax.chain(sam_optax.sam(cnn_loss, rho=RHO), sgd)

  @jax.jit
  def ours_step(params, state, batch):
    loss, grads = jax.value_and_grad(cnn_loss)(params, batch=batch)
    updates, state = ours.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, loss

  contrib = optax.contrib.sam(
      sgd, optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
      sync_period=2, opaque_mode=True)

  @jax.jit
  def contrib_step(params, state, batch):
    loss, grads = jax.value_and_grad(cnn_loss)(params, batch)
    grad_fn = jax.grad(lambda p, _: cnn_loss(p, batch))
    updates, state = contrib.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, loss

  return {
      'sgd': (sgd_step, sgd),
      'hand-written': (hand_written_step, sgd),
      'sam_optax.sam': (ours_step, ours),
      'optax.contrib.sam': (contrib_step, contrib),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--repeats', type=int, default=31)
  parser.add_argument('--calls', type=int, default=20)
  parser.add_argument('--batch-size', type=int, default=128)
  args = parser.parse_args(argv)
  repeats, calls = (3, 2) if args.quick else (args.repeats, args.calls)

  params = cnn_init(jax.random.key(0))
  batch = random_batch(jax.random.key(1), args.batch_size)
  steps = make_steps()
  fns = {
      name: functools.partial(step, params, tx.init(params), batch)
      for name, (step, tx) in steps.items()
  }
  # The four steps compute the same update.
  reference = fns['hand-written']()[0]
  for name in ('sam_optax.sam', 'optax.contrib.sam'):
    for a, b in zip(jax.tree.leaves(fns[name]()[0]),
                    jax.tree.leaves(reference)):
      assert jnp.allclose(a, b, rtol=1e-4, atol=1e-6), name

  times = time_interleaved(fns, repeats, calls)
  rows = [
      ('sam_optax.sam / (2 x sgd step)',
       paired_ratio(times, 'sam_optax.sam', 'sgd', scale=2.0), '<= 1.10'),
      ('sam_optax.sam / hand-written SAM step',
       paired_ratio(times, 'sam_optax.sam', 'hand-written'), '<= 1.05'),
      ('sam_optax.sam / optax.contrib.sam (opaque)',
       paired_ratio(times, 'sam_optax.sam', 'optax.contrib.sam'), '<= 1.00'),
      ('hand-written / (2 x sgd step)',
       paired_ratio(times, 'hand-written', 'sgd', scale=2.0), ''),
  ]
  lines = [
      '## SAM step time (bench_step.py)',
      '',
      f'Machine: {machine()}.',
      f'Small 1-D CNN ({sum(p.size for p in jax.tree.leaves(params)):,}'
      f' parameters), batch {args.batch_size}; median of {repeats}'
      f' interleaved rounds of {calls} calls each; ratios are medians of the'
      ' per-round ratios.',
      f'Command: `python benchmarks/bench_step.py{" --quick" if args.quick else ""}`',
      '',
      '| step | median ms |',
      '|---|---|',
  ]
  lines += [f'| {name} | {median_ms(times, name):.3f} |' for name in fns]
  lines += ['', '| ratio | measured | target |', '|---|---|---|']
  lines += [f'| {name} | {value:.3f} | {target} |'
            for name, value, target in rows]
  text = '\n'.join(lines)
  print(text)
  if not args.quick:
    print('wrote', write_section('step', text))
  return rows


if __name__ == '__main__':
  main()
