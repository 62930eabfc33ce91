"""From a `Variant` to an `optax.GradientTransformationExtraArgs`.

`transformation` turns a factory ``(loss_fn, ...) -> Variant`` into the
public factory: it adds the options every variant takes (``ascent_steps``,
``has_aux``, ``perturbation_mask``, ``layout``), validates them with the
variant's hyperparameters, and builds ``init`` / ``update``::

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

import functools
import inspect
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._src.core import directions
from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import groups
from sam_optax._src.pipeline import layouts
from sam_optax._src.pipeline.variant import Context
from sam_optax._src.pipeline.variant import Variant

PyTree = Any
_COMMON = (
    inspect.Parameter('ascent_steps', inspect.Parameter.KEYWORD_ONLY,
                      default=1, annotation='int'),
    inspect.Parameter('has_aux', inspect.Parameter.KEYWORD_ONLY,
                      default=False, annotation='bool'),
    inspect.Parameter('perturbation_mask', inspect.Parameter.KEYWORD_ONLY,
                      default=None, annotation='Optional[LeafMask]'),
    inspect.Parameter('layout', inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation='Optional[Union[Chunks, PerDevice]]'),
    inspect.Parameter('track_cosine', inspect.Parameter.KEYWORD_ONLY,
                      default=False, annotation='bool'),
)


def transformation(factory: Callable[..., Variant]):
  """Decorates ``factory(loss_fn, ...) -> Variant`` as a public factory."""

  @functools.wraps(factory)
  def public(loss_fn, *args, ascent_steps=1, has_aux=False,
             perturbation_mask=None, layout=None, track_cosine=False,
             **kwargs):
    variant = factory(loss_fn, *args, **kwargs)
    return build(variant, loss_fn, ascent_steps=ascent_steps,
                 has_aux=has_aux, perturbation_mask=perturbation_mask,
                 layout=layout, track_cosine=track_cosine)

  signature = inspect.signature(factory)
  public.__signature__ = signature.replace(
      parameters=list(signature.parameters.values()) + list(_COMMON),
      return_annotation='optax.GradientTransformationExtraArgs')
  return public


def forwarded_names(loss_fn: Callable[..., Any]) -> Optional[frozenset]:
  """The keyword arguments ``loss_fn`` accepts; None if it takes any."""
  try:
    parameters = list(inspect.signature(loss_fn).parameters.values())
  except (TypeError, ValueError):
    return None
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
    return None
  return frozenset(p.name for p in parameters[1:] if p.kind in (
      inspect.Parameter.POSITIONAL_OR_KEYWORD,
      inspect.Parameter.KEYWORD_ONLY))


def evaluate(variant: Variant, count: jax.Array) -> dict[str, jax.Array]:
  """Every hyperparameter at ``count`` (float32); out of bounds -> NaN.

  A traced value that breaks its bound (rho < 0, a NaN from a schedule) is
  not clamped or read as 0: it becomes NaN, so the update is NaN and
  `optax.apply_if_finite` sees it.
  """
  values = {}
  for name, value in variant.hyperparams.items():
    value = jnp.asarray(value(count) if callable(value) else value,
                        jnp.float32)
    ok = value > 0 if name in variant.positive else value >= 0
    values[name] = jnp.where(ok, value, jnp.nan)
  return values


def _static_rho(rho) -> Optional[float]:
  if isinstance(rho, numbers.Real) and not isinstance(rho, bool):
    return float(rho)
  return None


def _check_real(owner: str, params: PyTree) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jnp.iscomplexobj(leaf):
      raise TypeError(
          f'{owner}: parameter {jax.tree_util.keystr(path)} is complex'
          f' ({jnp.result_type(leaf)}); sharpness-aware steps treat the'
          ' parameters as a real vector. Split it into real parts, e.g.'
          " params = {'re': w.real, 'im': w.imag}, and rebuild"
          " w = p['re'] + 1j * p['im'] inside loss_fn.")


def _check_options(variant, loss_fn, ascent_steps, has_aux,
                   perturbation_mask, layout, track_cosine) -> int:
  owner = variant.name
  validation.check_loss_fn(owner, loss_fn)
  for name, value in variant.hyperparams.items():
    validation.check_hyperparameter(
        owner, name, value, allow_zero=name not in variant.positive)
  validation.check_bool(owner, 'has_aux', has_aux)
  validation.check_bool(owner, 'track_cosine', track_cosine)
  directions.check_mask(owner, 'perturbation_mask', perturbation_mask)
  layouts.check_layout(owner, layout)
  return validation.check_static_int(owner, 'ascent_steps', ascent_steps,
                                     minimum=1)


def build(variant: Variant, loss_fn, *, ascent_steps: int = 1,
          has_aux: bool = False, perturbation_mask=None,
          layout: layouts.Layout = None, track_cosine: bool = False):
  """The `optax.GradientTransformationExtraArgs` that runs ``variant``."""
  ascent_steps = _check_options(variant, loss_fn, ascent_steps, has_aux,
                                perturbation_mask, layout, track_cosine)
  owner = variant.name
  accepted = forwarded_names(loss_fn)
  scalar_loss = validation.checked_scalar_loss(owner, loss_fn, has_aux)
  value_and_grad = jax.value_and_grad(scalar_loss)
  rho = _static_rho(variant.hyperparams['rho'])
  own_fields = variant.state._fields[4:]

  def init_fn(params):
    return variant.init(params)

  def context(batch, state, hp, mask, group, decision, decided):
    return Context(clean_grad=group.clean_grad, params=batch.params,
                   hyperparams=hp, state=state, decision=decision,
                   decided=decided, group=group, variant=variant,
                   ascent_steps=ascent_steps, mask=mask)

  def decide(batch, state, hp, mask):
    if variant.decide is None:
      return None, jnp.asarray(True)

    def everywhere():
      one = lambda g: (variant.decide(
          context(batch, state, hp, mask, g, None, jnp.asarray(True))), ())
      return groups.device_mean(layout, groups.map_groups(layout, one,
                                                          batch)[0])

    if variant.decides is None:
      return everywhere(), jnp.asarray(True)
    decided = jnp.asarray(variant.decides(state), bool)
    shapes = jax.eval_shape(everywhere)
    return jax.lax.cond(decided, everywhere, lambda: jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), shapes)), decided

  def group_step(batch, state, hp, mask, decision, decided, group):
    step = variant.combine(
        context(batch, state, hp, mask, group, decision, decided))
    g0, out = group.clean_grad, step.gradient
    grad_norm = tree_math.tree_norm(g0)
    if track_cosine:  # keeps g0 alive to the end: one more buffer, 2 passes
      dot = tree_math.tree_vdot(g0, out)
      cosine = dot * tree_math.safe_inverse(
          grad_norm * tree_math.tree_norm(out))
    else:
      dot = cosine = jnp.full([], jnp.nan, jnp.float32)
    own = [getattr(step.state, f) for f in own_fields]
    means = tuple(v for f, v in zip(own_fields, own)
                  if variant.agree[f] == 'mean')
    others = tuple(v for f, v in zip(own_fields, own)
                   if variant.agree[f] != 'mean')
    diagnostics = (step.perturbed_loss, grad_norm, cosine, dot)
    return (out, diagnostics, means), others

  def agreed_state(state, count, diagnostics, means, others):
    means, others = iter(means), iter(others)
    own = []
    for f in own_fields:
      how = variant.agree[f]
      if how == 'mean':
        value = next(means)
      else:
        # 'same' values are equal in every group; their max is that value
        # (a reduction, so it also works on chunks sharded over a mesh).
        value = (jnp.min if how == 'min' else jnp.max)(next(others), axis=0)
        value = groups.device_reduce(layout, value, how)
      own.append(value.astype(getattr(state, f).dtype))
    # The state's dtypes never follow the parameters' (float64 with x64).
    diagnostics = [jnp.asarray(d, jnp.float32) for d in diagnostics]
    return variant.state(optax.safe_increment(count), *diagnostics, *own)

  def update_fn(updates, state, params=None, **extra_args):
    validation.check_params_given(owner, params)
    validation.check_same_tree(owner, updates, params)
    _check_real(owner, params)
    loss_kwargs = {k: v for k, v in extra_args.items()
                   if accepted is None or k in accepted}
    hp = evaluate(variant, state.count)
    mask = None if perturbation_mask is None else directions.resolve_mask(
        owner, 'perturbation_mask', perturbation_mask, params)
    batch = groups.Batch(owner, updates, params, loss_kwargs,
                         value_and_grad, scalar_loss)
    decision, decided = decide(batch, state, hp, mask)
    (out, diagnostics, means), others = groups.map_groups(
        layout, functools.partial(group_step, batch, state, hp, mask,
                                  decision, decided), batch)
    out = tree_math.tree_cast_like(out, updates)
    if rho == 0.0:
      out = updates
    elif rho is None:  # rho = 0 is exactly the base optimizer: a select
      out = tree_math.tree_select(hp['rho'] == 0, updates, out)
    out, diagnostics, means = groups.reduce_step(layout, out, diagnostics,
                                                 means, track_cosine)
    return out, agreed_state(state, state.count, diagnostics, means, others)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
