"""What the framework adapters share: the signature of the loss they build."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

# The attribute that marks a loss_fn built by an adapter (its framework).
ADAPTER_ATTRIBUTE = 'sam_optax_adapter'


def loss_parameters(owner: str, loss: Callable[..., Any],
                    reserved: Sequence[str]) -> list[inspect.Parameter]:
  """The parameters of ``loss`` after its first (the model), by keyword.

  The transformations call ``loss_fn(params, **loss_kwargs)`` and forward
  only the keywords ``loss_fn`` names, so the adapted loss declares the
  user's own keywords (plus ``reserved``, the adapter's).
  """
  if not callable(loss):
    raise TypeError(
        f'{owner}: loss must be a callable `loss(model, ...)` returning a'
        f' scalar loss, got {type(loss).__name__}.')
  try:
    parameters = list(inspect.signature(loss).parameters.values())
  except (TypeError, ValueError):  # a builtin: takes anything
    return [inspect.Parameter('kwargs', inspect.Parameter.VAR_KEYWORD)]
  if not parameters or parameters[0].kind not in (
      inspect.Parameter.POSITIONAL_ONLY,
      inspect.Parameter.POSITIONAL_OR_KEYWORD):
    raise TypeError(
        f'{owner}: loss must take the model as its first positional argument,'
        f' `loss(model, ...)`, got the signature {inspect.signature(loss)}.')
  rest = []
  for p in parameters[1:]:
    if p.kind is inspect.Parameter.VAR_POSITIONAL:
      continue  # every argument after the model comes by keyword
    if p.kind is inspect.Parameter.POSITIONAL_ONLY:
      raise TypeError(
          f'{owner}: the transformations pass the batch by keyword, but'
          f' {p.name!r} of loss{inspect.signature(loss)} is positional-only.')
    if p.name in reserved:
      raise TypeError(
          f'{owner}: loss may not take an argument named {p.name!r}: the'
          f' adapter passes {", ".join(map(repr, reserved))} itself.')
    rest.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD else p)
  return rest


def adapted(framework: str, wrapper: Callable[..., Any],
            loss: Callable[..., Any],
            parameters: Sequence[inspect.Parameter]) -> Callable[..., Any]:
  """``wrapper`` with the signature ``(params, *, <parameters>)``, marked."""
  first = inspect.Parameter('params', inspect.Parameter.POSITIONAL_ONLY)
  ordered = sorted(parameters, key=lambda p: p.kind)  # **kwargs last
  wrapper.__signature__ = inspect.Signature([first, *ordered])
  wrapper.__name__ = getattr(loss, '__name__', 'loss')
  wrapper.__qualname__ = wrapper.__name__
  wrapper.__doc__ = getattr(loss, '__doc__', None)
  setattr(wrapper, ADAPTER_ATTRIBUTE, framework)
  return wrapper
