"""`optax.inject_hyperparams` with sam_optax's structural arguments static."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Optional, Union

import jax.numpy as jnp
import optax

from sam_optax._src.core import validation



def annealable(factory: Callable[..., Any]) -> frozenset:
  """The factory's arguments that take a number or a schedule.

  They are the ones annotated ``ScalarOrSchedule``; everything else (the
  loss function, step counts, masks, flags, the layout) is structural and
  stays static.
  """
  return frozenset(
      name for name, p in inspect.signature(factory).parameters.items()
      if p.annotation is validation.ScalarOrSchedule
      or 'ScalarOrSchedule' in str(p.annotation))


def inject_hyperparams(
    factory: Callable[..., optax.GradientTransformation],
    static_args: Union[str, Iterable[str]] = (),
    hyperparam_dtype: Optional[jnp.dtype] = None,
):
  """`optax.inject_hyperparams` for sam_optax factories.

  Plain `optax.inject_hyperparams` treats every callable argument as a
  schedule and every int as an array, which would turn ``loss_fn`` into a
  schedule (optax calls it with the step count, inside your loss) and
  ``ascent_steps`` into a traced value. This wrapper keeps every argument
  static except the annealable ones (those that take a number or a schedule:
  ``rho``, ``eta``, ``rho_max``, ``alpha``, ...), which can then be read and
  set in ``state.hyperparams``.

  Examples:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p: jnp.sum(p ** 2)
    >>> tx = sam_optax.inject_hyperparams(sam_optax.sam)(loss_fn, rho=0.05)
    >>> state = tx.init(jnp.ones(3))
    >>> state.hyperparams['rho'] = jnp.asarray(0.1)  # set rho from outside

  It is equivalent to
  ``optax.inject_hyperparams(sam_optax.sam, static_args=('loss_fn',
  'ascent_steps', 'has_aux'))``.
  """
  static_args = {static_args} if isinstance(static_args, str) else set(
      static_args
  )
  parameters = inspect.signature(factory).parameters
  static_args |= set(parameters) - annealable(factory)
  return optax.inject_hyperparams(
      factory, static_args=static_args, hyperparam_dtype=hyperparam_dtype
  )
