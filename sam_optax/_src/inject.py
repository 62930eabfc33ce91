"""`optax.inject_hyperparams` with sam_optax's structural arguments static."""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Optional, Union

import jax.numpy as jnp
import optax

# Arguments of sam_optax factories that are floats a user may anneal or set
# from outside; everything else (the loss function, step counts, masks,
# flags, axis names) is structural and must stay static.
ANNEALABLE = frozenset({'rho', 'eta', 'rho_max', 'alpha'})


def inject_hyperparams(
    factory: Callable[..., optax.GradientTransformation],
    static_args: Union[str, Iterable[str]] = (),
    hyperparam_dtype: Optional[jnp.dtype] = None,
):
  """`optax.inject_hyperparams` for sam_optax factories.

  Plain `optax.inject_hyperparams` treats every callable argument as a
  schedule and every int as an array, which would turn ``loss_fn`` into a
  schedule and ``ascent_steps`` into a traced value. This wrapper keeps every
  argument other than the annealable floats (``rho``, ``eta``, ``rho_max``,
  ``alpha``) static, so they can be read and set in
  ``state.hyperparams``.

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
  static_args |= {name for name in parameters if name not in ANNEALABLE}
  return optax.inject_hyperparams(
      factory, static_args=static_args, hyperparam_dtype=hyperparam_dtype
  )
