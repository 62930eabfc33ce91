"""Calling loss_fn: its signature, keywords and output checked early."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional, Union

import jax.numpy as jnp


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
