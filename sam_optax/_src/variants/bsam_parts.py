"""bSAM's pieces: its state, bounds, noise and one group's step."""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.core
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.pipeline.variant import Group
from sam_optax._src.variants import complete

PyTree = Any
OWNER = 'bsam'

class BSAMState(NamedTuple):
  """State of `bsam`: the step count, the posterior's moments, the noise key.

  Attributes:
    count: number of updates so far (int32); schedules are evaluated on it.
    perturbed_loss: L(w + rho g / s) at the last update, float32.
    grad_norm: ||g||, the norm of the gradient at the noisy sample, float32.
    momentum: gm, the momentum of ``g_eps + delta w`` (float32, like params).
    precision: s, the posterior's precision per parameter (float32, like
      params; ``s_init`` before the first update).
    key: the raw PRNG key data (uint32) of the next noise sample.
    skipped_steps: the number of steps refused because a gradient, a loss
      or the update was not finite, or a traced hyperparameter was out of
      bounds (int32); such a step leaves every other field as it was (the
      key too: the next step draws the noise the refused one drew).
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  momentum: PyTree
  precision: PyTree
  key: jax.Array
  skipped_steps: jax.Array


def noise_like(key: jax.Array, params: PyTree) -> PyTree:
  """Standard normal noise like ``params`` (float32): leaf i uses
  ``jax.random.normal(jax.random.fold_in(key, i), shape)``."""
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      jax.random.normal(jax.random.fold_in(key, i), jnp.shape(p), jnp.float32)
      for i, p in enumerate(leaves)])


# Every hyperparameter's interval: a number is checked when bsam is built, a
# traced or scheduled value at every step (out of it, the step is skipped).
_BOUNDS = {
    'learning_rate': variant_lib.NONNEGATIVE,
    'rho': variant_lib.NONNEGATIVE,
    'num_data': variant_lib.POSITIVE,
    'beta1': variant_lib.BELOW_ONE,
    'beta2': variant_lib.BELOW_ONE,
    'prior_prec': variant_lib.NONNEGATIVE,
    'damping': variant_lib.NONNEGATIVE,
    's_init': variant_lib.POSITIVE,
}
SCHEDULABLE = ('learning_rate', 'rho')
# A float16 gradient that overflows is taken again on the loss times this
# (a power of two, a normal float16), then divided back in float32.
_LOSS_SCALE = 2.0 ** -14


def value_at(value, count):
  return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


def _is_static(value) -> bool:
  return not (callable(value) or isinstance(value, jax.core.Tracer))


def _check_static(name, value):
  """A number out of ``name``'s interval is an error; traced values pass."""
  bound = _BOUNDS[name]
  if name == 'num_data' and _is_static(value) and (
      isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not 0 < float(value) < float('inf')):
    raise ValueError(f'{OWNER}: num_data must be a number > 0 (the size of'
                     f' the training set), got {value!r}.')
  validation.check_number(OWNER, name, value,
                          allow_zero=not bound.low_open,
                          allow_schedule=name in SCHEDULABLE)
  if _is_static(value) and not bound.holds(float(value)):
    raise ValueError(f'{OWNER}: {name} must be < {bound.high} ({bound}),'
                     f' got {float(value):g}.')


def check_hyperparams(hyperparams):
  for name, value in hyperparams.items():
    _check_static(name, value)


def in_bounds(hyperparams) -> jax.Array:
  """Whether every value at this step (float32) lies in its interval."""
  return functools.reduce(jnp.logical_and, [
      _BOUNDS[name].holds(value) for name, value in hyperparams.items()])


def as_float32(value):
  """A number stays a Python float (the authors' constants); else float32."""
  return float(value) if _is_static(value) else jnp.asarray(
      value, jnp.float32)


def split_betas(betas):
  if not (isinstance(betas, Sequence) and len(betas) == 2):
    raise TypeError(f'{OWNER}: betas must be a pair (beta1, beta2), got'
                    f' {betas!r}.')
  return tuple(betas)


