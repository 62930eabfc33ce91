"""Tree arithmetic in float32, with divisions that never produce NaN.

Every norm and dot product in sam_optax goes through these helpers, so that
bfloat16 / float16 parameters neither overflow nor underflow when squared, and
a zero vector divides into a zero vector instead of NaN.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

ACCUMULATION_DTYPE = jnp.float32


def wide(x: jax.Array) -> jax.Array:
  """Casts to float32 unless the array is already at least as wide."""
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits >= 32:
    return x
  return x.astype(ACCUMULATION_DTYPE)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """<a, b> over all leaves, accumulated in float32 (or wider)."""
  parts = jax.tree.leaves(
      jax.tree.map(lambda x, y: jnp.vdot(wide(x), wide(y)).real, a, b)
  )
  return sum(parts, start=jnp.zeros([], ACCUMULATION_DTYPE))


def tree_sum_of_squares(a: PyTree) -> jax.Array:
  parts = [jnp.sum(jnp.square(wide(x))) for x in jax.tree.leaves(a)]
  return sum(parts, start=jnp.zeros([], ACCUMULATION_DTYPE))


def tree_norm(a: PyTree) -> jax.Array:
  """Global L2 norm over every leaf, in float32 (or wider).

  Safe to differentiate at zero: the derivative of the norm of a zero vector
  is taken as 0, not the NaN of ``sqrt``'s infinite slope (the double
  ``where`` keeps the unused branch finite too). A NaN stays NaN.
  """
  squares = tree_sum_of_squares(a)
  positive = squares > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)),
                   squares)


def safe_inverse(x: jax.Array) -> jax.Array:
  """1 / x where x > 0, 0 where x = 0, NaN stays NaN; finite derivatives.

  Used for divisions by norms (x >= 0): a zero vector divides into a zero
  vector, while a NaN norm is never turned into a plausible 0.
  """
  positive = x > 0
  return jnp.where(positive, 1.0 / jnp.where(positive, x, 1.0), x * 0.0)


def safe_cosine(a: PyTree, b: PyTree) -> jax.Array:
  """cos(a, b); 0 when either vector is zero."""
  denominator = tree_norm(a) * tree_norm(b)
  return tree_vdot(a, b) * safe_inverse(denominator)


def tree_scale(scalar: jax.Array, a: PyTree) -> PyTree:
  """scalar * a, computed in float32 and cast back to each leaf's dtype."""
  return jax.tree.map(lambda x: (scalar * wide(x)).astype(x.dtype), a)


def tree_add_scaled(a: PyTree, scalar: jax.Array, b: PyTree) -> PyTree:
  """a + scalar * b, computed in float32, with a's dtypes."""
  return jax.tree.map(
      lambda x, y: (wide(x) + scalar * wide(y)).astype(x.dtype), a, b
  )


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  """a - b in float32 (a's dtypes are kept for the result in float32)."""
  return jax.tree.map(lambda x, y: wide(x) - wide(y), a, b)


def tree_select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Leafwise jnp.where(pred, on_true, on_false) -- a select, not a blend."""
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), on_true, on_false)


def float32_zeros_like(a: PyTree) -> PyTree:
  """Zeros of a's shapes in float32 (or wider): a state field like params."""
  return jax.tree.map(
      lambda x: jnp.zeros(jnp.shape(x), jnp.promote_types(x.dtype,
                                                          jnp.float32)), a)


def tree_cast_like(a: PyTree, like: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: x.astype(y.dtype), a, like)
