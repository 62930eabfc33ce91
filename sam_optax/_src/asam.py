"""ASAM: adaptive sharpness-aware minimization (Kwon et al., 2021)."""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import devices
from sam_optax._src import pipeline
from sam_optax._src import sam as sam_lib
from sam_optax._src import tree_math
from sam_optax._src import validation

PyTree = Any
# A pytree of bools like params, or `predicate(path, leaf) -> bool`.
AdaptiveMask = Union[PyTree, Callable[[tuple, jax.Array], bool]]


def resolve_mask(owner: str, mask: Optional[AdaptiveMask], params) -> PyTree:
  """A pytree of Python bools like params (True: the leaf is adaptive)."""
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  if callable(mask):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: bool(mask(path, leaf)), params
    )
  try:
    return jax.tree.map(lambda _, m: bool(m), params, mask)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f'{owner}: adaptive_mask must be a pytree of bools with the structure'
        ' of params, or a predicate `(path, leaf) -> bool`; got'
        f' {jax.tree.structure(mask)} for params {jax.tree.structure(params)}.'
    ) from error


def adaptive_scale(params, eta: jax.Array, mask: PyTree) -> PyTree:
  """T = |w| + eta on adaptive leaves, 1 on exempt leaves (float32)."""
  return jax.tree.map(
      lambda p, adaptive: (
          jnp.abs(tree_math.wide(p)) + eta
          if adaptive
          else jnp.ones(p.shape, jnp.float32)
      ),
      params,
      mask,
  )


def adaptive_direction(owner: str, adaptive_mask: Optional[AdaptiveMask]):
  """ASAM's ascent direction T^2 g / ||T g||."""

  def direction(grad, params, hyperparams):
    mask = resolve_mask(owner, adaptive_mask, params)
    t = adaptive_scale(params, hyperparams['eta'], mask)
    tg = jax.tree.map(lambda a, g: a * tree_math.wide(g), t, grad)
    inverse_norm = tree_math.safe_inverse(tree_math.tree_norm(tg))
    return jax.tree.map(lambda a, x: inverse_norm * a * x, t, tg)

  return direction


def asam(
    loss_fn: Callable[..., Any],
    rho: pipeline.ScalarOrSchedule = 0.5,
    eta: pipeline.ScalarOrSchedule = 0.01,
    *,
    adaptive_mask: Optional[AdaptiveMask] = None,
    ascent_steps: int = 1,
    has_aux: bool = False,
    axis_name: Optional[Hashable] = None,
    sync_perturbation: bool = False,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    chunk_size: Optional[int] = None,
    chunk_mode: devices.ChunkMode = 'sequential',
    shared_perturbation: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive SAM: a neighbourhood whose radius scales with each weight.

  ASAM measures the neighbourhood in the metric of the normalization operator
  :math:`T_w = \mathrm{diag}(|w| + \eta)`, so the ball
  :math:`\|T_w^{-1}\epsilon\|_2 \le \rho` is invariant to rescaling the
  weights. Its first-order worst point and the returned gradient are

  .. math::

    \epsilon = \rho \, \frac{T_w^2 \, g_0}{\|T_w \, g_0\|_2}, \qquad
    g = \nabla L(w + \epsilon).

  By default every parameter is adaptive (the paper's definition); the
  authors' code makes only parameters named ``weight`` adaptive, exempting
  biases, which ``adaptive_mask`` reproduces: exempt leaves use
  :math:`T = 1` (plain SAM scaling). ``ascent_steps=k`` takes k steps of length :math:`\rho/k`, each in
  the metric of the clean weights.

  Devices and m-sharpness (``axis_name``, ``sync_perturbation``,
  ``axis_index_groups``, ``chunk_size``, ``chunk_mode``,
  ``shared_perturbation``) work exactly as in `sam`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, x):
    ...   return jnp.sum((params['w'] * x + params['b']) ** 2)
    >>> params = {'w': jnp.array([1.0, -2.0]), 'b': jnp.zeros(2)}
    >>> only_weights = lambda path, leaf: leaf.ndim > 0 and path[0].key == 'w'
    >>> tx = optax.chain(
    ...     sam_optax.asam(loss_fn, rho=0.5, adaptive_mask=only_weights),
    ...     optax.sgd(0.01))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x=jnp.ones(2))
    >>> updates, state = tx.update(grads, state, params, x=jnp.ones(2))
    >>> print(updates['w'])
    [-0.0242893  0.0614034]

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar, or
      ``(loss, aux)`` with ``has_aux=True``.
    rho: radius in the adaptive metric, a number >= 0 or a schedule.
    eta: offset that keeps the metric positive for zero weights, >= 0, a
      number or a schedule.
    adaptive_mask: which parameters are adaptive: ``None`` (all), a pytree of
      bools like params, or a predicate ``(path, leaf) -> bool``.
    ascent_steps: number of ascent steps (k >= 1).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SAMState`.

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  validation.check_hyperparameter('asam', 'rho', rho)
  validation.check_hyperparameter('asam', 'eta', eta)
  if adaptive_mask is not None and not callable(adaptive_mask):
    jax.tree.map(lambda m: bool(m), adaptive_mask)  # must be bools
  return pipeline.sharpness_aware(
      loss_fn,
      owner='asam',
      hyperparams={'rho': rho, 'eta': eta},
      direction=adaptive_direction('asam', adaptive_mask),
      state_type=sam_lib.SAMState,
      ascent_steps=ascent_steps,
      has_aux=has_aux,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      axis_index_groups=axis_index_groups,
      chunk_size=chunk_size,
      chunk_mode=chunk_mode,
      shared_perturbation=shared_perturbation,
  )
