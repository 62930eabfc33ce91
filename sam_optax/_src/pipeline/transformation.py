"""From a `Variant` to an `optax.GradientTransformationExtraArgs`.

`transformation` turns a factory ``(...) -> Variant`` into the public
factory ``(loss_fn, ...)``: it takes ``loss_fn`` and the options every
variant takes (``ascent_steps``, ``has_aux``, ``perturbation_mask``,
``layout``, ``track_cosine``), validates them with the variant's
hyperparameters, and builds ``init`` / ``update`` (`update.Pipeline`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional, ParamSpec, Protocol, TypedDict

import optax

from sam_optax._src.core import directions
from sam_optax._src.core import inject
from sam_optax._src.core import masks
from sam_optax._src.core import validation
from sam_optax._src.pipeline import layouts
from sam_optax._src.pipeline import update as update_lib
from sam_optax._src.pipeline.variant import Variant

P = ParamSpec('P')
LossFn = Callable[..., Any]


class CommonOptions(TypedDict, total=False):
  """The keyword-only options every transformation takes (as in `sam`).

  A factory declares them with ``**common: Unpack[CommonOptions]`` so that
  type checkers see them; the pipeline takes them, the factory never does.
  """

  ascent_steps: int
  has_aux: bool
  perturbation_mask: Optional[directions.LeafMask]
  layout: layouts.Layout
  track_cosine: bool


# The same options as they show in the public signature, with defaults.
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
_LOSS_FN = inspect.Parameter('loss_fn', inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             annotation='Callable[..., Any]')


class Factory(Protocol[P]):
  """A public factory: ``loss_fn``, then the variant's own arguments."""

  def __call__(self, loss_fn: LossFn, *args: P.args,
               **kwargs: P.kwargs) -> optax.GradientTransformationExtraArgs:
    ...


def transformation(factory: Callable[P, Variant]) -> Factory[P]:
  """Decorates ``factory(...) -> Variant`` as the public ``(loss_fn, ...)``.

  The factory declares its own arguments and ``**common:
  Unpack[CommonOptions]``; ``loss_fn`` and the common options go to the
  pipeline (`build`). The public factory's signature, for Python and for
  type checkers, is the factory's with ``loss_fn`` first and the options
  spelled out; its arguments typed `ScalarOrSchedule` are recorded for
  `inject_hyperparams`. The variant is named after the factory (its
  ``__name__``, the public name) unless it declares a name of its own.
  """
  signature = inspect.signature(factory)
  own = list(signature.parameters.values())
  if not own or own[-1].kind is not inspect.Parameter.VAR_KEYWORD:
    raise TypeError(
        f'{factory.__name__}: a variant factory ends with **common:'
        ' Unpack[transformation.CommonOptions], so that type checkers see'
        ' the options every transformation takes.')

  def public(loss_fn: LossFn, *args: P.args,
             **kwargs: P.kwargs) -> optax.GradientTransformationExtraArgs:
    options: dict[str, Any] = {
        p.name: kwargs.pop(p.name) for p in _COMMON if p.name in kwargs}
    return build(factory(*args, **kwargs).named(factory.__name__), loss_fn,
                 **options)

  functools.update_wrapper(public, factory)
  public.__signature__ = signature.replace(
      parameters=[_LOSS_FN, *own[:-1], *_COMMON],
      return_annotation='optax.GradientTransformationExtraArgs')
  return inject.record_annealable(public)


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


def _check_options(variant, loss_fn, ascent_steps, has_aux,
                   perturbation_mask, layout, track_cosine) -> int:
  owner = variant.name
  validation.check_loss_fn(owner, loss_fn)
  for name, value in variant.hyperparams.items():
    update_lib.bound(variant, name).check(owner, name, value)
  validation.check_bool(owner, 'has_aux', has_aux)
  validation.check_bool(owner, 'track_cosine', track_cosine)
  directions.check_mask(owner, 'perturbation_mask', perturbation_mask)
  layouts.check_layout(owner, layout)
  return validation.check_static_int(owner, 'ascent_steps', ascent_steps,
                                     minimum=1)


def build(variant: Variant, loss_fn: LossFn, *, ascent_steps: int = 1,
          has_aux: bool = False,
          perturbation_mask: Optional[directions.LeafMask] = None,
          layout: layouts.Layout = None, track_cosine: bool = False
          ) -> optax.GradientTransformationExtraArgs:
  """The `optax.GradientTransformationExtraArgs` that runs ``variant``."""
  if not variant.name:
    raise TypeError(
        'A Variant built outside @transformation.transformation needs a'
        " name: pass name='...' (the public name, used in error messages).")
  ascent_steps = _check_options(variant, loss_fn, ascent_steps, has_aux,
                                perturbation_mask, layout, track_cosine)
  pipeline = update_lib.Pipeline(
      variant=variant, layout=layout, ascent_steps=ascent_steps,
      track_cosine=track_cosine,
      perturbation_mask=masks.perturbed_leaves(variant.name,
                                               perturbation_mask),
      accepted=forwarded_names(loss_fn),
      scalar_loss=validation.checked_scalar_loss(variant.name, loss_fn,
                                                 has_aux))
  return optax.GradientTransformationExtraArgs(
      *validation.checked(variant.name, variant.initial_state,
                          pipeline.update))
