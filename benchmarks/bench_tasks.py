"""The benchmark study: every variant on four real tasks, SAM at its best rho.

Each task is a file of benchmarks/tasks/ (see tasks/protocol.py: a task owns
its data, model and metric); this runner owns the optimizers, the seeds, the
training loop, the timing, the tables and the figures. Three stages per
task:

- ``lr``: the base optimizer over the task's ``lr_grid``, validation split
  (a table; the task's ``learning_rate`` stays as the task file sets it).
- ``rho``: SAM over the task's ``rho_grid`` and the base, validation split;
  the best rho is the best mean validation metric.
- ``main``: test split; the base, SAM at the best rho, every variant at its
  documented defaults and with rho from SAM's best rho (in the variant's
  own convention, ``RHO_SCALE``), decoupled WSAM, bSAM, SAM-ON where the
  model has normalization layers, and the old values of the defaults changed
  since 0.2 (``REVISION``; all in ``configs``).

Training: one jitted function per (task, configuration) runs ``lax.scan``
over a chunk of steps; the seed's parameters, optimizer state, step index,
key and data are its inputs, so one compile serves every seed -- and so are
the learning rate and rho, so one compile serves a variant at every rho.
Within a seed, every configuration trains side by side in one process, one chunk
each in turn (round-robin, the first configuration rotating); the first
chunk of each seed is an untimed warm-up (it compiles). x base is the
median over the timed rounds of a configuration's chunk time over the
base's in the same round. No run is wrapped in ``apply_if_finite``: a
non-finite metric is a diverged run, counted and reported as such.

  python benchmarks/bench_tasks.py                       # the whole study
  python benchmarks/bench_tasks.py --tasks noisy-cnn --stage main
  python benchmarks/bench_tasks.py --quick               # tiny; prints only
  python benchmarks/bench_tasks.py --replot              # tables, PNGs again
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import inspect
import json
import math
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

HERE = pathlib.Path(__file__).resolve().parent
for _path in (HERE.parent, HERE.parent / 'examples', HERE / 'tasks', HERE):
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

import _common  # noqa: E402
import sam_optax  # noqa: E402

TASKS = ('noisy-cnn', 'clean-lowdata', 'vit-digits', 'char-lm')
STAGES = ('lr', 'rho', 'main')
RESULTS = pathlib.Path(_common.RESULTS_DIR)
JSON_PATH = RESULTS / 'tasks.json'
MD_PATH = RESULTS / 'tasks.md'
MOMENTUM = 0.9
TARGET_CHUNKS = 10  # chunks per run: the timing's rounds (first untimed)
CLIP = (-150.0, 250.0)  # the summary figure's range of gain kept %, shown
KEEP, AT_MOST = 90.0, 1.25  # the moonshot: keep >= 90 % of SAM's gain at
# <= 1.25x the base optimizer's time per step, on every task.

# The 13 transformations, in the order of the tables.
VARIANTS = ('sam', 'asam', 'xsam', 'gsam', 'wsam', 'friendly_sam', 'vasso',
            'looksam', 'random_sam', 'ae_sam', 'esam', 'msam', 'bsam')
# SAM's radius in a variant's own convention: ASAM's radius is relative to
# the weights (default 0.5 against SAM's 0.05), MSAM's follows the momentum
# (a descent direction; 0.2's default 1.0 against SAM's 0.05, kept as the
# convention when the default became 0.3): the best SAM rho times this.
RHO_SCALE = {'asam': 10.0, 'msam': 20.0}
# Nominal gradient evaluations per step (forward passes not counted). ESAM:
# 1 + gamma (the re-gradient on the fraction gamma of the batch; with
# gamma < 1 also two forward passes); LookSAM: SAM every k=8 steps;
# random_sam: SAM with probability p=0.5; AE-SAM: adaptive, at most 2 (the
# measured share of SAM steps is in the tables).
# Not a default, but needed: ESAM's data selection (gamma < 1) splits the
# per-example arguments, and its default guess (every array with a leading
# dimension) would split the dropout key and the BatchNorm statistics too.
ESAM_BATCH_ARGNAMES = ('batch',)
GRADIENTS = {'sam': 2, 'asam': 2, 'xsam': 2, 'gsam': 2, 'wsam': 2,
             'friendly_sam': 2, 'vasso': 2, 'looksam': 1 + 1 / 8,
             'random_sam': 1.5, 'ae_sam': 2, 'esam': 2, 'msam': 1,
             'bsam': 2, 'decoupled_wsam': 2}


@dataclasses.dataclass
class Setup:
  """What a configuration's builder may use."""
  task: Any
  size: str
  steps: int
  learning_rate: float
  best_rho: Optional[float]

  @property
  def loss(self):
    return self.task.loss

  def schedule(self, peak=None):
    """The base optimizer's learning-rate schedule, from ``peak``."""
    peak = self.learning_rate if peak is None else peak
    if self.task.base == 'sgd':
      return optax.cosine_decay_schedule(peak, self.steps)
    warmup = int(self.task.warmup_fraction * self.steps)
    if isinstance(peak, (int, float)):
      return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, self.steps)
    # A traced peak (the lr sweep): optax's schedule compares it in Python;
    # with init and end values 0 the schedule scales with its peak.
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, self.steps)
    return lambda count: peak * unit(count)

  def base(self):
    if self.task.base == 'sgd':
      return optax.sgd(self.schedule(), momentum=MOMENTUM)
    return optax.adamw(self.schedule(), weight_decay=self.task.weight_decay)

  def front(self, transformation):
    """A sharpness-aware transformation chained in front of the base."""
    return optax.chain(transformation, self.base())

  def variant(self, name, **kwargs):
    """``name`` at its defaults but ``kwargs``, as a complete optimizer."""
    if name == 'bsam':
      peak = (self.learning_rate / (1 - MOMENTUM) if self.task.base == 'sgd'
              else self.learning_rate)
      return sam_optax.bsam(self.loss, learning_rate=self.schedule(peak),
                            num_data=self.task.num_data[self.size],
                            has_aux=True, **kwargs)
    if name == 'esam':
      kwargs = {'batch_argnames': ESAM_BATCH_ARGNAMES, **kwargs}
    if name == 'decoupled_wsam':
      return sam_optax.decoupled_wsam(self.loss, self.base(),
                                      learning_rate=self.schedule(),
                                      has_aux=True, **kwargs)
    return self.front(getattr(sam_optax, name)(self.loss, has_aux=True,
                                               **kwargs))


