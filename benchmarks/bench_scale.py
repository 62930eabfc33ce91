"""SAM from 10K to 8.5M parameters: time, memory and compiled HLO per step.

For MLPs of about 10K, 100K, 2.2M and 8.5M float32 parameters (256 inputs,
three ReLU hidden layers, 10 classes) and the small 1-D CNN of _common.py,
batch 128, four training steps are compared side by side. Each is one
jitted ``(params, opt_state, batch) -> (params, opt_state)`` that computes
the clean gradient with `jax.value_and_grad`, with params and opt_state
donated (``donate_argnums=(0, 1)``, the same for all four):

- ``ours``: ``optax.chain(sam_optax.sam(loss, rho), optax.sgd(lr, momentum))``;
- ``hand-written``: g = grad(w); eps = rho g / ||g|| (one global norm);
  g1 = grad(w + eps); the same ``optax.sgd`` momentum update on g1;
- ``optax.contrib.sam``: opaque mode, ``sync_period=2`` (one adversarial
  step and one outer step per call: one SAM step, as ours), adversarial
  optimizer ``chain(contrib.normalize(), sgd(rho))``, ``grad_fn=`` given;
- ``2x SGD``: two plain SGD-momentum steps in one program (the floor for
  any two-gradient method).

The script checks that ours, the hand-written step and optax.contrib.sam give
the same weights after two calls (so each call is one SAM step), then times
them in interleaved rounds. Reported: median ms per step and medians of the
per-round ratios; XLA's memory analysis of the compiled step (temporaries in
units of the parameters' bytes); and op counts of the compiled HLO
(``compiled.as_text()``): fusions, reduce, reduce-window and select ops (in
all computations, fused bodies included), and "weight passes": kernels of
the entry computation other than matrix products (``dot``, convolution and
fusions around them) that read or write an array shaped like a weight
(a parameter leaf of at least a tenth of the largest leaf's size) -- the
elementwise and reduction sweeps over parameter-sized memory.

Run: ``python benchmarks/bench_scale.py`` (``--quick`` for a smoke run that
prints only; ``--without-rules`` to see what the overflow-safe norm and the
bad-step check cost, by swapping them out).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

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

RHO, LR, MOMENTUM = 0.05, 0.1, 0.9
INPUTS, CLASSES = 256, 10
OURS, HAND, CONTRIB, SGD2 = ('ours', 'hand-written', 'optax.contrib.sam',
                             '2x SGD')


# ----------------------------------------------------------------- models


def mlp_init(seed, width, inputs=INPUTS, classes=CLASSES, hidden=3):
  """Weights drawn with NumPy (no eager JAX ops to compile)."""
  rng = np.random.default_rng(seed)
  sizes = [inputs] + [width] * hidden + [classes]
  return [{'w': jnp.asarray(rng.standard_normal((a, b), np.float32)
                            / np.float32(np.sqrt(a))),
           'b': jnp.zeros(b)}
          for a, b in zip(sizes[:-1], sizes[1:])]


def mlp_batch(seed, batch_size, inputs=INPUTS, classes=CLASSES):
  rng = np.random.default_rng(seed)
  return {'x': jnp.asarray(rng.standard_normal((batch_size, inputs),
                                               np.float32)),
          'y': jnp.asarray(rng.integers(0, classes, batch_size, np.int32))}


def mlp_loss(params, batch):
  h = batch['x']
  for i, layer in enumerate(params):
    h = h @ layer['w'] + layer['b']
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  labels = jax.nn.one_hot(batch['y'], h.shape[-1])
  return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(h), -1))


def models(args):
  """(name, description, loss, params, batch) for each model measured."""
  out = []
  for width in args.widths:
    out.append((f'MLP w={width}',
                f'MLP {INPUTS}-{width}-{width}-{width}-{CLASSES}', mlp_loss,
                mlp_init(0, width), mlp_batch(1, args.batch)))
  if args.channels:
    out.append((f'CNN c={args.channels}',
                f'1-D CNN, {args.channels} channels (_common.cnn_init)',
                cnn_loss, cnn_init(jax.random.key(0),
                                   channels=args.channels),
                random_batch(jax.random.key(1), args.batch)))
  return out


def size(params) -> int:
  return sum(p.size for p in jax.tree.leaves(params))


# ------------------------------------------------------------ the steps


def make_steps(loss):
  """name -> (step, tx); every step is (params, state, batch) -> same."""
  sgd = optax.sgd(LR, momentum=MOMENTUM)

  ours = optax.chain(sam_optax.sam(loss, rho=RHO), sgd)

  def ours_step(params, state, batch):
    _, grads = jax.value_and_grad(loss)(params, batch)
    updates, state = ours.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  def hand_step(params, state, batch):
    _, g = jax.value_and_grad(loss)(params, batch)
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
    scale = RHO / norm
    perturbed = jax.tree.map(lambda p, x: p + scale * x, params, g)
    g1 = jax.grad(loss)(perturbed, batch)
    updates, state = sgd.update(g1, state, params)
    return optax.apply_updates(params, updates), state

  contrib = optax.contrib.sam(
      sgd, optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
      sync_period=2, opaque_mode=True)

  def contrib_step(params, state, batch):
    _, grads = jax.value_and_grad(loss)(params, batch)
    grad_fn = jax.grad(lambda p, _: loss(p, batch))
    updates, state = contrib.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  def two_sgd_steps(params, state, batch):
    for _ in range(2):
      _, grads = jax.value_and_grad(loss)(params, batch)
      updates, state = sgd.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  return {OURS: (ours_step, ours), HAND: (hand_step, sgd),
          CONTRIB: (contrib_step, contrib), SGD2: (two_sgd_steps, sgd)}


@jax.jit
def fresh(tree):
  """A copy to donate, leaving the original alone (one compile per tree)."""
  return jax.tree.map(jnp.copy, tree)


def _max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class Runner:
  """Calls a compiled donating step, carrying params and state along."""

  def __init__(self, compiled, params, state, batch):
    self.compiled, self.batch = compiled, batch
    self.params, self.state = fresh(params), fresh(state)

  def __call__(self):
    self.params, self.state = self.compiled(self.params, self.state,
                                            self.batch)
    return self.params


# ------------------------------------------------------------------ HLO

_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%(?P<name>[\w.-]+)\s*=\s*(?P<shape>.+?)\s+'
    r'(?P<op>[a-z][\w-]*)\((?P<operands>[^)]*)\)(?P<rest>.*)$')
_ARRAY = re.compile(r'[a-z]\w*\[([\d,]*)\]')
_COUNTED = {'fusion': 'fusions', 'reduce': 'reduce',
            'reduce-window': 'reduce-window', 'select': 'select'}
_TRIVIAL = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast'}


def _shapes(text: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in m.group(1).split(',') if d)
          for m in _ARRAY.finditer(text)]


def _entry(hlo: str) -> list[re.Match]:
  lines = hlo[hlo.index('\nENTRY'):].splitlines()[1:]
  return [m for m in map(_INSTRUCTION.match, lines) if m]


def _bodies(hlo: str) -> dict[str, str]:
  """Computation name -> its text (fused computations included)."""
  return {m.group(1): m.group(2) for m in re.finditer(
      r'^%([\w.-]+) .*?\{\n(.*?)^\}', hlo, re.M | re.S)}


def _is_matmul(m: re.Match, bodies: dict[str, str]) -> bool:
  """A dot or convolution, or a fusion around one."""
  if m.group('op') in ('dot', 'convolution'):
    return True
  called = re.search(r'calls=%([\w.-]+)', m.group('rest'))
  body = bodies.get(called.group(1), '') if called else ''
  return m.group('op') == 'fusion' and bool(
      re.search(r' (?:dot|convolution)\(', body))


def hlo_counts(compiled, params) -> dict[str, int]:
  """Op counts of the compiled program (see the module docstring)."""
  hlo = compiled.as_text()
  counts = dict.fromkeys(list(_COUNTED.values()) + ['weight passes'], 0)
  for line in hlo.splitlines():
    m = _INSTRUCTION.match(line)
    if m and m.group('op') in _COUNTED:
      counts[_COUNTED[m.group('op')]] += 1
  leaves = jax.tree.leaves(params)
  largest = max(p.size for p in leaves)
  weights = {p.shape for p in leaves if p.size * 10 >= largest}
  counts['weight leaves'] = sum(p.shape in weights for p in leaves)
  entry, bodies = _entry(hlo), _bodies(hlo)
  shape_of = {m.group('name'): _shapes(m.group('shape')) for m in entry}
  for m in entry:
    if m.group('op') in _TRIVIAL or _is_matmul(m, bodies):
      continue
    touched = list(shape_of[m.group('name')])
    for operand in re.findall(r'%([\w.-]+)', m.group('operands')):
      touched += shape_of.get(operand, [])
    counts['weight passes'] += any(s in weights for s in touched)
  return counts


def kernel_census(compiled) -> collections.Counter:
  """Kernels of the entry computation, keyed 'XLA name <- JAX op'."""
  census = collections.Counter()
  for m in _entry(compiled.as_text()):
    if m.group('op') in _TRIVIAL:
      continue
    stem = re.sub(r'\.\d+$', '', m.group('name'))
    source = re.search(r'op_name="([^"]*)"', m.group('rest'))
    source = source.group(1).split('/')[-1] if source else '-'
    census[f'{stem} <- {source}'] += 1
  return census


def temp_in_params(compiled, params) -> tuple[float, float]:
  """(temporaries, args + outputs + temporaries - aliased) / param bytes."""
  stats = compiled.memory_analysis()
  param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return stats.temp_size_in_bytes / param_bytes, total / param_bytes


# ------------------------------------------------------------ measuring


def check_same_steps(compiled, params, states, batch, calls=2):
  """Ours, hand-written and contrib agree after `calls` steps."""
  out = {}
  for name in (OURS, HAND, CONTRIB):
    p, s = fresh(params), fresh(states[name])
    for _ in range(calls):
      p, s = compiled[name](p, s, batch)
    out[name] = p
  moved = _max_abs_diff(out[HAND], params)
  errors = {}
  for name in (OURS, CONTRIB):
    diff = _max_abs_diff(out[name], out[HAND])
    errors[name] = diff / moved
    assert errors[name] < 1e-3, (name, diff, moved)
  return errors


def measure(model, args):
  name, description, loss, params, batch = model
  steps = make_steps(loss)
  compiled, states, counts, memory = {}, {}, {}, {}
  for step_name, (step, tx) in steps.items():
    states[step_name] = tx.init(params)
    compiled[step_name] = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, states[step_name], batch).compile()
    counts[step_name] = hlo_counts(compiled[step_name], params)
    memory[step_name] = temp_in_params(compiled[step_name], params)
  errors = check_same_steps(compiled, params, states, batch)
  runners = {n: Runner(compiled[n], params, states[n], batch)
             for n in compiled}
  # Calls per timed block: enough for ~args.block seconds of the slowest.
  slowest = 0.0
  for runner in runners.values():
    jax.block_until_ready(runner())
    start = time.perf_counter()
    jax.block_until_ready(runner())
    slowest = max(slowest, time.perf_counter() - start)
  calls = max(1, min(args.max_calls, round(args.block / slowest)))
  times = time_interleaved(runners, args.repeats, calls)
  finite = all(bool(np.all(np.isfinite(np.asarray(x))))
               for r in runners.values() for x in jax.tree.leaves(r.params))
  return dict(
      name=name, description=description, params=size(params),
      calls=calls, times=times, counts=counts, memory=memory,
      errors=errors, finite=finite,
      census={n: kernel_census(compiled[n]) for n in (OURS, HAND)})


# --------------------------------------------------------------- report


def library_version() -> str:
  """sam_optax's version and git commit (noting uncommitted changes)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  version = f'sam_optax {getattr(sam_optax, "__version__", "?")}'
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root,
                            capture_output=True, text=True, check=True)
    dirty = subprocess.run(['git', 'status', '--porcelain', 'sam_optax'],
                           cwd=root, capture_output=True, text=True,
                           check=True)
  except (OSError, subprocess.CalledProcessError):
    return version
  return (f'{version} at commit {commit.stdout.strip()}'
          + (' with uncommitted changes to sam_optax/' if dirty.stdout.strip()
             else ''))


