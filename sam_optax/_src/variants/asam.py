"""ASAM: adaptive sharpness-aware minimization (Kwon et al., 2021)."""

from __future__ import annotations

from typing import Optional, Unpack

from sam_optax._src.core import directions
from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import sam as sam_lib


@transformation.transformation
def asam(
    rho: ScalarOrSchedule = 0.5,
    eta: ScalarOrSchedule = 0.01,
    *,
    adaptive_mask: Optional[directions.LeafMask] = None,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""Adaptive SAM: a neighbourhood whose radius scales with each weight.

  ASAM measures the neighbourhood in the metric of
  :math:`T_w = \mathrm{diag}(|w| + \eta)`, so the ball
  :math:`\|T_w^{-1}\epsilon\|_2 \le \rho` is invariant to rescaling the
  weights. Its first-order worst point and the gradient handed on are

  .. math::

    \epsilon = \rho \, \frac{T_w^2 \, g_0}{\|T_w \, g_0\|_2}, \qquad
    g = \nabla L(w + \epsilon),

  with :math:`T = 1` on the leaves outside ``adaptive_mask``. With
  ``ascent_steps=k`` each of the k steps has length :math:`\rho/k` in the
  metric of the clean weights.

  Args:
    loss_fn: as in `sam`.
    rho: radius in the adaptive metric, a number >= 0 or a schedule.
    eta: offset that keeps the metric positive for zero weights, a
      number >= 0 or a schedule.
    adaptive_mask: which parameters are adaptive: None (all, the paper's
      definition), a pytree of bools like params, a function
      ``params -> bools`` or a predicate ``(path, leaf) -> bool``.

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SAMState`.

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

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021 (authors' code:
    SamsungLabs/ASAM).
  """
  directions.check_mask('asam', 'adaptive_mask', adaptive_mask)

  def direction(grad, params, hyperparams):
    mask = directions.resolve_mask('asam', 'adaptive_mask', adaptive_mask,
                                   params)
    scale = directions.adaptive_scale(params, hyperparams['eta'], mask)
    return directions.adaptive_direction(grad, scale)

  return variant_lib.Variant(
      hyperparams={'rho': rho, 'eta': eta},
      state=sam_lib.SAMState, direction=direction)
