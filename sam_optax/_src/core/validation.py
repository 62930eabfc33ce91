"""Early, explicit errors for bad input: each names the problem and the fix."""

from __future__ import annotations

import numbers
from typing import Any, Callable, TypeAlias, Union

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src.core import loss_calls
from sam_optax._src.core import param_leaves

ScalarOrSchedule: TypeAlias = Union[float, np.floating, jax.Array,
                                    optax.Schedule]
"""A hyperparameter: a number, or an optax schedule ``count -> value``.

A schedule is evaluated on the transformation's own step count; the
arguments of this type are the ones `sam_optax.inject_hyperparams` can set
from outside.
"""


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
  if isinstance(value, (np.ndarray, jax.Array)) and value.ndim != 0:
    raise ValueError(
        f'{owner}: {name} must be a scalar, got an array of shape'
        f' {value.shape}.'
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
  ) or (isinstance(value, (np.ndarray, jax.Array)) and value.ndim != 0):
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


def _state_field(path) -> str:
  return 'state' + jax.tree_util.keystr(tuple(path))


def check_state(owner: str, state: Any, init: Callable[[Any], Any],
                params: Any) -> None:
  """The state must be ``init(params)``'s: tree structure and leaf shapes.

  Compared with `jax.eval_shape` of ``init`` when ``update`` is traced, so
  it costs nothing at run time. A state restored from a checkpoint of
  another model or another optimizer is an error that names the field.
  """
  if params is None:  # update says that it needs them
    return
  expected = jax.eval_shape(init, params)
  fix = (' Was it restored from a checkpoint of another model or another'
         ' optimizer? Build it with tx.init(params) for these params, or'
         ' restore the checkpoint of this model and optimizer.')
  if type(state) is not type(expected):
    raise ValueError(
        f'{owner}: the state is a {type(state).__name__}, but this'
        f' optimizer\'s state is a {type(expected).__name__}.' + fix)
  fields = getattr(expected, '_fields', None)
  pairs = ([(f, getattr(state, f), getattr(expected, f)) for f in fields]
           if fields else [(None, state, expected)])
  for field, given, wanted in pairs:
    given_def = jax.tree.structure(given)
    wanted_def = jax.tree.structure(wanted)
    if given_def != wanted_def:
      where = f'field {field!r}' if field else 'the state'
      raise ValueError(
          f'{owner}: {where} of the state has the tree structure'
          f' {given_def}, but init(params) gives {wanted_def}.' + fix)
  for (path, given), wanted in zip(
      jax.tree_util.tree_flatten_with_path(state)[0],
      jax.tree.leaves(expected)):
    if np.shape(given) != tuple(wanted.shape):
      raise ValueError(
          f'{owner}: {_state_field(path)} has shape {np.shape(given)}, but'
          f' init(params) gives {tuple(wanted.shape)} for these params.'
          + fix)


def checked(owner: str, init: Callable[[Any], Any],
            update: Callable[..., Any]) -> tuple[Callable[..., Any],
                                                 Callable[..., Any]]:
  """``(init, update)`` behind the early checks of their inputs.

  Parameters are arrays, the state is ``init(params)``'s in structure and
  shapes (checked when ``update`` is traced), and integer / bool leaves are
  carried through (`check_param_leaves`): the pieces see a float32 zero
  gradient there, and their incoming gradient is handed on as it came.
  """

  def checked_init(params):
    param_leaves.check_params_are_arrays(owner, params)
    return init(params)

  def checked_update(updates, state, params=None, **extra_args):
    if params is not None:
      param_leaves.check_param_leaves(owner, updates, params)
    check_state(owner, state, init, params)
    out, new_state = update(param_leaves.float_gradient(updates, params),
                            state, params, **extra_args)
    return param_leaves.carry_non_float(out, updates, params), new_state

  return checked_init, checked_update


def checked_scalar_loss(
    owner: str, loss_fn: Callable[..., Any], has_aux: bool
) -> Callable[..., jax.Array]:
  """Wraps loss_fn so that it returns a checked scalar (aux is dropped)."""
  loss_fn = loss_calls.with_framework_hint(owner, loss_fn)
  loss_calls.check_loss_signature(owner, loss_fn)

  def scalar_loss(params, loss_kwargs):
    out = loss_calls.call_loss(owner, loss_fn, params, loss_kwargs)
    return loss_calls.check_loss_output(owner, out, has_aux,
                             fix=f'build {owner} with has_aux={{}}')

  return scalar_loss


def check_real(owner: str, params: Any) -> None:
  """Complex parameters are an error that says how to split them."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jnp.iscomplexobj(leaf):
      raise TypeError(
          f'{owner}: parameter {jax.tree_util.keystr(path)} is complex'
          f' ({jnp.result_type(leaf)}); sharpness-aware steps treat the'
          ' parameters as a real vector. Split it into real parts, e.g.'
          " params = {'re': w.real, 'im': w.imag}, and rebuild"
          " w = p['re'] + 1j * p['im'] inside loss_fn.")
