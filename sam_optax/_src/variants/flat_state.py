"""A parameter-shaped state field kept as one float32 vector.

The pipeline agrees each own state field as one array (a mean over groups
and devices, cast back to the field's dtype), so a variant that keeps a
vector per parameter (Friendly SAM's momentum, VaSSO's average) stores it
flattened: all leaves, in `jax.tree.leaves` order, raveled and concatenated
in float32 whatever the parameters' dtype. `unflatten` gives the tree back.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
DTYPE = jnp.float32


def size(params: PyTree) -> int:
  """The number of scalars in ``params`` (the vector's length)."""
  return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(params))


def zeros(params: PyTree) -> jax.Array:
  """A zero vector for ``params``, float32 whatever their dtype."""
  return jnp.zeros([size(params)], DTYPE)


def flatten(tree: PyTree) -> jax.Array:
  """Every leaf raveled and concatenated, in float32."""
  leaves = [jnp.ravel(x).astype(DTYPE) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros([0], DTYPE)
  return jnp.concatenate(leaves)


def unflatten(vector: jax.Array, like: PyTree) -> PyTree:
  """The tree of ``like``'s structure and shapes (float32) from ``vector``."""
  leaves, treedef = jax.tree.flatten(like)
  out, start = [], 0
  for leaf in leaves:
    shape = jnp.shape(leaf)
    stop = start + math.prod(shape)
    out.append(jnp.reshape(vector[start:stop], shape))
    start = stop
  return jax.tree.unflatten(treedef, out)
