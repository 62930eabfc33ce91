"""Tree arithmetic in float32, with divisions that never produce NaN.

Every norm and dot product in sam_optax goes through these helpers, so that
bfloat16 / float16 parameters neither overflow nor underflow when squared, and
a zero vector divides into a zero vector instead of NaN.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

PyTree = Any

ACCUMULATION_DTYPE = jnp.float32


def wide(x: jax.Array) -> jax.Array:
  """Casts to float32 unless the array is already at least as wide."""
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits >= 32:
    return x
  return x.astype(ACCUMULATION_DTYPE)


# Overflow-safe sums, leaf by leaf: each leaf is divided by the power of two
# at or above its largest |entry| (exact: a power of two only shifts the
# exponent), so its squares and products neither overflow nor underflow
# float32, and its sum is carried as (value, exponent). The leaves' sums are
# then added on the largest exponent. Each leaf is read twice (its max, its
# sum), with no branch: a lax.cond taking every leaf into a rescaled second
# pass cost XLA:CPU 0.15 of a parameter buffer of temporaries in SAM's step
# at 2.2M parameters (1.44 against 1.29 here and in a hand-written step),
# and a cond per leaf would make a GPU wait on the host once per leaf.


def _exponent(x: jax.Array) -> jax.Array:
  """e with max|x| = f 2^e, f in [0.5, 1); 0 for a zero, inf or NaN leaf."""
  largest = jax.lax.stop_gradient(jnp.max(jnp.abs(x), initial=0.0))
  usable = (largest > 0) & jnp.isfinite(largest)
  return jnp.frexp(jnp.where(usable, largest, 1.0))[1]


def _times_power_of_two(x: jax.Array, e: jax.Array) -> jax.Array:
  """x 2^e for an integer e, exact wherever the result fits x's dtype.

  As two products, each by a power of two inside the dtype's range: 2^e
  itself is not a float32 for e = 128 (a largest entry near float32's
  maximum), nor, under XLA:CPU's flush to zero, for e below -126.
  """
  half = e // 2
  one = jnp.ones([], jnp.finfo(x.dtype).dtype)  # complex: its real part's
  first, second = jnp.ldexp(one, half), jnp.ldexp(one, e - half)
  return (x * first.astype(x.dtype)) * second.astype(x.dtype)


def _scaled_products(a: list, b: Optional[list]) -> tuple[jax.Array,
                                                           jax.Array]:
  """Per leaf i: (v_i, e_i) with <a_i, b_i> = v_i 2^(e_i), stacked.

  b = None: the sums of squares of a, ||a_i||^2 = v_i 2^(e_i).
  """
  values, exponents = [], []
  for i, x in enumerate(a):
    ex = _exponent(x)
    xs = _times_power_of_two(x, -ex)
    if b is None:
      values.append(jnp.sum(jnp.square(jnp.abs(xs))))
      exponents.append(2 * ex)
    else:
      ey = _exponent(b[i])
      ys = _times_power_of_two(b[i], -ey)
      values.append(jnp.vdot(xs, ys).real)
      exponents.append(ex + ey)
  if not values:
    return jnp.zeros([1], ACCUMULATION_DTYPE), jnp.zeros([1], jnp.int32)
  return jnp.stack(values), jnp.stack(exponents)


def _aligned(values: jax.Array, exponents: jax.Array, top: jax.Array):
  """sum_i v_i 2^(e_i - top): the leaves' sums on the common exponent."""
  return jnp.sum(_times_power_of_two(values, exponents - top))


def _wide_leaves(a: PyTree) -> list:
  return [wide(x) for x in jax.tree.leaves(a)]


def _dot(a: list, b: list) -> jax.Array:
  values, exponents = _scaled_products(a, b)
  top = jnp.max(exponents)
  return _times_power_of_two(_aligned(values, exponents, top), top)


def _norm_parts(leaves: list) -> tuple[jax.Array, jax.Array]:
  """(r, e): ||leaves|| = r 2^e, with r from a sum of squares near 1."""
  values, exponents = _scaled_products(leaves, None)  # exponents even
  top = jnp.max(exponents)
  return _root(_aligned(values, exponents, top)), top // 2


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """<a, b> over all leaves, accumulated in float32 (or wider).

  Overflow-safe: each leaf is scaled by a power of two before its products
  are summed, so the result is right whenever it fits float32, even when
  products of the entries would not.
  """
  jax.tree.map(lambda x, y: None, a, b)  # the same structure, or an error
  return _dot(_wide_leaves(a), _wide_leaves(b))


def _root(squares: jax.Array) -> jax.Array:
  """sqrt with derivative 0 at 0 (the double where keeps both sides finite)."""
  positive = squares > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)),
                   squares)


def tree_sum_of_squares(a: PyTree) -> jax.Array:
  """||a||^2 in float32 (or wider); inf when the square itself overflows."""
  return jnp.square(tree_norm(a))


def tree_norm(a: PyTree) -> jax.Array:
  """Global L2 norm over every leaf, in float32 (or wider).

  Overflow-safe: each leaf is scaled by a power of two before it is squared,
  so entries anywhere in float32's normal range give the right norm
  whenever the norm fits (an infinite entry gives inf, a NaN stays NaN).

  Safe to differentiate at zero: the derivative of the norm of a zero vector
  is taken as 0, not the NaN of ``sqrt``'s infinite slope.
  """
  root, exponent = _norm_parts(_wide_leaves(a))
  return _times_power_of_two(root, exponent)


def safe_inverse(x: jax.Array) -> jax.Array:
  """1 / x where x > 0, 0 where x = 0, NaN stays NaN; finite derivatives.

  Used for divisions by norms (x >= 0): a zero vector divides into a zero
  vector, while a NaN norm is never turned into a plausible 0.
  """
  positive = x > 0
  return jnp.where(positive, 1.0 / jnp.where(positive, x, 1.0), x * 0.0)


def safe_cosine(a: PyTree, b: PyTree) -> jax.Array:
  """cos(a, b); 0 when either vector is zero.

  Taken as <a / ||a||, b / ||b||>, each norm divided out in two exact
  factors, so no product overflows even where a norm itself would.
  """
  return _dot(_unit(_wide_leaves(a)), _unit(_wide_leaves(b)))


def _unit(leaves: list) -> list:
  """leaves / ||leaves||, dividing by the norm's two factors one at a time."""
  root, exponent = _norm_parts(leaves)
  up = safe_inverse(root)
  return [_times_power_of_two(x, -exponent) * up.astype(x.dtype)
          for x in leaves]


def all_finite(tree: PyTree) -> jax.Array:
  """Whether every entry of every floating leaf of ``tree`` is finite."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return functools.reduce(jnp.logical_and, checks, jnp.asarray(True))


def nan_unless(ok: jax.Array, tree: PyTree) -> PyTree:
  """``tree`` where ``ok``, NaN where not: how a bad value is never hidden.

  The NaN is made by arithmetic (inf * 0) only where ``ok`` is False, never
  as a constant, so a healthy step creates no NaN at all and
  ``jax_debug_nans`` stays quiet on it. Non-float leaves pass unchanged.
  """
  poison = jnp.where(ok, 0.0, jnp.inf) * 0.0
  return jax.tree.map(
      lambda x: x + poison.astype(x.dtype)
      if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else x, tree)


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
