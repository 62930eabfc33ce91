"""Early, explicit errors for bad input: each names the problem and the fix."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

# A hyperparameter that a user may anneal: a number, or an optax schedule
# ``count -> value`` evaluated on the transformation's own step count.
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


def _is_concrete(value: Any) -> bool:
  return not isinstance(value, jax.core.Tracer)


def check_loss_fn(owner: str, loss_fn: Any) -> None:
  if isinstance(loss_fn, (jax.Array, np.ndarray)):
    raise TypeError(
        f'{owner}: loss_fn must be a callable, got an array. Under'
        ' optax.inject_hyperparams every callable argument is taken for a'
        ' schedule, so loss_fn was called with the step count and replaced'
        ' by its value: use sam_optax.inject_hyperparams, which keeps loss_fn'
        " static (or pass static_args=('loss_fn', ...)).")
  if not callable(loss_fn):
    raise TypeError(
        f'{owner}: loss_fn must be a callable `loss_fn(params, **loss_kwargs)`'
        f' returning a scalar loss, got {type(loss_fn).__name__}. Pass the'
        ' loss function itself, e.g. sam(loss_fn, rho=0.05).'
    )


def check_bool(owner: str, name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise TypeError(f'{owner}: {name} must be True or False, got {value!r}.')


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    allow_zero: bool = True,
    allow_schedule: bool = False,
) -> None:
  """A finite scalar >= 0 (> 0 without ``allow_zero``), or a schedule.

  Every scalar option of the library goes through this one check. A traced
  value (e.g. under `optax.inject_hyperparams`) passes unchecked; a schedule
  ``count -> value`` passes when ``allow_schedule`` and is evaluated later.
  """
  kind = 'a number or an optax schedule (count -> value)' if (
      allow_schedule) else 'a number'
  if callable(value) and allow_schedule:
    return
  if isinstance(value, bool) or not isinstance(
      value, (numbers.Real, np.ndarray, jax.Array)
  ):
    raise TypeError(
        f'{owner}: {name} must be {kind}, got {type(value).__name__}'
        f' {value!r}.'
    )
  if jnp.ndim(value) != 0:
    raise ValueError(
        f'{owner}: {name} must be a scalar, got an array of shape'
        f' {jnp.shape(value)}.'
    )
  if not _is_concrete(value):
    return
  number = float(value)
  if not np.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
    bound = '>= 0' if allow_zero else '> 0'
    hint = ' (rho=0 gives exactly the base optimizer)' if (
        name == 'rho' and allow_zero) else ''
    raise ValueError(
        f'{owner}: {name} must be a finite number {bound}, got {number}{hint}.'
    )


def check_hyperparameter(
    owner: str, name: str, value: Any, *, allow_zero: bool = True
) -> None:
  """A transformation's scalar hyperparameter: a number or a schedule."""
  check_number(owner, name, value, allow_zero=allow_zero, allow_schedule=True)


def check_static_int(owner: str, name: str, value: Any, minimum: int) -> int:
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f'{owner}: {name} must be a static Python int (it sets a loop length'
        ' or a shape), got a traced value: pass a Python int (mark it static'
        ' under jax.jit). Under optax.inject_hyperparams, use'
        ' sam_optax.inject_hyperparams, or pass'
        f" static_args=('loss_fn', '{name}', ...)."
    )
  if isinstance(value, bool) or not isinstance(
      value, (numbers.Integral, np.integer, np.ndarray, jax.Array)
  ) or jnp.ndim(value) != 0:
    raise TypeError(
        f'{owner}: {name} must be an int >= {minimum}, got {value!r}.'
    )
  number = int(value)
  if number < minimum:
    raise ValueError(
        f'{owner}: {name} must be an int >= {minimum}, got {number}.'
    )
  return number


def check_params_given(owner: str, params: Any) -> None:
  if params is None:
    raise ValueError(
        f'{owner}: update() needs the current parameters, because the'
        ' gradient is re-evaluated at params + eps. Call'
        ' `tx.update(grads, opt_state, params, **loss_kwargs)`.'
    )
  masked = [
      leaf
      for leaf in jax.tree.leaves(
          params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
      )
      if isinstance(leaf, optax.MaskedNode)
  ]
  if masked:
    raise ValueError(
        f'{owner}: params contain optax.MaskedNode leaves, so it runs inside'
        ' optax.masked, but loss_fn needs every parameter to re-evaluate the'
        ' gradient. Put the sharpness-aware transformation outside the mask'
        ' and mask the base optimizer (or weight decay) instead; to exempt'
        ' parameters from the adaptive metric, use asam(adaptive_mask=...).'
    )