@dataclasses.dataclass(frozen=True)
class Config:
  """One row of a table: ``make(setup, **hparams)`` builds its optimizer.

  ``hparams`` (numbers) are traced inputs of the compiled training chunk,
  like the seed: the configurations of one ``family`` (default: the name)
  share one compiled function, whatever their values.
  """
  name: str
  make: Callable[..., optax.GradientTransformation]
  gradients: float
  takes_params: bool = False  # evaluates its own gradients (bSAM)
  hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
  family: str = ''


# The defaults revision: a knob of a variant whose 0.2 default (the first
# value) failed on a task, and the values it was weighed against, each at the
# variant's default rho with nothing else changed. The value that is the
# default now has no row here: it is the variant's own row.
REVISION = {'wsam': ('gamma', (0.9, 0.75, 0.6)),
            'looksam': ('alpha', (0.7, 0.3, 0.1)),
            'esam': ('gamma', (0.5, 0.8, 1.0)),
            'msam': ('rho', (1.0, 0.3)),
            'xsam': ('rho', (0.15, 0.05))}  # rho_max stays 0.15
STATIC = {('esam', 'gamma')}  # fixes shapes: one compile per value


def default_value(name, knob):
  fn = getattr(sam_optax, name)
  return float(inspect.signature(fn).parameters[knob].default)


def revision_configs():
  """A row per value of ``REVISION`` that is not the current default."""
  rows = []
  for name, (knob, values) in REVISION.items():
    for value in values:
      if math.isclose(value, default_value(name, knob)):
        continue
      label = f'{name} {knob}={value:g}'
      if (name, knob) in STATIC:
        make = lambda s, n=name, kw={knob: value}, **h: s.variant(n, **kw,
                                                                   **h)
        hparams, family = {'rho': default_value(name, 'rho')}, label
      else:  # traced: one compile for the knob's values (rho: the variant's)
        make = lambda s, n=name, **h: s.variant(n, **h)
        hparams = {'rho': default_value(name, 'rho'), knob: value}
        family = name if knob == 'rho' else f'{name} {knob}'
      grads = 1 + value if (name, knob) == ('esam', 'gamma') else (
          GRADIENTS[name])
      rows.append(Config(label, make, grads, False, hparams, family))
  return rows


def variant_configs(best_rho):
  """Each variant at its defaults, and at SAM's best rho in its convention."""
  rows = []
  for name in VARIANTS + ('decoupled_wsam',):
    grads, own = GRADIENTS[name], name == 'bsam'
    make = lambda s, n=name, **h: s.variant(n, **h)
    rows.append(Config(name, make, grads, own,
                       {'rho': default_value(name, 'rho')}, name))
    rho = best_rho * RHO_SCALE.get(name, 1.0)
    if name != 'sam' and not math.isclose(rho, default_value(name, 'rho')):
      rows.append(Config(f'{name} rho={rho:g}', make, grads, own,
                         {'rho': rho}, name))
  return rows


