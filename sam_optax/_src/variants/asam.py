"""ASAM: adaptive sharpness-aware minimization (Kwon et al., 2021)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from sam_optax._src.core import directions
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import sam as sam_lib


@transformation.transformation
def asam(
    loss_fn: Callable[..., Any],
    rho: variant_lib.ScalarOrSchedule = 0.5,
    eta: variant_lib.ScalarOrSchedule = 0.01,
    *,
    adaptive_mask: Optional[directions.LeafMask] = None,
) -> variant_lib.Variant:
  r"""Adaptive SAM: a neighbourhood whose radius scales with each weight.

  ASAM measures the neighbourhood in the metric of the normalization operator
  :math:`T_w = \mathrm{diag}(|w| + \eta)`, so the ball
  :math:`\|T_w^{-1}\epsilon\|_2 \le \rho` is invariant to rescaling the
  weights. Its first-order worst point and the returned gradient are

  .. math::

    \epsilon = \rho \, \frac{T_w^2 \, g_0}{\|T_w \, g_0\|_2}, \qquad
    g = \nabla L(w + \epsilon).

  **The default differs from the authors' code.** By default every
  parameter is adaptive (the paper's definition). The authors' code makes
  only parameters whose name contains ``weight`` adaptive, so biases use
  :math:`T = 1` (plain SAM scaling); in Flax, where weights are ``kernel``
  or ``scale``, their choice is one line:
  ``adaptive_mask=lambda path, leaf: path[-1].key != 'bias'``.
  ``ascent_steps=k`` takes k steps of length :math:`\rho/k`, each in the
  metric of the clean weights. A traced ``eta`` below 0 (or NaN) makes the
  update NaN.

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
      bools like params, a function ``params -> pytree of bools`` (as
      `optax.masked` takes), or a predicate ``(path, leaf) -> bool``.

  ``ascent_steps``, ``has_aux``, ``perturbation_mask`` and ``layout`` work
  as in `sam`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SAMState`.

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  del loss_fn  # the pipeline takes it
  directions.check_mask('asam', 'adaptive_mask', adaptive_mask)

  def direction(grad, params, hyperparams):
    mask = directions.resolve_mask('asam', 'adaptive_mask', adaptive_mask,
                                   params)
    scale = directions.adaptive_scale(params, hyperparams['eta'], mask)
    return directions.adaptive_direction(grad, scale)

  return variant_lib.Variant(
      name='asam', hyperparams={'rho': rho, 'eta': eta},
      state=sam_lib.SAMState, direction=direction,
      init=lambda params: sam_lib.SAMState(
          **variant_lib.initial_diagnostics()))
