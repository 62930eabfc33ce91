"""Ascent directions and leaf masks, shared by the transformations and helpers.

SAM's direction ``g / ||g||`` and ASAM's ``T^2 g / ||T g||`` with
``T = |w| + eta`` are used both to train (`sam_optax.sam`, `sam_optax.asam`)
and to measure (`sam_optax.sharpness.sam_sharpness`); they live here so that
neither side imports the other.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math

PyTree = Any
# Which leaves an option applies to: a pytree of bools like params, an
# optax-style function ``params -> pytree of bools`` (as `optax.masked`
# takes), or a predicate ``(path, leaf) -> bool``.
LeafMask = Union[PyTree, Callable[..., Any]]


def normalized_direction(grad: PyTree) -> PyTree:
  """SAM's ascent direction ``g / ||g||`` in float32 (zero for g = 0)."""
  inverse_norm = tree_math.safe_inverse(tree_math.tree_norm(grad))
  return jax.tree.map(lambda g: inverse_norm * tree_math.wide(g), grad)


def _positional_arity(fn: Callable[..., Any]) -> Optional[int]:
  try:
    parameters = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return None
  kinds = (inspect.Parameter.POSITIONAL_ONLY,
           inspect.Parameter.POSITIONAL_OR_KEYWORD)
  return sum(1 for p in parameters if p.kind in kinds and
             p.default is inspect.Parameter.empty)


def resolve_mask(owner: str, name: str, mask: Optional[LeafMask],
                 params: PyTree) -> PyTree:
  """A pytree of Python bools like ``params`` (None: every leaf selected).

  ``mask`` may be a pytree of bools with the structure of ``params``, a
  function ``params -> pytree of bools`` (as `optax.masked` takes), or a
  predicate ``(path, leaf) -> bool``; the two callables are told apart by
  their number of required positional arguments.
  """
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  if callable(mask) and not isinstance(mask, dict):
    if _positional_arity(mask) == 2:
      return jax.tree_util.tree_map_with_path(
          lambda path, leaf: bool(mask(path, leaf)), params)
    mask = mask(params)
  try:
    return jax.tree.map(lambda _, m: bool(m), params, mask)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f'{owner}: {name} must be a pytree of bools with the structure of'
        ' params, a function `params -> pytree of bools` (as optax.masked'
        ' takes), or a predicate `(path, leaf) -> bool`; got'
        f' {jax.tree.structure(mask)} for params {jax.tree.structure(params)}.'
    ) from error


def check_mask(owner: str, name: str, mask: Optional[LeafMask]) -> None:
  """At construction: a given tree mask must hold bools only."""
  if mask is None or callable(mask):
    return
  for leaf in jax.tree.leaves(mask):
    if not isinstance(leaf, (bool, jnp.bool_)) and not (
        hasattr(leaf, 'dtype') and leaf.dtype == bool and leaf.ndim == 0):
      raise TypeError(
          f'{owner}: {name} must hold Python bools (one per parameter leaf),'
          f' got {leaf!r}. Or pass a function `params -> pytree of bools`.'
      )


def adaptive_scale(params: PyTree, eta: jax.Array, mask: PyTree) -> PyTree:
  """ASAM's ``T = |w| + eta`` on adaptive leaves, 1 on exempt leaves (f32)."""
  return jax.tree.map(
      lambda p, adaptive: (
          jnp.abs(tree_math.wide(p)) + eta
          if adaptive
          else jnp.ones(p.shape, jnp.float32)
      ),
      params,
      mask,
  )


def adaptive_direction(grad: PyTree, scale: PyTree) -> PyTree:
  """ASAM's ascent direction ``T^2 g / ||T g||`` for the metric ``T``."""
  tg = jax.tree.map(lambda t, g: t * tree_math.wide(g), scale, grad)
  inverse_norm = tree_math.safe_inverse(tree_math.tree_norm(tg))
  return jax.tree.map(lambda t, x: inverse_norm * t * x, scale, tg)
