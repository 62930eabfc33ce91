"""Early, explicit errors for bad input: each names the problem and the fix."""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Mapping, Optional, TypeAlias, Union

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

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


def is_float_leaf(leaf: Any) -> bool:
  """Whether a parameter leaf is trained: a real or complex float array."""
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def check_params_are_arrays(owner: str, params: Any) -> None:
  """A Python number among the parameters is an error that names it."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, (numbers.Number, np.generic)):
      raise TypeError(
          f'{owner}: parameter {jax.tree_util.keystr(path)} is a Python'
          f' {type(leaf).__name__} ({leaf!r}), not an array. Make every'
          ' parameter an array, e.g. params = jax.tree.map(jnp.asarray,'
          ' params), or close over a constant in loss_fn.')


def check_param_leaves(owner: str, updates: Any, params: Any) -> None:
  """Every parameter an array; no float0 gradient (optax takes none either).

  Integer and bool leaves (a step counter kept in params) are carried
  through, as optax carries them: not perturbed, their incoming gradient
  handed on unchanged. A float0 gradient -- what ``jax.grad(...,
  allow_int=True)`` gives for them -- is refused, since optax's own
  transformations (``optax.sgd``, ``optax.adam``) cannot take it.
  """
  check_params_are_arrays(owner, params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    if getattr(leaf, 'dtype', None) == jax.dtypes.float0:
      raise TypeError(
          f'{owner}: the gradient of parameter {jax.tree_util.keystr(path)}'
          ' has dtype float0 (jax.grad(..., allow_int=True) of an integer or'
          ' bool leaf), which optax cannot take either (optax.sgd fails on'
          ' it). Give such a leaf a zero gradient of its own dtype and it is'
          ' carried through untouched: grads = jax.tree.map(lambda g, p:'
          ' jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g, grads,'
          ' params); or keep the counter out of params.')


def value_and_grad(loss: Callable[..., jax.Array]) -> Callable[..., Any]:
  """`jax.value_and_grad` of ``loss``; integer / bool leaves get a zero.

  The gradient of a non-float leaf is float32 zeros (never float0), so the
  pieces treat it as a parameter that does not move.
  """
  both = jax.value_and_grad(loss, allow_int=True)

  def value_and_gradient(params, *args):
    value, grad = both(params, *args)
    return value, jax.tree.map(
        lambda g, p: jnp.zeros(jnp.shape(p), jnp.float32)
        if g.dtype == jax.dtypes.float0 else g, grad, params)

  return value_and_gradient


def _has_non_float(params: Any) -> bool:
  return params is not None and not all(
      is_float_leaf(p) for p in jax.tree.leaves(params))


def float_gradient(updates: Any, params: Any) -> Any:
  """The gradient the pieces see: float32 zeros on integer / bool leaves."""
  if not _has_non_float(params):
    return updates
  return jax.tree.map(lambda g, p: g if is_float_leaf(p) else jnp.zeros(
      jnp.shape(p), jnp.float32), updates, params)


def carry_non_float(out: Any, updates: Any, params: Any) -> Any:
  """The incoming gradient of every integer / bool leaf, handed on as is."""
  if not _has_non_float(params):
    return out
  return jax.tree.map(lambda o, g, p: o if is_float_leaf(p) else g, out,
                      updates, params)


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
    check_params_are_arrays(owner, params)
    return init(params)

  def checked_update(updates, state, params=None, **extra_args):
    if params is not None:
      check_param_leaves(owner, updates, params)
    check_state(owner, state, init, params)
    out, new_state = update(float_gradient(updates, params), state, params,
                            **extra_args)
    return carry_non_float(out, updates, params), new_state

  return checked_init, checked_update


# update(updates, state, params, **loss_kwargs) takes these names itself
# (optax's update and every optax.chain's): a loss keyword argument with one
# of them can never be passed to loss_fn.
_UPDATE_ARGUMENTS = ('updates', 'state', 'params')
_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD,
               inspect.Parameter.KEYWORD_ONLY)


def _later_parameters(loss_fn: Callable[..., Any]) -> Optional[list]:
  """loss_fn's parameters after ``params``; None if they cannot be read."""
  try:
    return list(inspect.signature(loss_fn).parameters.values())[1:]
  except (TypeError, ValueError):
    return None


def check_loss_signature(owner: str, loss_fn: Callable[..., Any]) -> None:
  """At construction: loss_fn can take what update forwards, by keyword."""
  later = _later_parameters(loss_fn) or []
  positional = [p.name for p in later
                if p.kind is inspect.Parameter.POSITIONAL_ONLY]
  if positional:
    names = ', '.join(positional)
    raise TypeError(
        f'{owner}: loss_fn takes {positional} positionally only (before a'
        ' `/`), but the keyword arguments of update are passed to it by'
        ' name: tx.update(grads, state, params, batch=batch) calls'
        ' loss_fn(params, batch=batch). Drop the `/`, or pass'
        f' `lambda params, {names}: loss_fn(params, {names})`.')
  clashing = [p.name for p in later if p.kind in _BY_KEYWORD
              and p.default is inspect.Parameter.empty
              and p.name in _UPDATE_ARGUMENTS]
  if clashing:
    name = clashing[0]
    raise TypeError(
        f'{owner}: loss_fn needs a keyword argument named {name!r}, but'
        f' update(updates, state, params, **loss_kwargs) -- optax\'s, and'
        f' that of every optax.chain -- takes {name!r} itself, so it can'
        ' never reach loss_fn. Rename it in loss_fn, e.g. model_' + name +
        ', and pass tx.update(grads, opt_state, params, model_' + name +
        '=...).')


