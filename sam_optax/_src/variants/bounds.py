"""Upper bounds of the family's hyperparameters (the pipeline checks >= 0).

A number is checked when the transformation is built; a schedule or a
traced value (`sam_optax.inject_hyperparams`) that breaks the bound makes
the update NaN, as the pipeline does for a negative one.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src.core import tree_math

PyTree = Any


def check_below(owner: str, name: str, value: Any, bound: float, *,
                inclusive: bool) -> None:
  """A static number must be <= bound (< bound without ``inclusive``)."""
  if callable(value) or isinstance(value, (bool, jax.core.Tracer)):
    return
  if not isinstance(value, (numbers.Real, np.ndarray, jax.Array)):
    return  # the pipeline's check names the type
  if jnp.ndim(value) != 0:
    return
  number = float(value)
  if number > bound or (number == bound and not inclusive):
    relation = '<=' if inclusive else '<'
    raise ValueError(
        f'{owner}: {name} must be {relation} {bound}, got {number}.')


nan_unless = tree_math.nan_unless
