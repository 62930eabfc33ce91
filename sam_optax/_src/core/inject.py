"""`optax.inject_hyperparams` with sam_optax's structural arguments static."""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Iterable, Optional, TypeVar, Union

import jax.numpy as jnp
import optax

from sam_optax._src.core import validation

F = TypeVar('F', bound=Callable[..., Any])
# The attribute where a factory records its annealable arguments.
_RECORD = '_sam_optax_annealable'
_ANNEALABLE_TYPES = (validation.ScalarOrSchedule,
                     Optional[validation.ScalarOrSchedule])


def record_annealable(factory: F) -> F:
  """Records on ``factory`` its arguments typed `ScalarOrSchedule`.

  They are the hyperparameters `inject_hyperparams` can anneal; everything
  else (the loss function, step counts, masks, flags, the layout) is
  structural and stays static. The annotations are resolved (not read as
  text), so an alias or a ``from __future__ import annotations`` string
  counts, and one that does not resolve is an error here, at import.
  """
  hints = typing.get_type_hints(factory)
  setattr(factory, _RECORD, frozenset(
      name for name in inspect.signature(factory).parameters
      if hints.get(name) in _ANNEALABLE_TYPES))
  return factory


def annealable(factory: Callable[..., Any]) -> frozenset[str]:
  """The arguments of a sam_optax factory that take a number or a schedule."""
  names = getattr(factory, _RECORD, None)
  if names is None:
    raise TypeError(
        'sam_optax.inject_hyperparams takes a sam_optax factory (e.g.'
        f' sam_optax.sam), got {factory!r}. For an optax optimizer use'
        ' optax.inject_hyperparams.')
  return names


def inject_hyperparams(
    factory: Callable[..., optax.GradientTransformation],
    static_args: Union[str, Iterable[str]] = (),
    hyperparam_dtype: Optional[jnp.dtype] = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """`optax.inject_hyperparams` for sam_optax factories.

  Plain `optax.inject_hyperparams` treats every callable argument as a
  schedule and every int as an array, which would turn ``loss_fn`` into a
  schedule (optax calls it with the step count, inside your loss) and
  ``ascent_steps`` into a traced value. This wrapper keeps every argument
  static except the annealable ones (those typed `ScalarOrSchedule`:
  ``rho``, ``eta``, ``rho_max``, ``alpha``, ...), which can then be read
  and set in ``state.hyperparams``.

  Examples:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p: jnp.sum(p ** 2)
    >>> tx = sam_optax.inject_hyperparams(sam_optax.sam)(loss_fn, rho=0.05)
    >>> state = tx.init(jnp.ones(3))
    >>> state.hyperparams['rho'] = jnp.asarray(0.1)  # set rho from outside

  For `sam` it is `optax.inject_hyperparams` with ``static_args`` every
  argument but ``rho``.
  """
  static_args = {static_args} if isinstance(static_args, str) else set(
      static_args
  )
  parameters = inspect.signature(factory).parameters
  static_args |= set(parameters) - annealable(factory)
  return optax.inject_hyperparams(
      factory, static_args=static_args, hyperparam_dtype=hyperparam_dtype
  )