def missing_loss_keywords(loss_fn: Callable[..., Any],
                          loss_kwargs: Mapping[str, Any]) -> list:
  """The required keyword arguments of loss_fn that ``loss_kwargs`` lacks."""
  return [p.name for p in _later_parameters(loss_fn) or []
          if p.kind in _BY_KEYWORD and p.default is inspect.Parameter.empty
          and p.name not in loss_kwargs]


def call_loss(owner: str, loss_fn: Callable[..., Any], params: Any,
              loss_kwargs: Mapping[str, Any]) -> Any:
  """``loss_fn(params, **loss_kwargs)``; a missing keyword names the fix."""
  try:
    return loss_fn(params, **loss_kwargs)
  except TypeError as error:
    missing = missing_loss_keywords(loss_fn, loss_kwargs)
    if not missing:
      raise
    given = sorted(loss_kwargs) or 'none'
    example = ', '.join(f'{name}={name}' for name in missing)
    raise TypeError(
        f'{owner}: loss_fn needs the keyword argument(s) {missing}, but the'
        f' keyword arguments of update that it takes are {given}. The'
        ' optimizer calls loss_fn(params, **loss_kwargs) with the keyword'
        ' arguments given to update: call'
        f' tx.update(grads, opt_state, params, {example}) (optax.chain'
        ' forwards them). A loop that calls update(grads, state, params)'
        ' alone cannot feed the loss: close over the batch in loss_fn'
        ' instead. flax\'s TrainState.apply_gradients is such a loop:'
        ' sam_optax.linen.TrainState forwards apply_gradients(grads=...,'
        ' loss_kwargs=dict(...)); nnx.Optimizer forwards'
        ' optimizer.update(model, grads, **loss_kwargs).') from error


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


def _model_framework(params: Any) -> Union[str, None]:
  """'nnx' for an nnx.State, 'equinox' for an Equinox module, else None."""
  for cls in type(params).__mro__:
    module = getattr(cls, '__module__', None) or ''
    if module.startswith('flax.nnx'):
      return 'nnx'
    if module.startswith('equinox'):
      return 'equinox'
  return None


_ADAPTER_FIX = {
    'nnx': (
        'an nnx.State, the parameters nnx.Optimizer hands on. A loss written'
        ' the NNX way, loss(model, ...), needs the model: build the'
        ' transformation on sam_optax.nnx.loss_fn(loss), take before ='
        ' sam_optax.nnx.snapshot(model) before the clean pass, and call'
        ' optimizer.update(model, grads, snapshot=before, batch=batch)'),
    'equinox': (
        'an Equinox module holding only the arrays of eqx.filter(model,'
        ' eqx.is_array) (None elsewhere). A loss written the Equinox way,'
        ' loss(model, ...), needs the whole model: build the transformation'
        ' on sam_optax.equinox.loss_fn(loss, model), which puts the rest'
        ' back (eqx.combine)'),
}


def with_framework_hint(owner: str,
                        loss_fn: Callable[..., Any]) -> Callable[..., Any]:
  """loss_fn; a framework's ``loss(model, ...)`` given the params says so.

  When loss_fn fails inside (a TypeError or AttributeError, not a wrong
  argument list) on params that are an ``nnx.State`` or an Equinox module,
  the error names the adapter to use. Built by an adapter, loss_fn is kept.
  """
  if getattr(loss_fn, 'sam_optax_adapter', None):
    return loss_fn

  def hinted(params, **loss_kwargs):
    try:
      return loss_fn(params, **loss_kwargs)
    except (TypeError, AttributeError) as error:
      framework = _model_framework(params)
      trace = error.__traceback__  # never None for a caught error
      if framework is None or trace is None or trace.tb_next is None:
        raise  # not a framework's params, or the call's own argument list
      raise TypeError(
          f'{owner}: loss_fn raised {type(error).__name__}: {error} -- when'
          f' called with params of type {type(params).__name__}, which is'
          f' {_ADAPTER_FIX[framework]}. See docs/guide/frameworks.md.'
      ) from error

  hinted.__wrapped__ = loss_fn  # inspect.signature reads loss_fn's own
  return hinted


def checked_scalar_loss(
    owner: str, loss_fn: Callable[..., Any], has_aux: bool
) -> Callable[..., jax.Array]:
  """Wraps loss_fn so that it returns a checked scalar (aux is dropped)."""
  loss_fn = with_framework_hint(owner, loss_fn)
  check_loss_signature(owner, loss_fn)

  def scalar_loss(params, loss_kwargs):
    out = call_loss(owner, loss_fn, params, loss_kwargs)
    return check_loss_output(owner, out, has_aux,
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