def check_same_tree(owner: str, updates: Any, params: Any) -> None:
  """The incoming gradient must have the structure and shapes of params."""
  updates_def = jax.tree.structure(updates)
  params_def = jax.tree.structure(params)
  if updates_def != params_def:
    raise ValueError(
        f'{owner}: the gradient tree does not match the params tree.\n'
        f'  gradient: {updates_def}\n  params:   {params_def}\n'
        'Pass the gradient of loss_fn with respect to exactly these params'
        ' (e.g. jax.grad(loss_fn)(params, ...)).'
    )
  for path, g, p in zip(
      jax.tree_util.tree_flatten_with_path(updates)[0],
      jax.tree.leaves(updates),
      jax.tree.leaves(params),
  ):
    if jnp.shape(g) != jnp.shape(p):
      raise ValueError(
          f'{owner}: gradient leaf {jax.tree_util.keystr(path[0])} has shape'
          f' {jnp.shape(g)} but the parameter has shape {jnp.shape(p)}.'
      )


def _describe(value: Any) -> str:
  """What loss_fn returned, in words, for error messages."""
  if isinstance(value, Mapping):
    return f'a {type(value).__name__} with keys {sorted(map(str, value))}'
  if isinstance(value, (tuple, list)):
    return f'a {type(value).__name__} of length {len(value)}'
  if hasattr(value, 'shape') and hasattr(value, 'dtype'):
    return f'an array of shape {tuple(value.shape)} and dtype {value.dtype}'
  return f'a {type(value).__name__}'


def check_loss_output(owner: str, out: Any, has_aux: bool, *,
                      fix: str) -> Any:
  """The loss from loss_fn's output; a clear error for every wrong shape.

  ``fix`` says how the caller sets has_aux, with ``{}`` for the value, e.g.
  ``'pass has_aux={} to m_sharpness'`` for a helper (a function) or
  ``'build sam with has_aux={}'`` for a transformation.
  """
  is_pair = isinstance(out, (tuple, list)) and len(out) == 2
  if has_aux and not is_pair:
    raise TypeError(
        f'{owner}: has_aux=True, so loss_fn must return a pair (loss, aux),'
        f' but it returned {_describe(out)}. {fix[:1].upper()}{fix[1:]}'
        .format(False) + ' (the default) for a loss_fn that returns the loss'
        ' alone, or return (loss, aux).'
    )
  if not has_aux and isinstance(out, (tuple, list)):
    raise TypeError(
        f'{owner}: loss_fn returned {_describe(out)}, not a scalar loss. If it'
        f' returns (loss, aux), {fix.format(True)}.'
    )
  loss = out[0] if has_aux else out
  if not (hasattr(loss, 'shape') and hasattr(loss, 'dtype')) and not (
      isinstance(loss, (float, int)) and not isinstance(loss, bool)):
    what = 'the first element of its pair is' if has_aux else 'it returned'
    hint = (' (a gradient? pass the loss itself, not jax.grad(loss_fn))'
            if isinstance(loss, Mapping) else '')
    raise TypeError(
        f'{owner}: loss_fn must return a scalar loss, or (loss, aux) with'
        f' has_aux=True, but {what} {_describe(loss)}{hint}.'
    )
  loss = jnp.asarray(loss)
  if loss.shape != ():
    raise ValueError(
        f'{owner}: loss_fn must return a scalar, but its loss has shape'
        f' {loss.shape}. Reduce it to one number, e.g. `.mean()` over the'
        ' batch (or, if this is a gradient, pass the loss itself).'
    )
  if not jnp.issubdtype(loss.dtype, jnp.floating):
    raise TypeError(
        f'{owner}: loss_fn must return a real floating-point scalar, got'
        f' dtype {loss.dtype}.'
    )
  return loss


def checked_scalar_loss(
    owner: str, loss_fn: Callable[..., Any], has_aux: bool
) -> Callable[..., jax.Array]:
  """Wraps loss_fn so that it returns a checked scalar (aux is dropped)."""

  def scalar_loss(params, loss_kwargs):
    return check_loss_output(owner, loss_fn(params, **loss_kwargs), has_aux,
                             fix=f'build {owner} with has_aux={{}}')

  return scalar_loss