def has_float16(params) -> bool:
  return any(jnp.result_type(p) == jnp.float16
             for p in jax.tree.leaves(params))


def value_and_grad(scalar_loss, float16: bool):
  """``(w, kw) -> (L, grad)``; float16 params: a float32 gradient.

  With float16 parameters the gradient at the ascent's point can exceed
  float16's range while the loss is finite: then it is taken again on the
  loss times 2^-14 and divided back in float32 (one more pass, only then).
  """
  plain = jax.value_and_grad(scalar_loss)
  if not float16:
    return plain

  def widened(w, kw):
    loss, grad = plain(w, kw)

    def rescaled():
      _, small = jax.value_and_grad(
          lambda p: scalar_loss(p, kw) * _LOSS_SCALE)(w)
      return jax.tree.map(
          lambda g: g.astype(jnp.float32) / _LOSS_SCALE, small)

    wide = jax.tree.map(lambda g: g.astype(jnp.float32), grad)
    overflowed = jnp.isfinite(jnp.asarray(loss, jnp.float32)) & (
        ~tree_math.all_finite(wide))
    return loss, jax.lax.cond(overflowed, rescaled, lambda: wide)

  return widened


def group_step(params, precision, num_data, rho, group: Group, key):
  """One perturbation: its noise, g, the ascent and g_eps.

  ``group`` is the pipeline's (`groups.map_groups`): its ``grad_at`` takes
  the gradient on the group's examples (averaged over the sync group with
  ``PerDevice(sync=True)``); ``key`` is the group's own noise key. Returns
  ``((L(w + rho g / s), g_eps, sqrt(s g^2), ||g||), ())``: what the weights'
  and the precision's updates consume, averaged over the groups.
  """
  noise = noise_like(key, params)
  noisy = jax.tree.map(
      lambda w, n, s: (w + jnp.sqrt(1.0 / (num_data * s)) * n).astype(
          w.dtype), params, noise, precision)
  _, grad = group.grad_at(noisy)
  perturbed = jax.tree.map(lambda w, g, s: (w + rho * g / s).astype(w.dtype),
                           params, grad, precision)
  loss, grad_eps = group.grad_at(perturbed)
  scaled = jax.tree.map(
      lambda s, g: jnp.sqrt(s * jnp.square(g.astype(jnp.float32))),
      precision, grad)
  norm = jnp.asarray(tree_math.tree_norm(grad), jnp.float32)
  return (loss, grad_eps, scaled, norm), ()


def initial_state(params: PyTree, s_init: float, seed: int) -> BSAMState:
  """Count 0, zero diagnostics and momentum, precision ``s_init``, the key."""
  f32 = lambda value: jax.tree.map(
      lambda p: jnp.full(jnp.shape(p), value, jnp.float32), params)
  zero = jnp.zeros([], jnp.float32)
  return BSAMState(count=jnp.zeros([], jnp.int32), perturbed_loss=zero,
                   grad_norm=zero, momentum=f32(0.0), precision=f32(s_init),
                   key=jax.random.key_data(jax.random.key(seed)),
                   skipped_steps=complete.no_skipped_steps())


def posterior_step(state: BSAMState, grad_eps, scaled, params, beta1, beta2,
                   damp, delta):
  """The new momentum m and precision s (the paper's Algorithm 1):

  m = beta1 m + (1 - beta1) (g_eps + delta w),
  s = beta2 s + (1 - beta2) (sqrt(s) |g| + damping + delta).
  """
  momentum = jax.tree.map(
      lambda m, ge, w: beta1 * m + (1 - beta1) * (
          ge.astype(jnp.float32) + delta * w.astype(jnp.float32)),
      state.momentum, grad_eps, params)
  precision = jax.tree.map(
      lambda si, gs: beta2 * si + (1 - beta2) * (gs + damp + delta),
      state.precision, scaled)
  return momentum, precision
