"""SAM: sharpness-aware minimization (Foret et al., 2021)."""

from __future__ import annotations

from typing import Any, Callable, Hashable, NamedTuple, Optional, Sequence

import jax
import optax

from sam_optax._src import devices
from sam_optax._src import pipeline
from sam_optax._src import tree_math
from sam_optax._src import validation


class SAMState(NamedTuple):
  """State of `sam` and `asam`: the step count and diagnostics to log.

  Attributes:
    count: number of updates so far (int32); schedules are evaluated on it.
    perturbed_loss: L(w + eps) at the last update, float32.
    grad_norm: ||g0||, the norm of the last incoming (clean) gradient.
    cosine: cos(g0, g) between the clean gradient and the gradient handed on.
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array


def normalized_direction(grad, params, hyperparams):
  """SAM's ascent direction g / ||g|| (zero for a zero gradient)."""
  del params, hyperparams
  return tree_math.tree_scale(
      tree_math.safe_inverse(tree_math.tree_norm(grad)),
      jax.tree.map(tree_math.wide, grad),
  )


def sam(
    loss_fn: Callable[..., Any],
    rho: pipeline.ScalarOrSchedule = 0.05,
    *,
    ascent_steps: int = 1,
    has_aux: bool = False,
    axis_name: Optional[Hashable] = None,
    sync_perturbation: bool = False,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    chunk_size: Optional[int] = None,
    chunk_mode: devices.ChunkMode = 'sequential',
    shared_perturbation: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-aware minimization: the gradient at the worst nearby point.

  Given the clean minibatch gradient :math:`g_0 = \nabla L(w)` as the incoming
  updates, SAM climbs to the (first-order) worst point of the L2 ball of
  radius :math:`\rho` and returns the gradient found there:

  .. math::

    \epsilon = \rho \, \frac{g_0}{\|g_0\|_2}, \qquad
    g = \nabla L(w + \epsilon).

  With ``ascent_steps=k`` the climb is k normalized steps of length
  :math:`\rho / k`, re-evaluating the gradient at each point:
  :math:`w_{i+1} = w_i + (\rho/k)\, g_i / \|g_i\|`, and
  :math:`g = \nabla L(w_k)`.

  Chain it in front of any optax optimizer, which then sees the clean weights
  as ``params`` (weight decay acts on :math:`w`, not :math:`w + \epsilon`).
  Every keyword argument given to ``update`` is forwarded to ``loss_fn``. Norms
  are taken in float32; a zero gradient gives a zero perturbation; ``rho=0`` is
  exactly the base optimizer.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.ones(3)}
    >>> batch = {'x': jnp.eye(3), 'y': jnp.zeros(3)}
    >>> tx = optax.chain(sam_optax.sam(loss_fn, rho=0.05), optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    >>> params = optax.apply_updates(params, updates)
    >>> print(params['w'])
    [0.9314088 0.9314088 0.9314088]

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True`` (aux of the perturbed pass, e.g.
      BatchNorm statistics, is dropped).
    rho: radius of the neighbourhood (total ascent length), a number >= 0 or
      an optax schedule evaluated on this transformation's step count.
    ascent_steps: number of normalized ascent steps (k >= 1).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    axis_name: inside `jax.pmap` / `jax.shard_map`, the device axis: each
      device perturbs with its own gradient and the result is averaged over
      the axis (one all-reduce per step, like data-parallel SGD). Inside
      `jax.shard_map`, take the incoming gradient at
      ``jax.lax.pcast(params, axis_name, to='varying')`` (the device's own).
    sync_perturbation: with ``axis_name``, perturb with the axis-averaged
      gradient instead (SAM on the global batch, one more all-reduce).
    axis_index_groups: with ``sync_perturbation`` (pmap only), average inside
      these groups of devices, e.g. ``[[0, 1], [2, 3]]``.
    chunk_size: m-sharpness inside the step: split the batch (every array of
      the loss keyword arguments with a leading batch dimension) into chunks
      of m examples, each with its own perturbation (and its own clean
      gradient: one extra pass over the batch); the results are averaged.
    chunk_mode: ``'sequential'`` (`jax.lax.scan`, memory of one chunk),
      ``'vectorized'`` (`jax.vmap`) or `sam_optax.mesh_chunks` (vectorized,
      chunks laid over a mesh axis under `jax.jit`).
    shared_perturbation: with ``chunk_size``, one perturbation for the whole
      batch with gradients accumulated over the chunks -- SAM on batches that
      do not fit in memory; ``updates`` must then be the full-batch gradient
      (e.g. from `sam_optax.chunked_value_and_grad`).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SAMState`.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  validation.check_hyperparameter('sam', 'rho', rho)
  return pipeline.sharpness_aware(
      loss_fn,
      owner='sam',
      hyperparams={'rho': rho},
      direction=normalized_direction,
      state_type=SAMState,
      ascent_steps=ascent_steps,
      has_aux=has_aux,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      axis_index_groups=axis_index_groups,
      chunk_size=chunk_size,
      chunk_mode=chunk_mode,
      shared_perturbation=shared_perturbation,
  )
