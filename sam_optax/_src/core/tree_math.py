"""Tree arithmetic in float32, with divisions that never produce NaN.

Every norm and dot product in sam_optax goes through these helpers, so that
bfloat16 / float16 parameters neither overflow nor underflow when squared, and
a zero vector divides into a zero vector instead of NaN.
"""

from __future__ import annotations

import functools
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


# Overflow-safe sums in one pass (after Blue, "A portable Fortran program to
# find the Euclidean norm of a vector", ACM TOMS 1978): every entry falls in
# one of three magnitude classes -- big (|x| > 2^40), small (|x| < 2^-40) or
# neither -- and is multiplied by 2^-70, 2^70 or 1, so that no scaled product
# overflows or underflows float32. A product of two entries then carries the
# known weight 2^(70 k), k = -2..2, and is summed into accumulator k. All five
# are one variadic reduction per leaf: the data is read once, with no branch
# and no buffer beyond the inputs (a lax.cond around a second, rescaled pass
# cost XLA from a fifth to a whole parameter buffer of temporaries).
_CLASS_BOUND = 2.0 ** 40
_CLASS_SHIFT = 2.0 ** 70
_OFFSETS = range(-2, 3)


def _classify(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x scaled into range, its class: +1 big, -1 small, 0 otherwise)."""
  magnitude = jnp.abs(x)
  big, small = magnitude > _CLASS_BOUND, magnitude < 1.0 / _CLASS_BOUND
  scale = jnp.where(big, 1.0 / _CLASS_SHIFT,
                    jnp.where(small, _CLASS_SHIFT, 1.0))
  return (x * scale.astype(x.dtype),
          big.astype(jnp.int8) - small.astype(jnp.int8))


def _offset_sums(a: list, b: list) -> list[jax.Array]:
  """[sum of a' b' over the entries of class offset k] for k = -2..2."""
  totals = [jnp.zeros([], ACCUMULATION_DTYPE)] * len(_OFFSETS)
  for x, y in zip(a, b):
    (xs, kx), (ys, ky) = _classify(x), _classify(y)
    product, offset = (jnp.conj(xs) * ys).real, kx + ky
    terms = tuple(jnp.where(offset == k, product, 0.0) for k in _OFFSETS)
    zero = jnp.zeros([], product.dtype)  # float32, or float64 under x64
    sums = jax.lax.reduce(terms, (zero,) * len(_OFFSETS),
                          lambda u, v: tuple(p + q for p, q in zip(u, v)),
                          tuple(range(jnp.ndim(x))))
    totals = [t + s for t, s in zip(totals, sums)]
  return totals


def _leading(totals: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(m, k): the sum of totals[j] 2^(70 j) is m 2^(70 k), k the top nonzero j.

  m is summed from the lowest offset up, scaling by 2^-70 at each step, so
  negligible terms underflow gracefully and a NaN anywhere stays NaN.
  """
  mantissa = partial = totals[0]
  # k is a float like the totals: batched and sharded as they are, with a
  # plain zero derivative.
  offset = jnp.full_like(totals[0], _OFFSETS[0])
  for k, total in zip(_OFFSETS[1:], totals[1:]):
    partial = partial * (1.0 / _CLASS_SHIFT) + total
    top = total != 0
    mantissa = jnp.where(top, partial, mantissa)
    offset = jnp.where(top, float(k), offset)
  return mantissa, jax.lax.stop_gradient(offset)


def _root_of_weight(k: jax.Array) -> jax.Array:
  """2^(35 k), the square root of class weight k, exactly.

  A chain of selects built on k itself, neither a gather nor a constant
  array: under a sharded vmap either would leave the result's sharding
  ambiguous.
  """
  out = jnp.ones_like(k)
  for j in _OFFSETS:
    out = jnp.where(k == j, _CLASS_SHIFT ** (j / 2), out)
  return out


def _wide_leaves(a: PyTree) -> list:
  return [wide(x) for x in jax.tree.leaves(a)]


# The class scalings are exact in value but not in derivative (a small
# entry's share reaches the top accumulator through factors below float32's
# range), so the derivatives are given by hand, as plain sums that are
# linear in the tangents (so that they transpose, for reverse mode):
# d<a, b> = <da, b> + <a, db>; d||x|| = <x / ||x||, dx>.
@jax.custom_jvp
def _dot(a: list, b: list) -> jax.Array:
  mantissa, offset = _leading(_offset_sums(a, b))
  root = _root_of_weight(offset)
  return (mantissa * root) * root


@_dot.defjvp
def _dot_jvp(primals, tangents):
  (a, b), (da, db) = primals, tangents
  return _dot(a, b), _plain_dot(da, b) + _plain_dot(a, db)


def _plain_dot(a: list, b: list) -> jax.Array:
  parts = [jnp.vdot(x, y).real for x, y in zip(a, b)]
  return sum(parts, start=jnp.zeros([], ACCUMULATION_DTYPE))


@jax.custom_jvp
def _norm_parts(leaves: list) -> tuple[jax.Array, jax.Array]:
  """(r, j): ||leaves|| = r 2^(35 j), j an even whole number (as a float)."""
  mantissa, offset = _leading(_offset_sums(leaves, leaves))  # offset is even
  return _root(mantissa), offset


@_norm_parts.defjvp
def _norm_parts_jvp(primals, tangents):
  (leaves,), (dleaves,) = primals, tangents
  root, offset = _norm_parts(leaves)
  down = _root_of_weight(-offset)
  scaled = [t * down.astype(t.dtype) for t in dleaves]
  return (root, offset), (_plain_dot(_unit(leaves), scaled),
                          jnp.zeros_like(offset))


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """<a, b> over all leaves, accumulated in float32 (or wider).

  Overflow-safe in one pass: entries are summed in magnitude classes scaled
  by powers of two, so the result is right whenever it fits float32, even
  when products of the entries would not.
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

  Overflow-safe in one pass: the squares are summed in magnitude classes
  scaled by powers of two, so entries anywhere in float32's normal range
  give the right norm whenever the norm fits (an infinite entry gives inf,
  a NaN stays NaN).

  Safe to differentiate at zero: the derivative of the norm of a zero vector
  is taken as 0, not the NaN of ``sqrt``'s infinite slope.
  """
  root, offset = _norm_parts(_wide_leaves(a))
  return root * _root_of_weight(offset)


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
  root, offset = _norm_parts(leaves)
  down, up = _root_of_weight(-offset), safe_inverse(root)
  return [(x * down.astype(x.dtype)) * up.astype(x.dtype) for x in leaves]


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
