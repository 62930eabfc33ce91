"""Auto-PGD: projected ascent with momentum and step-size halving on a ball.

The engine of `worst_case_sharpness`, independent of losses and models:
`ascend` maximizes any ``value_and_grad`` over an L2 or L-infinity `Ball`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src.core import tree_math

PyTree = Any

def apgd_checkpoints(num_steps: int) -> np.ndarray:
  """Auto-PGD's checkpoints w_j = ceil(p_j N) as a boolean mask over steps.

  p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
  (Croce & Hein 2020, section 3.2).
  """
  points = [0.0, 0.22]
  while points[-1] < 1.0:
    points.append(points[-1] + max(points[-1] - points[-2] - 0.03, 0.06))
  mask = np.zeros(num_steps + 1, dtype=bool)
  for p in points[1:]:
    step = int(math.ceil(p * num_steps - 1e-9))
    if 1 <= step <= num_steps:
      mask[step] = True
  return mask


class Ball(NamedTuple):
  """The L2 or L-infinity ball of radius rho in which gamma lives."""

  kind: str
  rho: jax.Array

  def norm(self, gamma: PyTree) -> jax.Array:
    if self.kind == 'l2':
      return tree_math.tree_norm(gamma)
    leaves = [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(gamma) if x.size]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros([], jnp.float32)

  def ascent(self, grad: PyTree) -> PyTree:
    """The steepest-ascent direction of the ball's norm (unit, or a sign)."""
    if self.kind == 'l2':
      return tree_math.tree_scale(
          tree_math.safe_inverse(tree_math.tree_norm(grad)), grad)
    return jax.tree.map(jnp.sign, grad)

  def project(self, gamma: PyTree) -> PyTree:
    if self.kind == 'l2':
      norm = tree_math.tree_norm(gamma)
      factor = jnp.minimum(1.0, self.rho * tree_math.safe_inverse(norm))
      # gamma = 0 stays exactly 0 (and a NaN gamma stays NaN).
      factor = jnp.where(norm == 0, 1.0, factor)
      return tree_math.tree_scale(factor, gamma)
    return jax.tree.map(lambda x: jnp.clip(x, -self.rho, self.rho), gamma)


def random_start(norm: str, rho: jax.Array, zeros: PyTree,
                  key: jax.Array) -> PyTree:
  """Uniform in the L-infinity cube, or uniform on the L2 sphere."""
  leaves, treedef = jax.tree.flatten(zeros)
  keys = jax.random.split(key, max(len(leaves), 1))
  if norm == 'linf':
    noise = [jax.random.uniform(k, x.shape, jnp.float32, -1.0, 1.0)
             for k, x in zip(keys, leaves)]
    return jax.tree.map(lambda x: rho * x, jax.tree.unflatten(treedef, noise))
  noise = jax.tree.unflatten(
      treedef, [jax.random.normal(k, x.shape, jnp.float32)
                for k, x in zip(keys, leaves)])
  return tree_math.tree_scale(
      rho * tree_math.safe_inverse(tree_math.tree_norm(noise)), noise)


class _ApgdCarry(NamedTuple):
  x_prev: PyTree
  x: PyTree
  f: jax.Array
  g: PyTree
  step: jax.Array
  best_x: PyTree
  best_f: jax.Array
  best_g: PyTree
  successes: jax.Array
  last_checkpoint: jax.Array
  step_at_checkpoint: jax.Array
  best_f_at_checkpoint: jax.Array
  nan_seen: jax.Array


def ascend(value_and_grad, start, ball: Ball, step, alpha, num_steps):
  """Auto-PGD from ``start``: (best point, its loss, whether a loss was NaN).

  ``best_f > f`` comparisons are False for NaN, so a NaN loss would never be
  the best one and the ascent would report a plausible maximum of the
  finite points; ``nan_seen`` records every NaN loss instead.
  """
  f0, g0 = value_and_grad(start)
  x1 = ball.project(_add(start, step, ball.ascent(g0)))
  f1, g1 = value_and_grad(x1)
  first_better = f1 > f0
  best_f = jnp.where(first_better, f1, f0)
  carry = _ApgdCarry(
      x_prev=start, x=x1, f=f1, g=g1, step=step,
      best_x=tree_math.tree_select(first_better, x1, start), best_f=best_f,
      best_g=tree_math.tree_select(first_better, g1, g0),
      successes=jnp.zeros([], jnp.int32),
      last_checkpoint=jnp.zeros([], jnp.int32),
      step_at_checkpoint=step, best_f_at_checkpoint=best_f,
      nan_seen=jnp.isnan(f0) | jnp.isnan(f1),
  )
  body = functools.partial(
      _apgd_step, value_and_grad=value_and_grad, ball=ball, alpha=alpha,
      checkpoints=jnp.asarray(apgd_checkpoints(num_steps)))
  carry = jax.lax.fori_loop(1, num_steps, body, carry)
  return carry.best_x, carry.best_f, carry.nan_seen


def _add(a: PyTree, s: jax.Array, b: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: x + s * y, a, b)


def _apgd_step(k, c: _ApgdCarry, *, value_and_grad, ball: Ball, alpha,
               checkpoints) -> _ApgdCarry:
  """One Auto-PGD step with momentum, and the checkpoint's step-size rule."""
  z = ball.project(_add(c.x, c.step, ball.ascent(c.g)))
  moved = jax.tree.map(
      lambda x, zz, xp: x + alpha * (zz - x) + (1.0 - alpha) * (x - xp),
      c.x, z, c.x_prev)
  x_new = ball.project(moved)
  f_new, g_new = value_and_grad(x_new)
  successes = c.successes + (f_new > c.f).astype(jnp.int32)
  improved = f_new > c.best_f
  best_x = tree_math.tree_select(improved, x_new, c.best_x)
  best_f = jnp.where(improved, f_new, c.best_f)
  best_g = tree_math.tree_select(improved, g_new, c.best_g)
  at_checkpoint = checkpoints[k]
  span = (k - c.last_checkpoint).astype(jnp.float32)
  too_few = successes.astype(jnp.float32) < 0.75 * span
  stalled = (c.step == c.step_at_checkpoint) & (
      best_f == c.best_f_at_checkpoint)
  reduce = at_checkpoint & (too_few | stalled)
  return _ApgdCarry(
      x_prev=tree_math.tree_select(reduce, best_x, c.x),
      x=tree_math.tree_select(reduce, best_x, x_new),
      f=jnp.where(reduce, best_f, f_new),
      g=tree_math.tree_select(reduce, best_g, g_new),
      step=jnp.where(reduce, 0.5 * c.step, c.step),
      best_x=best_x, best_f=best_f, best_g=best_g,
      successes=jnp.where(at_checkpoint, 0, successes),
      last_checkpoint=jnp.where(at_checkpoint, k, c.last_checkpoint),
      step_at_checkpoint=jnp.where(at_checkpoint, c.step,
                                   c.step_at_checkpoint),
      best_f_at_checkpoint=jnp.where(at_checkpoint, best_f,
                                     c.best_f_at_checkpoint),
      nan_seen=c.nan_seen | jnp.isnan(f_new),
  )