def _params(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n >= 1e6 else f'{n / 1e3:.1f}K'


def report(results, args, command) -> str:
  lines = [
      '## SAM at scale: 10K to 8.5M parameters (bench_scale.py)',
      '',
      f'Machine: {machine()}; {library_version()}.',
      f'Command: `{command}`.',
      '',
      f'Batch {args.batch}, float32, `optax.sgd({LR}, momentum={MOMENTUM})`'
      f' after SAM with rho={RHO}; every step is one jitted'
      ' `(params, opt_state, batch) -> (params, opt_state)` with params and'
      ' opt_state donated, computing the clean gradient with'
      ' `jax.value_and_grad`. Models: '
      + '; '.join(f'{r["name"]} = {r["description"]}, {r["params"]:,}'
                  ' parameters' for r in results) + '.'
      f' Times: median over {args.repeats} interleaved rounds (each round'
      ' times a block of back-to-back calls of every step in turn; calls per'
      ' block in the table); ratios are medians of the per-round ratios.'
      ' Before timing, ours and optax.contrib.sam were checked to give the'
      ' hand-written step\'s weights after two steps (max deviation relative'
      ' to the weights\' change in the table).',
      '',
      '### Time per step',
      '',
      f'| model | params | calls / block | {OURS} ms | {HAND} ms |'
      f' {CONTRIB} ms | {SGD2} ms | ours / hand-written | ours / contrib |'
      ' ours / (2x SGD) | hand-written / (2x SGD) | max deviation |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in results:
    t = r['times']
    lines.append(
        f'| {r["name"]} | {_params(r["params"])} | {r["calls"]} |'
        + ''.join(f' {median_ms(t, n):.3f} |' for n in (OURS, HAND, CONTRIB,
                                                       SGD2))
        + f' {paired_ratio(t, OURS, HAND):.3f} |'
        f' {paired_ratio(t, OURS, CONTRIB):.3f} |'
        f' {paired_ratio(t, OURS, SGD2):.3f} |'
        f' {paired_ratio(t, HAND, SGD2):.3f} |'
        f' {max(r["errors"].values()):.1e} |')
  lines += [
      '',
      '### Memory and compiled HLO',
      '',
      'Temporaries: `compiled.memory_analysis().temp_size_in_bytes` divided'
      ' by the parameters\' bytes (so 1.00 = one parameter-sized buffer);'
      ' peak: arguments + outputs + temporaries - aliased (donated), in the'
      ' same unit. Op counts from `compiled.as_text()`; weight passes are'
      ' the non-matmul kernels that read or write a weight-shaped array,'
      ' weight leaves the number of parameter leaves counted as weights.',
      '',
      '| model | step | temporaries (x params) | peak (x params) | fusions |'
      ' reduce | reduce-window | select | weight passes | weight leaves |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in results:
    for n in (OURS, HAND, CONTRIB, SGD2):
      c, (temp, peak) = r['counts'][n], r['memory'][n]
      lines.append(
          f'| {r["name"]} | {n} | {temp:.2f} | {peak:.2f} | {c["fusions"]} |'
          f' {c["reduce"]} | {c["reduce-window"]} | {c["select"]} |'
          f' {c["weight passes"]} | {c["weight leaves"]} |')
  # Which kernels ours has that the hand-written step has not, at the
  # largest model.
  r = max(results, key=lambda r: r['params'])
  ours, hand = r['census'][OURS], r['census'][HAND]
  keys = sorted(k for k in set(ours) | set(hand) if ours[k] != hand[k])
  lines += [
      '',
      f'Kernels of the entry computation whose count differs between ours'
      f' and the hand-written step, {r["name"]} (XLA\'s instruction name <-'
      ' the JAX op it came from):',
      '',
      f'| kernel | {OURS} | {HAND} |',
      '|---|---:|---:|',
  ]
  lines += [f'| `{k}` | {ours[k]} | {hand[k]} |' for k in keys]
  if not all(r['finite'] for r in results):
    lines += ['', 'Warning: some weights were not finite after timing.']
  return '\n'.join(lines)


def without_robustness_rules():
  """Swaps out the overflow-safe norm and the bad-step check, in place."""
  from sam_optax._src.core import tree_math
  tree_math.tree_norm = lambda tree: jnp.sqrt(sum(
      jnp.sum(jnp.square(tree_math.wide(x))) for x in jax.tree.leaves(tree)))
  tree_math.all_finite = lambda tree: jnp.asarray(True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--widths', type=int, nargs='+',
                      default=[32, 168, 992, 2000],
                      help='MLP hidden widths (10K, 100K, 2.2M, 8.5M params)')
  parser.add_argument('--channels', type=int, default=32,
                      help='CNN channels (0: no CNN)')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=31)
  parser.add_argument('--block', type=float, default=0.25,
                      help='seconds of the slowest step per timed block')
  parser.add_argument('--max-calls', type=int, default=50)
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes and 2 rounds (prints only, leaves'
                      ' benchmarks/results alone)')
  parser.add_argument('--no-write', action='store_true',
                      help='print only; leave benchmarks/results alone')
  parser.add_argument('--without-rules', action='store_true',
                      help='what the robustness rules cost: ours with a plain'
                      ' sum-of-squares norm and no non-finite check (prints'
                      ' only; a measurement aid, not a usable optimizer)')
  args = parser.parse_args(argv)
  if args.without_rules:
    without_robustness_rules()
    args.no_write = True
  if args.quick:
    args.widths, args.channels, args.batch = [16], 0, 16
    args.repeats, args.block, args.max_calls = 2, 0.0, 1
  start = time.perf_counter()
  results = []
  for model in models(args):
    results.append(measure(model, args))
    r = results[-1]
    print(f'{r["name"]}: {r["params"]:,} params, ours/hand'
          f' {paired_ratio(r["times"], OURS, HAND):.3f}, ours/contrib'
          f' {paired_ratio(r["times"], OURS, CONTRIB):.3f}, ours/2sgd'
          f' {paired_ratio(r["times"], OURS, SGD2):.3f}'
          f' ({time.perf_counter() - start:.0f} s)', flush=True)
  command = 'python benchmarks/bench_scale.py' + ''.join(
      f' {a}' for a in (argv if argv is not None else sys.argv[1:]))
  text = report(results, args, command)
  elapsed = time.perf_counter() - start
  text += f'\n\nThe run took {elapsed:.0f} s.'
  print(text)
  if not (args.quick or args.no_write):
    print('wrote', write_section('scale', text))
  return results


if __name__ == '__main__':
  main()
