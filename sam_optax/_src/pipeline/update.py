"""One update: hyperparameters, groups, combine, agreed state, skip rule.

The `Pipeline` of a variant and its options (built by `transformation`)::

    update(g0, state, params, **kwargs)
      hyperparams at state.count      (bad traced values become NaN)
      [decide on every group, averaged]           optional, e.g. XSAM's probe
      map_groups(layout, group_step):  one group = batch / chunk / device
          ascent -> re-gradient -> combine   (the variant's pieces)
          diagnostics of the group
      rho == 0 -> g0 exactly (a select)
      one all-reduce over devices (PerDevice)
      new state: count + 1, diagnostics, the variant's fields agreed
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._src.core import directions
from sam_optax._src.core import param_leaves
from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import groups
from sam_optax._src.pipeline import layouts
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.pipeline.variant import Context
from sam_optax._src.pipeline.variant import Variant

PyTree = Any


class IgnoredKeywordWarning(UserWarning):
  """A keyword argument of ``update`` that ``loss_fn`` does not accept."""


def evaluate(variant: Variant, count: jax.Array) -> dict[str, jax.Array]:
  """Every hyperparameter at ``count`` (float32); out of bounds -> NaN.

  A traced value that breaks its `Bound` (rho < 0, a NaN from a schedule)
  is not clamped or read as 0: it becomes NaN, and the step is skipped as
  non-finite (`skip_if_not_finite`), whether or not this step uses it.
  """
  values = {}
  for name, value in variant.hyperparams.items():
    value = jnp.asarray(value(count) if callable(value) else value,
                        jnp.float32)
    values[name] = tree_math.nan_unless(bound(variant, name).holds(value),
                                        value)
  return values


def bound(variant: Variant, name: str) -> variant_lib.Bound:
  """The interval hyperparameter ``name`` of ``variant`` lies in."""
  return variant.bounds.get(name, variant_lib.NONNEGATIVE)


def _static_rho(rho) -> Optional[float]:
  if isinstance(rho, numbers.Real) and not isinstance(rho, bool):
    return float(rho)
  return None


@dataclasses.dataclass(frozen=True)
class _Step:
  """One update's fixed inputs, shared by the pieces below."""

  batch: groups.Batch
  state: Any
  hyperparams: dict
  mask: Optional[PyTree]


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A variant with its options: the pieces of one ``update``."""

  variant: Variant
  layout: layouts.Layout
  ascent_steps: int
  track_cosine: bool
  perturbation_mask: Any
  accepted: Optional[frozenset]
  scalar_loss: Callable[..., jax.Array]

  def context(self, step: _Step, group, decision, decided) -> Context:
    return Context(clean_grad=group.clean_grad, params=step.batch.params,
                   hyperparams=step.hyperparams, state=step.state,
                   decision=decision, decided=decided, group=group,
                   variant=self.variant, ascent_steps=self.ascent_steps,
                   mask=step.mask)

  def decide(self, step: _Step):
    """The variant's decision, averaged over every group (or None)."""
    variant, layout = self.variant, self.layout
    decide = variant.decide
    if decide is None:
      return None, jnp.asarray(True)

    def everywhere():
      one = lambda g: (decide(
          self.context(step, g, None, jnp.asarray(True))), ())
      mean, _ = groups.map_groups(layout, one, step.batch)
      return groups.device_mean(layout, mean)

    if variant.decides is None:
      return everywhere(), jnp.asarray(True)
    decided = jnp.asarray(variant.decides(step.state), bool)
    shapes = jax.eval_shape(everywhere)
    return jax.lax.cond(decided, everywhere, lambda: jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), shapes)), decided

  def base_at_zero_rho(self, step: _Step, base, out):
    """At rho = 0 hand on ``base``, the base optimizer's gradient, exactly.

    A static rho of 0 returns ``base``; a traced one selects (never blends).
    A variant that never reads g0 hands on its own gradient at w + 0 there.
    """
    rho = _static_rho(self.variant.hyperparams['rho'])
    if rho == 0.0:
      return tree_math.tree_cast_like(base, out)
    if rho is None and self.variant.uses_clean_grad:
      return tree_math.tree_select(step.hyperparams['rho'] == 0,
                                   tree_math.tree_cast_like(base, out), out)
    return out

  def group_step(self, step: _Step, decision, decided, group):
    """Ascent, re-gradient and combine for one group, and its diagnostics."""
    result = self.variant.combine(self.context(step, group, decision,
                                               decided))
    g0, out = group.clean_grad, result.gradient
    if not groups.chunk_groups(self.layout):
      # The group's g0 is the incoming gradient (averaged over the group's
      # devices with sync=True): exactly what the base optimizer would get.
      out = self.base_at_zero_rho(step, g0, out)
    # A diagnostic that is not measured holds 0, never a NaN sentinel: a
    # healthy state holds no NaN (users hunt NaNs with jax_debug_nans).
    if self.variant.uses_clean_grad or self.track_cosine:
      grad_norm = tree_math.tree_norm(g0)
    else:  # g0 is not read at all: XLA can drop the caller's clean gradient
      grad_norm = jnp.zeros([], jnp.float32)
    if self.track_cosine:  # keeps g0 alive to the end: +1 buffer, 2 passes
      cosine = tree_math.safe_cosine(g0, out)
    else:
      cosine = jnp.zeros([], jnp.float32)
    agree = self.variant.agree
    own = [(f, getattr(result.state, f)) for f in self.variant.state._fields[4:]]
    means = tuple(v for f, v in own if agree[f] == 'mean')
    others = tuple(v for f, v in own if agree[f] != 'mean')
    diagnostics = (result.perturbed_loss, grad_norm, cosine)
    return (out, diagnostics, means), others

  def agreed_state(self, state, diagnostics, means, others):
    """The new state (count + 1, float32 diagnostics, own fields agreed).

    A ``'mean'`` field is the mean over the groups (and devices); a
    ``'same'`` field is the groups' common value, and whether every group
    held that same value is returned with the state: a disagreement is a bug that
    makes the step non-finite (skipped), never a value silently picked.
    """
    means, others = iter(means), iter(others)
    own, agreed = [], jnp.asarray(True)
    for f in self.variant.state._fields[4:]:
      if self.variant.agree[f] == 'mean':
        value = next(means)
      else:
        value, equal = _same_over_groups(next(others))
        agreed = agreed & equal
      # A field may be a pytree (e.g. a momentum like the params).
      own.append(jax.tree.map(lambda v, s: v.astype(s.dtype), value,
                              getattr(state, f)))
    # The state's dtypes never follow the parameters' (float64 with x64).
    diagnostics = [jnp.asarray(d, jnp.float32) for d in diagnostics]
    return self.variant.state(optax.safe_increment(state.count),
                              *diagnostics, *own), agreed

  def forwarded(self, extra_args: dict) -> dict:
    """The keyword arguments ``loss_fn`` accepts; warns about the others.

    Keywords that ``loss_fn`` does not accept are not passed to it, so that
    the transformation chains with others that take their own keywords. A
    misspelled keyword (``dropout_rng=`` for ``dropout_key=``) would then
    vanish silently: an `IgnoredKeywordWarning` names it, once per trace.
    """
    if self.accepted is None:
      return dict(extra_args)
    ignored = sorted(set(extra_args) - self.accepted)
    if ignored:
      warnings.warn(
          f'{self.variant.name}: loss_fn does not accept the keyword'
          f' argument(s) {ignored}, so they are not passed to it (it accepts'
          f' {sorted(self.accepted)}). If one is misspelled, rename it; if it'
          ' is meant for another transformation of the chain, silence this'
          " with warnings.filterwarnings('ignore',"
          ' category=sam_optax.IgnoredKeywordWarning).',
          IgnoredKeywordWarning, stacklevel=3)
    return {k: v for k, v in extra_args.items() if k in self.accepted}

  def update(self, updates, state, params=None, **extra_args):
    owner = self.variant.name
    validation.check_params_given(owner, params)
    validation.check_same_tree(owner, updates, params)
    validation.check_real(owner, params)
    loss_kwargs = self.forwarded(extra_args)
    groups.check_layout_fits(owner, self.layout, updates)
    mask = None if self.perturbation_mask is None else (
        directions.resolve_mask(owner, 'perturbation_mask',
                                self.perturbation_mask, params))
    batch = groups.Batch(owner, updates, params, loss_kwargs,
                         param_leaves.value_and_grad(self.scalar_loss),
                         self.scalar_loss)
    step = _Step(batch, state, evaluate(self.variant, state.count), mask)
    decision, decided = self.decide(step)
    (out, diagnostics, means), others = groups.map_groups(
        self.layout, functools.partial(self.group_step, step, decision,
                                       decided), batch)
    out = tree_math.tree_cast_like(out, updates)
    if groups.chunk_groups(self.layout):
      out = self.base_at_zero_rho(step, updates, out)
    out, diagnostics, means = groups.reduce_step(
        self.layout, out, diagnostics, means)
    new_state, agreed = self.agreed_state(state, diagnostics, means, others)
    return skip_if_not_finite(
        out, state, new_state, agreed & tree_math.all_finite(step.hyperparams))