def configs(best_rho, has_norm):
  """The main stage's configurations.

  One more is one line in ``rows``, e.g. a cheap variant at SAM's best rho::

    Config('moonshot', lambda s, **h: s.variant('moonshot', **h), 1.2,
           False, {'rho': best_rho}),
  """
  rows = [
      Config('base', lambda s: s.base(), 1),
      Config('SAM', lambda s, **h: s.variant('sam', **h), 2, False,
             {'rho': best_rho}, 'sam'),
      *variant_configs(best_rho),
  ]
  # The moonshot's candidates: SAM only in the last 20 % (10 %) of the
  # steps, the base optimizer before (looksam's schedule with k=1: every
  # step from `start` is a SAM step). And LookSAM with its first SAM step at
  # 20 % of training (0.2's default for a user who gave total_steps).
  late = lambda fraction: lambda s, **h: s.variant(
      'looksam', k=1, start=int((1 - fraction) * s.steps), **h)
  rows += [
      Config('late SAM 20%', late(0.2), 1.2, False, {'rho': best_rho},
             'late20'),
      Config('late SAM 10%', late(0.1), 1.1, False, {'rho': best_rho},
             'late10'),
      Config('looksam from 20%', lambda s, **h: s.variant(
          'looksam', start=int(0.2 * s.steps), **h), 1 + 0.8 / 8, False,
             {'rho': best_rho}, 'looksam_t'),
  ]
  rows += [r for r in revision_configs() if r.name not in
           {row.name for row in rows}]
  if has_norm:
    rows.append(Config('SAM-ON', lambda s, **h: s.variant(
        'sam', perturbation_mask=sam_optax.normalization_mask, **h), 2, False,
                       {'rho': best_rho}))
  return rows


def load_task(name):
  return importlib.import_module(name.replace('-', '_')).TASK


def has_normalization(params):
  try:
    sam_optax.normalization_mask(params)
  except ValueError:
    return False
  return True


def _sam_step(state):
  """The ``sam_step`` flag of a (chained) optimizer state, or None."""
  found = []

  def visit(node):
    if hasattr(node, '_fields') and 'sam_step' in node._fields:
      found.append(node.sam_step)
      return True
    return False

  jax.tree_util.tree_map(lambda _: None, state, is_leaf=visit)
  return found[0] if found else None


def chunk_fn(task, make_tx, takes_params, size, length):
  """jit(params, model_state, opt_state, t, key, data, hparams): ``length``
  steps of the optimizer ``make_tx(hparams)``.

  Returns ``(params, model_state, opt_state, t + length, sam_steps)``;
  ``sam_steps`` counts the steps whose state says ``sam_step`` (-1 when the
  optimizer has no such flag). ``takes_params``: the optimizer evaluates
  its own gradients and is handed ``params`` for their structure; the
  model state then comes from a forward pass.
  """
  value_and_grad = jax.value_and_grad(task.loss, has_aux=True)

  def step(tx, data, key_train, carry, _):
    params, model_state, opt_state, t, sam_steps = carry
    key = jax.random.fold_in(key_train, t)
    batch = task.sample_batch(data, key, size)
    kwargs = dict(batch=batch, model_state=model_state, key=key)
    if takes_params:
      grads = params
      new_model_state = (task.loss(params, **kwargs)[1]
                         if jax.tree_util.tree_leaves(model_state)
                         else model_state)
    else:
      (_, new_model_state), grads = value_and_grad(params, **kwargs)
    updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
    flag = _sam_step(opt_state)
    sam_steps = sam_steps + (jnp.int32(-1) if flag is None
                             else jnp.asarray(flag, jnp.int32))
    return (optax.apply_updates(params, updates), new_model_state, opt_state,
            t + 1, sam_steps), None

  @jax.jit
  def chunk(params, model_state, opt_state, t, key_train, data, hparams):
    tx = make_tx(hparams)
    carry = (params, model_state, opt_state, t, jnp.int32(0))
    carry, _ = jax.lax.scan(lambda c, x: step(tx, data, key_train, c, x),
                            carry, None, length=length)
    return carry

  return chunk


