"""The cheap family's one piece: on which steps to pay for SAM's 2nd gradient.

A cheap variant (looksam, random_sam, ae_sam) takes SAM's second gradient
on some steps only. A `When` says which -- every k steps from a start
(`every`), a coin with probability p drawn from the state's key (`coin`),
or a threshold on a score (`threshold`) -- and owns the family's
`jax.lax.cond`, so a step that skips the second gradient does not pay for
it; the variant records ``sam_step`` in its state so that the fraction of
SAM steps can be logged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sam_optax._src.core import collectives
from sam_optax._src.core import tree_math
from sam_optax._src.pipeline import variant as variant_lib

PyTree = Any
# ctx -> (sam_step, the own state fields the rule updates, e.g. {'key': k}).
Rule = Callable[[variant_lib.Context], tuple[jax.Array, dict[str, Any]]]


def wide_tree(tree: PyTree) -> PyTree:
  """Every leaf in float32 (or wider)."""
  return jax.tree.map(tree_math.wide, tree)


def varying_like(tree: PyTree, ref: PyTree) -> PyTree:
  """``tree`` marked varying over the mesh axes ``ref``'s leaves vary over.

  Inside `jax.shard_map` the two branches of a `jax.lax.cond` must agree on
  which axes a value varies over; a value read from the (replicated) state
  in one branch is cast to vary like the gradient of the other.
  """
  axes = collectives.tree_varying_axes(ref)
  return collectives.make_local(tree, tuple(axes), bool(axes))


@dataclasses.dataclass(frozen=True)
class When:
  """On which steps a cheap variant takes SAM's second gradient.

  Attributes:
    rule: ``ctx -> (sam_step, fields)``: whether this step is a SAM step (a
      bool scalar, the same in every group and device) and the variant's
      own state fields the rule advances (e.g. the coin's key).
  """

  rule: Rule

  def choose(self, ctx: variant_lib.Context, sam: Callable[[], PyTree],
             other: Callable[[], PyTree]) -> tuple[jax.Array, dict, PyTree]:
    """``(sam_step, fields, sam() on a SAM step, else other())``.

    A `jax.lax.cond`: only the taken branch runs. ``other``'s values (read
    from the replicated state, say) are marked to vary like the gradient.
    """
    sam_step, fields = self.rule(ctx)
    sam_step = jnp.asarray(sam_step, bool)
    out = jax.lax.cond(sam_step, sam,
                       lambda: varying_like(other(), ctx.clean_grad))
    return sam_step, fields, out

  def sam_or_clean(self, ctx: variant_lib.Context
                   ) -> tuple[jax.Array, dict, jax.Array, PyTree]:
    """``(sam_step, fields, loss, gradient)``: SAM's or g0 (float32).

    On a SAM step ``(L(w + eps), grad L(w + eps))``; elsewhere the last SAM
    step's loss and the clean gradient g0.
    """
    sam_step, fields, (loss, grad) = self.choose(
        ctx, lambda: _float32(ctx.perturbed()),
        lambda: (ctx.state.perturbed_loss, wide_tree(ctx.clean_grad)))
    return sam_step, fields, loss, grad


def _float32(loss_and_grad):
  loss, grad = loss_and_grad
  return jnp.asarray(loss, jnp.float32), wide_tree(grad)


def scheduled(count: jax.Array, k: int, start: int = 0) -> jax.Array:
  """Whether ``count`` is start, start + k, start + 2k, ... (a bool scalar).

  One integer compare and one remainder.
  """
  since = jnp.asarray(count, jnp.int32) - jnp.int32(start)
  return (since >= 0) & (since % jnp.int32(k) == 0)


def every(k: int, start: int = 0) -> When:
  """SAM on steps start, start + k, start + 2k, ... of the state's count."""
  return When(lambda ctx: (scheduled(ctx.count, k, start), {}))


def coin(probability: str = 'p') -> When:
  """SAM with probability ``hyperparams[probability]``, drawn from the key.

  Each step splits the state's raw key, ``key, draw = split(key)``, takes
  a SAM step where ``uniform(draw) < p`` and stores ``key``.
  """

  def rule(ctx):
    key, draw = jax.random.split(ctx.state.key)
    return jax.random.uniform(draw) < ctx.hyperparams[probability], {
        'key': key}

  return When(rule)


def threshold(score: Callable[[variant_lib.Context],
                              tuple[jax.Array, dict[str, Any]]]) -> When:
  """SAM where ``score(ctx) >= 0``; ``score`` returns ``(value, fields)``."""

  def rule(ctx):
    value, fields = score(ctx)
    return value >= 0, fields

  return When(rule)


def sam_or(ctx: variant_lib.Context, sam_step: jax.Array,
           sam: Callable[[], tuple[jax.Array, PyTree]],
           other: Callable[[], PyTree]) -> tuple[jax.Array, PyTree]:
  """``sam()`` where ``sam_step``, else ``(previous perturbed loss, other())``.

  For a variant that computes ``sam_step`` itself; the same `jax.lax.cond`
  as `When.choose`. ``sam`` returns ``(loss, gradient)``; the gradients of
  both branches are float32.
  """
  when = When(lambda _: (sam_step, {}))
  _, _, out = when.choose(ctx, lambda: _float32(sam()), lambda: (
      ctx.state.perturbed_loss, wide_tree(other())))
  return out


def clean_gradient(ctx: variant_lib.Context) -> Callable[[], PyTree]:
  """The plain step as a thunk: g0."""
  return lambda: ctx.clean_grad