def _same_over_groups(stacked: PyTree) -> tuple[PyTree, jax.Array]:
  """A ``'same'`` field's value, and whether every group held it.

  Reductions (max == min over the group axis), not indexing, so that it
  also works on chunks laid over a mesh.
  """
  def one(x):
    is_key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(x) if is_key else x
    high, low = jnp.max(data, axis=0), jnp.min(data, axis=0)
    value = (jax.random.wrap_key_data(high, impl=jax.random.key_impl(x))
             if is_key else high)
    return value, jnp.all(high == low)

  pairs = jax.tree.map(one, stacked)
  is_pair = lambda x: isinstance(x, tuple)
  values = jax.tree.map(lambda pair: pair[0], pairs, is_leaf=is_pair)
  equal = [pair[1] for pair in jax.tree.leaves(pairs, is_leaf=is_pair)]
  return values, functools.reduce(jnp.logical_and, equal, jnp.asarray(True))


def skip_if_not_finite(out: PyTree, state, new_state,
                       ok: jax.Array | bool = True):
  """One bad batch never poisons a state: the rule every variant runs under.

  If the step is not finite -- the clean gradient (its norm, a diagnostic),
  a loss or gradient at the perturbed point, a hyperparameter out of bounds,
  or any of the variant's new state fields -- or not ``ok`` (groups that
  disagree on a ``'same'`` field), the whole state is returned
  exactly as it was (count, EMAs, momenta, statistics, stored directions)
  and the update is made non-finite, so that `optax.apply_if_finite` after
  the transformation skips it: training goes on as if the batch had not
  been there. Every value checked is already agreed over the devices, so
  all devices take the same decision.
  """
  ok = ok & tree_math.all_finite(out) & tree_math.all_finite(new_state)
  kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state,
                      state)
  return tree_math.nan_unless(ok, out), kept