def chunk_lengths(steps):
  """Chunks of equal length (a divisor of ``steps`` near TARGET_CHUNKS),
  else equal chunks and a shorter last one (untimed)."""
  if steps < 2:
    raise ValueError(f'a task needs >= 2 steps to be timed, got {steps}.')
  divisors = [n for n in range(2, 4 * TARGET_CHUNKS + 1) if steps % n == 0]
  if divisors:
    n = min(divisors, key=lambda n: abs(n - TARGET_CHUNKS))
    return [steps // n] * n
  length = math.ceil(steps / TARGET_CHUNKS)
  return [length] * (steps // length) + [steps % length] * bool(steps % length)


class Progress:
  """One progress line on stderr: tqdm if it is installed, else prints."""

  def __init__(self, total, desc, enabled):
    self.bar, self.count, self.total, self.desc = None, 0, total, desc
    self.enabled = enabled
    if enabled:
      try:
        import tqdm  # pylint: disable=g-import-not-at-top
        self.bar = tqdm.tqdm(total=total, desc=desc, file=sys.stderr,
                             leave=False)
      except ImportError:
        pass

  def update(self, note=''):
    self.count += 1
    if self.bar is not None:
      self.bar.set_postfix_str(note, refresh=False)
      self.bar.update()
    elif self.enabled and (self.count % max(1, self.total // 20) == 0
                           or self.count == self.total):
      print(f'{self.desc}: {self.count}/{self.total} {note}', file=sys.stderr,
            flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def train_side_by_side(task, size, steps, rows, setup, seeds, split,
                       progress=True, label=''):
  """Every configuration of ``rows``, seed after seed, round-robin.

  Returns ``{name: {'metric': [per seed], 'seconds': [per timed round],
  'ratio': [to rows[0] per timed round], 'sam_steps': [per seed]}}``.
  """
  lengths = chunk_lengths(steps)
  def make_tx(row, hparams):
    tx = row.make(setup, **hparams)
    return (tx if isinstance(tx, optax.GradientTransformationExtraArgs)
            else optax.with_extra_args_support(tx))

  family = {r.name: r.family or r.name for r in rows}
  fns = {}
  for r in rows:
    for n in set(lengths):
      if (family[r.name], n) not in fns:
        fns[family[r.name], n] = chunk_fn(
            task, lambda h, r=r: make_tx(r, h), r.takes_params, size, n)
  hparams = {r.name: {k: jnp.float32(v) for k, v in r.hparams.items()}
             for r in rows}
  init = {r.name: make_tx(r, r.hparams).init for r in rows}
  names = [r.name for r in rows]
  out = {n: {'metric': [], 'seconds': [], 'ratio': [], 'sam_steps': []}
         for n in names}
  bar = Progress(len(seeds) * len(lengths) * len(names),
                 f'{task.name} {label}'.strip(), progress)
  for seed in seeds:
    data = jax.tree_util.tree_map(jnp.asarray, task.load(size, seed))
    key_init, key_train = jax.random.split(jax.random.PRNGKey(seed))
    params, model_state = task.init(key_init, size)
    runs = {n: [params, model_state, init[n](params), jnp.int32(0),
                jnp.int32(0)] for n in names}
    for i, length in enumerate(lengths):
      shift = i % len(names)
      times = {}
      for name in names[shift:] + names[:shift]:
        run = runs[name]
        start = time.perf_counter()
        *run[:4], count = fns[family[name], length](*run[:4], key_train,
                                                    data, hparams[name])
        jax.block_until_ready(run)
        times[name] = time.perf_counter() - start
        run[4] = run[4] + count
        bar.update(f'seed {seed} chunk {i + 1}/{len(lengths)} {name}')
      if i > 0 and length == lengths[0]:
        for name in names:
          out[name]['seconds'].append(times[name] / length)
          out[name]['ratio'].append(times[name] / times[names[0]])
    for name in names:
      params_n, model_state_n = runs[name][:2]
      value = float(task.metric(params_n, model_state_n, data, split, size))
      out[name]['metric'].append(value)
      count = int(runs[name][4])
      out[name]['sam_steps'].append(count / steps if count >= 0 else None)
  bar.close()
  return out


# ----------------------------------------------------------------- numbers


def finite(values):
  return [v for v in values if v is not None and math.isfinite(v)]


def mean_std(values):
  """Mean and sample std; NaN when any run diverged (non-finite)."""
  if len(finite(values)) < len(values) or not values:
    return math.nan, math.nan
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return statistics.fmean(values), std


def gain_kept(values, base_mean, sam_mean):
  """Per seed, in %: (v - base) / (SAM - base); NaN if SAM gained nothing."""
  gain = sam_mean - base_mean
  if not math.isfinite(gain) or gain == 0:
    return [math.nan] * len(values)
  return [100 * (v - base_mean) / gain for v in values]


def best_rho(rho_runs, higher_is_better):
  """The rho of the best mean validation metric (a diverged rho never)."""
  scored = {rho: mean_std(v)[0] for rho, v in rho_runs.items()}
  scored = {r: m for r, m in scored.items() if math.isfinite(m)}
  if not scored:
    raise RuntimeError('SAM diverged at every rho of the grid; no best rho.')
  pick = max if higher_is_better else min
  return pick(scored, key=scored.get)


def sam_improves(base_mean, sam_mean, higher_is_better):
  diff = sam_mean - base_mean
  return diff > 0 if higher_is_better else diff < 0


def summarize_main(main, higher_is_better):
  """Mean, std, gain kept, x base, ms/step of every main configuration."""
  base = mean_std(main['base']['metric'])[0]
  sam = mean_std(main['SAM']['metric'])[0]
  rows = {}
  for name, r in main.items():
    mean, std = mean_std(r['metric'])
    kept = gain_kept(r['metric'], base, sam)
    kept_mean, kept_std = mean_std(kept)
    shares = [s for s in r.get('sam_steps', []) if s is not None]
    rows[name] = {
        'mean': mean, 'std': std, 'metric': r['metric'],
        'kept': kept_mean, 'kept_std': kept_std,
        'x_base': (statistics.median(r['ratio']) if r['ratio']
                   else math.nan),
        'ms': (1e3 * statistics.median(r['seconds']) if r['seconds']
               else math.nan),
        'gradients': r['gradients'],
        'sam_share': statistics.fmean(shares) if shares else None,
        'diverged': len(r['metric']) - len(finite(r['metric'])),
    }
  rows['SAM']['improves'] = sam_improves(base, sam, higher_is_better)
  return rows


# ----------------------------------------------------------------- tables


def _f(value, digits=2):
  return 'diverged' if not math.isfinite(value) else f'{value:.{digits}f}'


def _m(value):
  """A metric: 3 decimals below 10 (a loss in nats), else 2."""
  return _f(value, 3 if math.isfinite(value) and abs(value) < 10 else 2)


def _seeds(values):
  return ' '.join('NaN' if not math.isfinite(v) else _m(v) for v in values)


def sweep_table(runs, key_name):
  lines = [f'| {key_name} | validation metric (mean ± std) | per seed |',
           '|---|---|---|']
  for key, values in runs.items():
    mean, std = mean_std(values)
    cell = (f'{_m(mean)} ± {_m(std)}' if math.isfinite(mean) else
            f'diverged on {len(values) - len(finite(values))} of'
            f' {len(values)} seeds')
    lines.append(f'| {key} | {cell} | {_seeds(values)} |')
  return '\n'.join(lines)


def main_table(rows):
  lines = ['| configuration | test metric (mean ± std) | per seed |'
           ' gain kept % (mean ± std) | x base (time / step) | ms / step |'
           ' gradients / step (nominal) | SAM steps (measured) |',
           '|---|---|---|---|---|---|---|---|']
  for name, r in rows.items():
    metric = (f"{_m(r['mean'])} ± {_m(r['std'])}" if not r['diverged'] else
              f"diverged on {r['diverged']} of {len(r['metric'])} seeds")
    kept = (f"{r['kept']:.0f} ± {r['kept_std']:.0f}"
            if math.isfinite(r['kept']) else 'n/a')
    share = '' if r['sam_share'] is None else f"{100 * r['sam_share']:.0f} %"
    lines.append(
        f"| {name} | {metric} | {_seeds(r['metric'])} | {kept} |"
        f" {_f(r['x_base'])} | {_f(r['ms'])} | {r['gradients']:.3g} |"
        f' {share} |')
  return '\n'.join(lines)


def moonshot_ok(cells):
  """A configuration keeps >= KEEP % at <= AT_MOST x base on every task."""
  return bool(cells) and all(
      c is not None and math.isfinite(c['kept']) and c['kept'] >= KEEP
      and c['x_base'] <= AT_MOST for c in cells)


def summary_table(summaries):
  """Rows: configurations; columns: tasks; cells: gain kept %, x base."""
  tasks = list(summaries)
  names = []
  for rows in summaries.values():
    names += [n for n in rows if n not in names]
  lines = ['| configuration | ' + ' | '.join(tasks) + ' | keeps >= 90 % at'
           ' <= 1.25x on every task |', '|---|' + '---|' * (len(tasks) + 1)]
  for name in names:
    cells = [summaries[t].get(name) for t in tasks]
    text = []
    for c in cells:
      if c is None:
        text.append('-')
      else:
        kept = f"{c['kept']:.0f} %" if math.isfinite(c['kept']) else 'n/a'
        text.append(f"{kept}, {_f(c['x_base'])}x")
    mark = ('**yes**' if name not in ('base', 'SAM') and len(cells) == len(
        TASKS) and moonshot_ok(cells) else '')
    lines.append(f'| {name} | ' + ' | '.join(text) + f' | {mark} |')
  return '\n'.join(lines)


# ----------------------------------------------------------------- figures


def plot_front(task_results, rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(10, 5.5))
  for name, r in rows.items():
    if not (math.isfinite(r['mean']) and math.isfinite(r['x_base'])):
      continue
    style = {'base': ('s', 'black', 9), 'SAM': ('D', 'tab:red', 9)}.get(
        name, ('o', 'tab:blue', 5))
    ax.errorbar(r['x_base'], r['mean'], yerr=r['std'], fmt=style[0],
                color=style[1], markersize=style[2], capsize=3)
    ax.annotate(name, (r['x_base'], r['mean']), fontsize=7, xytext=(4, 3),
                textcoords='offset points',
                fontweight='bold' if name in ('base', 'SAM') else 'normal')
  diverged = [n for n, r in rows.items() if r['diverged']]
  if diverged:
    ax.text(0.01, 0.01, 'diverged (not drawn): ' + ', '.join(diverged),
            transform=ax.transAxes, fontsize=7, va='bottom')
  ax.axvline(AT_MOST, color='gray', linestyle=':', linewidth=1)
  ax.set_xlabel('wall time per step, x base (measured side by side)')
  better = 'higher' if task_results['higher_is_better'] else 'lower'
  ax.set_ylabel(f"{task_results['metric_name']} (mean ± std; {better} is"
                ' better)')
  ax.set_title(f"{task_results['name']}: cost against"
               f" {task_results['metric_name']}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_summary(summaries, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = list(summaries)
  names = []
  for rows in summaries.values():
    names += [n for n in rows if n not in names and n != 'base']
  fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(names) * len(tasks) / 2),
                                  5))
  width = 0.8 / max(1, len(tasks))
  for j, task in enumerate(tasks):
    xs, ys, errs = [], [], []
    for i, name in enumerate(names):
      c = summaries[task].get(name)
      if c is not None and math.isfinite(c['kept']):
        xs.append(i + (j - (len(tasks) - 1) / 2) * width)
        ys.append(c['kept'])
        errs.append(c['kept_std'] if math.isfinite(c['kept_std']) else 0)
    ax.bar(xs, ys, width, yerr=errs, capsize=2, label=task)
  low, high = CLIP
  for bars in ax.containers:
    for bar in getattr(bars, 'patches', []):
      value = bar.get_height() + bar.get_y()
      if not low <= value <= high:
        ax.annotate(f'{value:.0f}', (bar.get_x(), min(max(value, low), high)),
                    fontsize=6, rotation=90, va='top' if value > high else
                    'bottom')
  ax.set_ylim(low, high)
  ax.axhline(KEEP, color='tab:red', linestyle='--', linewidth=1,
             label=f'{KEEP:.0f} % of SAM\'s gain')
  ax.axhline(0, color='black', linewidth=0.8)
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=60, ha='right', fontsize=7)
  ax.set_ylabel('gain kept % of best-rho SAM\'s (mean ± std over seeds)')
  ax.set_title('Gain kept per configuration and task')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis='y')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------- stages


