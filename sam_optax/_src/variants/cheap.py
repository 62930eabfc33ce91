"""Pieces shared by the cheap family (looksam, ae_sam, random_sam, esam).

A cheap variant takes SAM's second gradient on some steps only. The branch
is a `jax.lax.cond`, so a step that skips it does not pay for it; its state
records ``sam_step`` so that the fraction of SAM steps can be logged.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.pipeline import groups
from sam_optax._src.pipeline import variant as variant_lib

PyTree = Any


def wide_tree(tree: PyTree) -> PyTree:
  """Every leaf in float32 (or wider)."""
  return jax.tree.map(tree_math.wide, tree)


def varying_like(tree: PyTree, ref: PyTree) -> PyTree:
  """``tree`` marked varying over the mesh axes ``ref``'s leaves vary over.

  Inside `jax.shard_map` the two branches of a `jax.lax.cond` must agree on
  which axes a value varies over; a value read from the (replicated) state
  in one branch is cast to vary like the gradient of the other.
  """
  axes = frozenset().union(*(groups.varying_axes(x)
                             for x in jax.tree.leaves(ref)))
  return groups.make_local(tree, tuple(axes), bool(axes))


def sam_or(ctx: variant_lib.Context, sam_step: jax.Array,
           sam: Callable[[], tuple[jax.Array, PyTree]],
           other: Callable[[], PyTree]) -> tuple[jax.Array, PyTree]:
  """``sam()`` where ``sam_step``, else ``(previous perturbed loss, other())``.

  A `jax.lax.cond`: only the taken branch runs. ``sam`` returns
  ``(loss, gradient)``; the gradients of both branches are float32.
  """

  def take_sam():
    loss, grad = sam()
    return jnp.asarray(loss, jnp.float32), wide_tree(grad)

  def take_other():
    return varying_like((ctx.state.perturbed_loss, wide_tree(other())),
                        ctx.clean_grad)

  return jax.lax.cond(jnp.asarray(sam_step, bool), take_sam, take_other)


def sam_gradient(ctx: variant_lib.Context) -> Callable[[], Any]:
  """SAM's step as a thunk: ``(L(w + eps), grad L(w + eps))``."""
  return ctx.perturbed


def clean_gradient(ctx: variant_lib.Context) -> Callable[[], PyTree]:
  """The plain step as a thunk: g0."""
  return lambda: ctx.clean_grad


def every(count: jax.Array, interval: int) -> jax.Array:
  """Whether ``count`` is 0, interval, 2 interval, ... (a bool scalar)."""
  return jnp.asarray(count, jnp.int32) % jnp.int32(interval) == 0
