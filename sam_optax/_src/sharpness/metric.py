r"""The ball a perturbation lives in: plain, or ASAM's :math:`T_w = |w| + \eta`."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from sam_optax._src.core import directions
from sam_optax._src.core import tree_math
from sam_optax._src.core import validation

PyTree = Any

def scale(params: PyTree, adaptive: bool, eta) -> Optional[PyTree]:
  """T_w = |w| + eta (float32) when adaptive, else None (the identity)."""
  if not adaptive:
    return None
  mask = jax.tree.map(lambda _: True, params)
  return directions.adaptive_scale(params, jnp.asarray(eta, jnp.float32),
                                   mask)


def apply_scale(scale: Optional[PyTree], tree: PyTree) -> PyTree:
  """T * tree in float32 (tree itself, widened, when T is the identity)."""
  wide = jax.tree.map(tree_math.wide, tree)
  if scale is None:
    return wide
  return jax.tree.map(lambda t, x: t * x, scale, wide)


def shift(params: PyTree, delta: PyTree) -> PyTree:
  """w + delta, added in float32, returned in the parameters' dtypes."""
  return tree_math.tree_add_scaled(params, jnp.ones([], jnp.float32), delta)


def check_adaptive(owner: str, adaptive: Any, eta: Any) -> None:
  if not isinstance(adaptive, bool):
    raise TypeError(f'{owner}: adaptive must be a bool, got {adaptive!r}.')
  validation.check_number(owner, 'eta', eta)