def run_task(name, args, stages, stored):
  """The stages of one task; returns its raw results (as in tasks.json)."""
  task = load_task(name)
  size = 'quick' if args.quick else 'full'
  steps = task.steps[size]
  seeds = list(range(args.seeds))
  result = dict(stored or {})
  result.update(name=task.name, description=task.description,
                metric_name=task.metric_name,
                higher_is_better=task.higher_is_better, base=task.base,
                learning_rate=task.learning_rate, steps=steps, size=size,
                seeds=seeds)
  setup = Setup(task, size, steps, task.learning_rate, None)
  progress = not args.no_progress
  runs_log = result.setdefault('runs', {})
  if 'lr' in stages:
    start = time.perf_counter()
    rows = [Config(f'{lr:g}', lambda s, lr: dataclasses.replace(
        s, learning_rate=lr).base(), 1, False, {'lr': lr}, 'base')
            for lr in task.lr_grid]
    runs = train_side_by_side(task, size, steps, rows, setup, seeds, 'val',
                              progress, 'lr')
    result['lr'] = {n: r['metric'] for n, r in runs.items()}
    runs_log['lr'] = run_record(args, start)
  if 'rho' in stages:
    start = time.perf_counter()
    rows = [Config('base', lambda s: s.base(), 1)] + [
        Config(f'{rho:g}', lambda s, rho: s.variant('sam', rho=rho), 2,
               False, {'rho': rho}, 'sam')
        for rho in task.rho_grid]
    runs = train_side_by_side(task, size, steps, rows, setup, seeds, 'val',
                              progress, 'rho')
    result['rho'] = {n: r['metric'] for n, r in runs.items()}
    result['best_rho'] = best_rho(
        {float(n): v for n, v in result['rho'].items() if n != 'base'},
        task.higher_is_better)
    runs_log['rho'] = run_record(args, start)
  if 'main' in stages:
    if result.get('best_rho') is None:
      raise SystemExit(
          f'{name}: the main stage needs SAM\'s best rho; run --stage rho'
          ' first (or --stage all).')
    start = time.perf_counter()
    setup.best_rho = result['best_rho']
    params, _ = task.init(jax.random.PRNGKey(0), size)
    every = configs(result['best_rho'], has_normalization(params))
    rows = [r for r in every
            if not args.only or r.name in ('base', 'SAM', *args.only)]
    runs = train_side_by_side(task, size, steps, rows, setup, seeds, 'test',
                              progress, 'main')
    for r in rows:
      runs[r.name]['gradients'] = r.gradients
    if args.only:  # the other rows stay as they were measured; rows that
      # configs() no longer defines (a default since changed) go
      defined = {r.name for r in every}
      result['main'] = {n: v for n, v in {**result.get('main', {}),
                                          **runs}.items() if n in defined}
      runs_log[f"main, --only {','.join(args.only)}"] = run_record(args,
                                                                   start)
    else:  # every row again: the partial runs' records no longer apply
      result['main'] = runs
      for stage in [s for s in runs_log if s.startswith('main, --only')]:
        del runs_log[stage]
      runs_log['main'] = run_record(args, start)
  return result


