"""Peak memory of a SAM step against an SGD step, from XLA's memory analysis.

Both steps are compiled for the same small CNN and batch; the figures are the
compiled executables' own accounting (arguments, outputs, temporaries), so
they are exact for this backend and free of timing noise. SAM keeps the
clean gradient and the perturbed weights alive next to the second backward
pass; the table says by how much, in bytes and in copies of the weights.

Run: ``python benchmarks/bench_memory.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse

import jax
import optax

import sam_optax

from _common import cnn_init, cnn_loss, machine, random_batch, write_section


def compiled_memory(step, *args):
  stats = jax.jit(step).lower(*args).compile().memory_analysis()
  return {
      'arguments': stats.argument_size_in_bytes,
      'outputs': stats.output_size_in_bytes,
      'temporaries': stats.temp_size_in_bytes,
      'peak (args + outputs + temps - aliased)': (
          stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes),
  }


def make_step(tx):
  def step(params, state, batch):
    grads = jax.grad(cnn_loss)(params, batch=batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state
  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--channels', type=int, default=64)
  args = parser.parse_args(argv)
  channels = 8 if args.quick else args.channels

  params = cnn_init(jax.random.key(0), channels=channels)
  batch = random_batch(jax.random.key(1), args.batch_size)
  param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
  steps = {
      'sgd': optax.sgd(0.1, momentum=0.9),
      'sam': optax.chain(sam_optax.sam(cnn_loss, rho=0.05),
                         optax.sgd(0.1, momentum=0.9)),
      'sam, 2 ascent steps': optax.chain(
          sam_optax.sam(cnn_loss, rho=0.05, ascent_steps=2),
          optax.sgd(0.1, momentum=0.9)),
  }
  memory = {
      name: compiled_memory(make_step(tx), params, tx.init(params), batch)
      for name, tx in steps.items()
  }
  lines = [
      '## Peak memory of a step (bench_memory.py)',
      '',
      f'Machine: {machine()}.',
      f'CNN with {channels} channels ({param_bytes / 1024:.0f} KiB of'
      f' float32 weights), batch {args.batch_size}; bytes from'
      ' `jit(step).lower(...).compile().memory_analysis()`.',
      f'Command: `python benchmarks/bench_memory.py{" --quick" if args.quick else ""}`',
      '',
      '| step | ' + ' | '.join(memory['sgd']) + ' |',
      '|---|' + '---|' * len(memory['sgd']),
  ]
  for name, stats in memory.items():
    lines.append(f'| {name} | '
                 + ' | '.join(f'{v / 1024:.0f} KiB' for v in stats.values())
                 + ' |')
  peak = 'peak (args + outputs + temps - aliased)'
  ratio = memory['sam'][peak] / memory['sgd'][peak]
  extra = (memory['sam']['temporaries'] - memory['sgd']['temporaries'])
  lines += [
      '',
      f'SAM / SGD peak: **{ratio:.2f}x**; SAM\'s extra temporaries:'
      f' {extra / param_bytes:.2f}x the size of the weights.',
  ]
  text = '\n'.join(lines)
  print(text)
  if not args.quick:
    print('wrote', write_section('memory', text))
  return ratio


if __name__ == '__main__':
  main()
