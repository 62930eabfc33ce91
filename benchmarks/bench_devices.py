"""Devices and m-sharpness: per-device SAM vs data-parallel SGD; chunk modes.

Part 1, on 8 fake CPU devices (`jax.shard_map`, a small CNN, the batch split
over the devices): the time of one training step of data-parallel SGD, of SAM
with a per-device perturbation (``layout=sam_optax.PerDevice(axis)``) and of SAM with a
synced perturbation (``PerDevice(axis, sync=True)``), with the number of all-reduce ops
in each compiled step. The fake devices share this machine's cores, so times
measure total work, not a speed-up.

Part 2, on one device: a SAM step whose batch is split into chunks of m
examples (in-device m-sharpness, ``layout=sam_optax.Chunks(m, mode=...)``),
``'sequential'`` (`jax.lax.scan`) against ``'vectorized'`` (`jax.vmap`), next
to plain SAM and to SAM with gradient accumulation
(``Chunks(m, shared=True)`` with the clean gradient from
`sam_optax.chunked_value_and_grad`): time per step and the compiled
executable's memory (XLA memory analysis: temporaries, and the total with
arguments and outputs).

Times are medians over interleaved rounds, ratios are medians of per-round
ratios measured side by side.

Run: ``python benchmarks/bench_devices.py`` (``--quick`` for a smoke run).
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
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sam_optax  # noqa: E402

from _common import cnn_init  # noqa: E402
from _common import cnn_loss  # noqa: E402
from _common import machine  # noqa: E402
from _common import median_ms  # noqa: E402
from _common import paired_ratio  # noqa: E402
from _common import random_batch  # noqa: E402
from _common import time_interleaved  # noqa: E402
from _common import write_section  # noqa: E402

RHO = 0.05
ALL_REDUCE = re.compile(r'\ball-reduce(?:-start)?\(')


def all_reduces(compiled) -> int:
  return len(ALL_REDUCE.findall(compiled.as_text()))


def memory(compiled) -> tuple[float, float]:
  """(temporaries, arguments + outputs + temporaries) in MiB."""
  stats = compiled.memory_analysis()
  temp = stats.temp_size_in_bytes
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + temp
           - stats.alias_size_in_bytes)
  return temp / 2 ** 20, total / 2 ** 20


def train_step(tx, local):
  def step(params, state, batch):
    grads = jax.grad(cnn_loss)(local(params), batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state
  return step


def part_devices(args):
  devices = jax.device_count()
  mesh = jax.make_mesh((devices,), ('d',))
  local = lambda p: jax.lax.pcast(p, 'd', to='varying')
  sgd = optax.sgd(0.1, momentum=0.9)
  setups = {
      'data-parallel SGD': sgd,
      'SAM, per-device perturbation': optax.chain(
          sam_optax.sam(cnn_loss, RHO, layout=sam_optax.PerDevice('d')), sgd),
      'SAM, synced perturbation': optax.chain(
          sam_optax.sam(cnn_loss, RHO,
                        layout=sam_optax.PerDevice('d', sync=True)),
          sgd),
  }
  params = cnn_init(jax.random.key(0), channels=args.channels)
  batch = random_batch(jax.random.key(1), args.per_device * devices)
  batch = jax.device_put(batch, NamedSharding(mesh, P('d')))
  replicated = NamedSharding(mesh, P())
  fns, counts = {}, {}
  for name, tx in setups.items():
    if name == 'data-parallel SGD':
      def step(params, state, batch, tx=tx):
        grads = jax.lax.pmean(jax.grad(cnn_loss)(local(params), batch), 'd')
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
    else:
      step = train_step(tx, local)
    fn = jax.jit(jax.shard_map(step, mesh=mesh,
                               in_specs=(P(), P(), P('d')),
                               out_specs=(P(), P())))
    p, s = jax.device_put((params, tx.init(params)), replicated)
    compiled = fn.lower(p, s, batch).compile()
    counts[name] = all_reduces(compiled)
    fns[name] = lambda compiled=compiled, p=p, s=s: compiled(p, s, batch)
  # One call per timing (blocking on each): back-to-back collective programs
  # on fake CPU devices can starve XLA's thread pool on a small machine.
  rounds = args.repeats * args.calls
  times = time_interleaved(fns, rounds, 1)
  base = 'data-parallel SGD'
  lines = [
      f'Per-device SAM on {devices} fake CPU devices (`jax.shard_map`),'
      f' CNN with {args.channels} channels, {args.per_device} examples per'
      f' device ({args.per_device * devices} per step); median of'
      f' {rounds} interleaved rounds of one step each.',
      '',
      '| step | all-reduce ops | ms / step | x SGD step |',
      '|---|---|---|---|',
  ]
  for name in fns:
    lines.append(f'| {name} | {counts[name]} | {median_ms(times, name):.2f} |'
                 f' {paired_ratio(times, name, base):.2f} |')
  return '\n'.join(lines), counts


def mlp_init(key, width=256, length=40, classes=10):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      'w1': jax.random.normal(k1, (length, width)) / length ** 0.5,
      'w2': jax.random.normal(k2, (width, width)) / width ** 0.5,
      'w3': jax.random.normal(k3, (width, classes)) / width ** 0.5,
  }


def mlp_loss(params, batch):
  h = jnp.tanh(batch['x'] @ params['w1'])
  h = jnp.tanh(h @ params['w2'])
  logits = h @ params['w3']
  labels = jax.nn.one_hot(batch['y'], logits.shape[-1])
  return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))


def part_chunks(args, model):
  if model == 'cnn':
    loss_fn = cnn_loss
    params = cnn_init(jax.random.key(0), channels=args.channels)
    description = f'CNN with {args.channels} channels'
  else:
    loss_fn = mlp_loss
    params = mlp_init(jax.random.key(0), width=args.width)
    description = f'MLP 40-{args.width}-{args.width}-10'
  batch = random_batch(jax.random.key(1), args.batch)
  m = args.chunk
  setups = {
      f'SAM, no chunks (m={args.batch})': (
          sam_optax.sam(loss_fn, RHO), None),
      f'SAM chunks m={m}, sequential': (
          sam_optax.sam(loss_fn, RHO,
                        layout=sam_optax.Chunks(m, mode='sequential')), None),
      f'SAM chunks m={m}, vectorized': (
          sam_optax.sam(loss_fn, RHO,
                        layout=sam_optax.Chunks(m, mode='vectorized')), None),
      f'SAM + gradient accumulation, chunks of {m}, sequential': (
          sam_optax.sam(loss_fn, RHO, layout=sam_optax.Chunks(m, shared=True)),
          sam_optax.chunked_value_and_grad(loss_fn, m)),
  }
  fns, mems, update_mems = {}, {}, {}
  grads = jax.grad(loss_fn)(params, batch)
  for name, (tx, clean) in setups.items():
    def step(params, state, batch, tx=tx, clean=clean):
      if clean is None:
        grads = jax.grad(loss_fn)(params, batch)
      else:
        _, grads = clean(params, batch=batch)
      updates, state = tx.update(grads, state, params, batch=batch)
      return optax.apply_updates(params, updates), state
    state = tx.init(params)
    compiled = jax.jit(step).lower(params, state, batch).compile()
    mems[name] = memory(compiled)
    update_mems[name] = memory(jax.jit(
        lambda g, s, p, b, tx=tx: tx.update(g, s, p, batch=b)).lower(
            grads, state, params, batch).compile())[0]
    fns[name] = lambda compiled=compiled, s=state: compiled(params, s, batch)
  times = time_interleaved(fns, args.repeats, args.calls)
  base = next(iter(fns))
  lines = [
      f'Chunked SAM on one CPU device, {description}, batch {args.batch},'
      f' chunks of m={m} ({args.batch // m} chunks); median of'
      f' {args.repeats} interleaved rounds of {args.calls} steps. Memory from'
      ' the compiled executables (XLA memory analysis): temporaries of the'
      ' whole step (the caller\'s clean gradient included: full-batch except'
      ' with gradient accumulation), of `tx.update` alone, and the step\'s'
      ' total with arguments and outputs.',
      '',
      '| step | ms / step | x plain SAM | step temporaries (MiB) |'
      ' update temporaries (MiB) | step total (MiB) |',
      '|---|---|---|---|---|---|',
  ]
  for name in fns:
    temp, total = mems[name]
    lines.append(f'| {name} | {median_ms(times, name):.2f} |'
                 f' {paired_ratio(times, name, base):.2f} | {temp:.2f} |'
                 f' {update_mems[name]:.2f} | {total:.2f} |')
  return '\n'.join(lines), mems


READING = '''Reading. The all-reduce column is counted in the compiled HLO:
per-device SAM needs the same single all-reduce as data-parallel SGD (the
gradient and the diagnostics ride in one variadic all-reduce), and syncing
the perturbation adds exactly one. In-device chunks cost one extra pass
(each chunk's own clean gradient). `'sequential'` bounds the memory of
`tx.update` to one chunk, while `'vectorized'` holds one gradient per chunk
but runs them as one batched program. On XLA:CPU a convolution inside a
`lax.scan` body runs far slower than the same convolution outside a loop
(https://github.com/jax-ml/jax/issues/12868), which is why the CNN's
sequential rows cost so much more than the MLP's; prefer `'vectorized'` on
CPU when the memory allows. Gradient accumulation
(`layout=Chunks(m, shared=True)` with `chunked_value_and_grad`, equal to
full-batch SAM in tests/pipeline/test_devices.py) runs the step in the memory of one
chunk.'''


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--channels', type=int, default=32)
  parser.add_argument('--per-device', type=int, default=32)
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--chunk', type=int, default=16)
  parser.add_argument('--width', type=int, default=256)
  parser.add_argument('--repeats', type=int, default=15)
  parser.add_argument('--calls', type=int, default=5)
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes, 2 rounds and the chunks on the MLP'
                      ' only, for a smoke test (prints only, leaves'
                      ' benchmarks/results alone)')
  parser.add_argument('--no-write', action='store_true',
                      help='print only; leave benchmarks/results alone')
  args = parser.parse_args(argv)
  if args.quick:
    args.channels, args.per_device, args.batch, args.chunk = 4, 4, 32, 8
    args.width = 16
    args.repeats, args.calls = 2, 1
  devices_md, counts = part_devices(args)
  print(devices_md, flush=True)
  chunk_sections, mems = [], {}
  for model in ('mlp',) if args.quick else ('mlp', 'cnn'):
    chunks_md, mems[model] = part_chunks(args, model)
    print(chunks_md, flush=True)
    chunk_sections += [chunks_md, '']
  command = 'python benchmarks/bench_devices.py' + (
      ' --quick' if args.quick else '')
  section = '\n'.join([
      '## Devices and m-sharpness',
      '',
      f'Machine: {machine()}. Command: `{command}`.',
      '',
      devices_md,
      '',
  ] + chunk_sections + [READING])
  if not (args.quick or args.no_write):  # a smoke run keeps the results
    print('wrote', write_section('devices', section))
  return {'all_reduces': counts, 'memory': mems}


if __name__ == '__main__':
  main()