def run_record(args, start):
  """The machine, command, date and wall time of a stage just run."""
  return {'machine': _common.machine(), 'command': args.command,
          'date': datetime.date.today().isoformat(),
          'wall_s': time.perf_counter() - start}


def task_markdown(r):
  lines = [f"## {r['name']}", '', r['description'], '',
           f"Base optimizer: {r['base']} at learning rate"
           f" {r['learning_rate']:g}, {r['steps']} steps, seeds"
           f" {', '.join(map(str, r['seeds']))}. Metric: {r['metric_name']}"
           f" ({'higher' if r['higher_is_better'] else 'lower'} is"
           ' better).', '']
  for stage, log in r.get('runs', {}).items():
    lines.append(f"- stage {stage}: `{log['command']}` on {log['machine']}"
                 f" ({log['wall_s'] / 60:.1f} minutes, compilation"
                 ' included)')
  lines.append('')
  if 'lr' in r:
    lines += ['**Learning rate** (the base optimizer, validation split):',
              '', sweep_table(r['lr'], 'learning rate'), '']
  if 'rho' in r:
    lines += ['**SAM\'s rho** (validation split):', '',
              sweep_table(r['rho'], 'rho'), '',
              f"Best rho: {r['best_rho']:g}.", '']
  if 'main' in r:
    rows = summarize_main(r['main'], r['higher_is_better'])
    if not rows['SAM']['improves']:
      lines += ['**SAM at its best rho did not beat the base optimizer on'
                ' the test split here**: gain kept is relative to a'
                ' non-positive gain and means nothing.', '']
    lines += ['**Test split**, every configuration:', '', main_table(rows),
              '', f"![cost against metric](tasks_{file_stem(r['name'])}.png)",
              '']
  return '\n'.join(lines)


def file_stem(name):
  return name.replace('-', '_')


def document(all_results):
  summaries = {n: summarize_main(r['main'], r['higher_is_better'])
               for n, r in all_results.items() if 'main' in r}
  parts = [
      '# The benchmark study: every variant on four tasks', '',
      'Written by `python benchmarks/bench_tasks.py` (raw results in'
      ' tasks.json; `--replot` writes the tables and figures from it again).'
      ' Each task section names its machine, command, date and wall time.',
      '',
      'Configurations: the base optimizer; SAM at its best rho (the'
      ' validation sweep); each variant at its documented defaults, and at'
      ' SAM\'s best rho in the variant\'s own convention (ASAM\'s radius'
      f" x{RHO_SCALE['asam']:g} and MSAM's x{RHO_SCALE['msam']:g}: their"
      ' 0.2 defaults 0.5 and 1.0 sat against SAM\'s 0.05), left out where'
      ' that equals the default; decoupled WSAM; bSAM (learning rate: the'
      f' base schedule, from lr / (1 - {MOMENTUM}) on SGD tasks); SAM-ON'
      ' where the model has normalization layers; and the defaults'
      ' revision: for each default changed since 0.2, the 0.2 value and the'
      ' other values it was weighed against (rows named `variant'
      ' knob=value`, at the variant\'s default rho). LookSAM and AE-SAM get'
      ' no `total_steps` (what a user gets by default). One setting is not'
      ' a default: ESAM with `gamma < 1` gets `batch_argnames=(\'batch\',)`,'
      ' since its default guess of the per-example arguments (every array'
      ' with a leading dimension) takes the dropout key and the BatchNorm'
      ' statistics for examples and stops with an error. Nothing is wrapped'
      ' in `apply_if_finite`: a non-finite metric is reported as diverged.',
      '',
      'Gain kept = per seed (v - mean base) / (mean SAM - mean base), mean'
      ' ± std over seeds. x base = median over the timed rounds of the'
      ' chunk time over the base\'s in the same round (side by side in one'
      ' process, the first chunk of each seed untimed). Gradients per step'
      ' are nominal; the measured share of SAM steps is shown where the'
      ' optimizer state reports it.', '']
  if summaries:
    parts += ['## Summary', '',
              f'Cells: gain kept %, x base. **yes**: keeps >= {KEEP:.0f} %'
              f' of best-rho SAM\'s gain at <= {AT_MOST}x the base on every'
              ' one of the four tasks.', '', summary_table(summaries), '',
              '![gain kept](tasks_summary.png)', '']
  for r in all_results.values():
    parts += [task_markdown(r), '']
  return '\n'.join(parts).rstrip() + '\n'


def replot(all_results):
  summaries = {}
  for name, r in all_results.items():
    if 'main' not in r:
      continue
    rows = summarize_main(r['main'], r['higher_is_better'])
    summaries[name] = rows
    plot_front(r, rows, RESULTS / f'tasks_{file_stem(name)}.png')
  if summaries:
    plot_summary(summaries, RESULTS / 'tasks_summary.png')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tasks', default=','.join(TASKS),
                      help='comma-separated task names (default: all four)')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--stage', choices=STAGES + ('all',), default='all')
  parser.add_argument('--quick', action='store_true',
                      help='size quick, 1 seed; prints, writes nothing')
  parser.add_argument('--replot', action='store_true',
                      help='only write tasks.md and the PNGs again, from'
                      ' results/tasks.json')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--only', default='',
                      help='main stage: only these configurations, merged'
                      ' into the stored rows (comma-'
                      'separated; base and SAM always run)')
  args = parser.parse_args(argv)
  if args.quick:
    args.seeds = 1
  if args.seeds < 1:
    parser.error('need --seeds >= 1.')
  args.only = [c.strip() for c in args.only.split(',') if c.strip()]
  args.tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
  args.command = ' '.join(['python benchmarks/bench_tasks.py',
                           *(argv if argv is not None else sys.argv[1:])])
  return args


def save(name, result):
  """Writes one task's results; the JSON is read again just before, so two
  runs on different tasks side by side (one per core) keep each other's."""
  merged = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
  merged[name] = result
  RESULTS.mkdir(exist_ok=True)
  JSON_PATH.write_text(json.dumps(merged, indent=1, default=float) + '\n')
  MD_PATH.write_text(document(merged))
  replot(merged)
  print('wrote', MD_PATH, JSON_PATH, flush=True)


def main(argv=None):
  args = parse_args(argv)
  stored = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
  if args.replot:
    MD_PATH.write_text(document(stored))
    replot(stored)
    return stored
  stages = STAGES if args.stage == 'all' else (args.stage,)
  start = time.perf_counter()
  results = {}
  for name in args.tasks:
    previous = None if args.quick else stored.get(name)
    results[name] = run_task(name, args, stages, previous)
    print(task_markdown(results[name]), flush=True)
    if not args.quick:
      save(name, results[name])
  if args.quick:
    summaries = {n: summarize_main(r['main'], r['higher_is_better'])
                 for n, r in results.items() if 'main' in r}
    if summaries:
      print(summary_table(summaries))
  print(f'done in {time.perf_counter() - start:.0f} s', flush=True)
  return results


if __name__ == '__main__':
  main()
