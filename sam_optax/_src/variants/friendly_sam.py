"""Friendly SAM: the ascent without the full gradient's mean (Li et al., 2024)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import bounds

PyTree = Any


class FriendlySAMState(NamedTuple):
  """State of `friendly_sam`: the step count, diagnostics and the momentum.

  Attributes:
    count: number of updates so far (int32).
    perturbed_loss: L(w + eps) at the last update, float32.
    grad_norm: ||g0||, the norm of the last clean gradient, float32.
    cosine: cos(g0, g) between the clean gradient and the gradient handed
      on; 0 unless built with ``track_cosine=True``.
    momentum: m, the exponential moving average of the clean gradients, , a
      float32 tree like ``params`` (zeros before the first update). Under a layout it is the mean over the perturbation
      groups, like the handed-on gradient.
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  momentum: PyTree


def _combine(ctx: variant_lib.Context) -> variant_lib.Step:
  """d = g0 - sigma m (g0 on the first step); m <- lmbda m + (1-lmbda) g0."""
  sigma, lmbda = ctx.hyperparams['sigma'], ctx.hyperparams['lmbda']
  first = ctx.count == 0
  clean = jax.tree.map(tree_math.wide, ctx.clean_grad)
  previous = ctx.state.momentum
  direction = jax.tree.map(lambda g, m: jnp.where(first, g, g - sigma * m),
                           clean, previous)
  momentum = jax.tree.map(
      lambda g, m: jnp.where(first, g, lmbda * m + (1.0 - lmbda) * g),
      clean, previous)
  # A bad traced sigma or lmbda must show on the first step too, where the
  # select above leaves them out.
  direction = bounds.nan_unless((lmbda <= 1.0) & (sigma == sigma), direction)
  loss, grad = ctx.perturbed(direction)
  return variant_lib.Step(grad, loss, ctx.state._replace(momentum=momentum))


@transformation.transformation
def friendly_sam(
    loss_fn: Callable[..., Any],
    rho: variant_lib.ScalarOrSchedule = 0.05,
    sigma: variant_lib.ScalarOrSchedule = 1.0,
    lmbda: variant_lib.ScalarOrSchedule = 0.9,
) -> variant_lib.Variant:
  r"""Friendly SAM: ascend along the gradient minus its running mean.

  F-SAM's observation is that the full-batch part of the minibatch gradient
  contributes little to SAM's generalization and can even hurt it, so the
  ascent removes an estimate of it, a momentum of the clean gradients:

  .. math::

    d_t = g_{0,t} - \sigma\, m_{t-1}, \qquad
    m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_{0,t}, \qquad
    \epsilon = \rho\, \frac{d_t}{\|d_t\|}, \qquad
    g = \nabla L(w + \epsilon),

  and on the first step :math:`m_0 = g_{0,0}` and :math:`d = g_{0,0}`
  (plain SAM). The momentum averages the *raw* clean gradient (not
  :math:`d`).

  **As the authors' code** (nblt/F-SAM, ``FriendlySAM`` in ``utils.py``) and
  pytorch-optimizer 4.x's ``FriendlySAM``: first step, order of the updates
  and ``sigma=1, lmbda=0.9`` as defaults. Both divide by ``||d|| + 1e-12``;
  here the division is exact and zero-safe. (An earlier pytorch-optimizer
  release averaged the corrected direction :math:`d` into the momentum
  instead of the raw gradient; 4.x follows the authors, and so do we.) With ``ascent_steps=k`` the
  first of the k steps follows :math:`d`, the later ones the gradient at the
  point reached (the paper has k = 1).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]),
    ...          'y': jnp.array([1.0, -1.0])}
    >>> tx = optax.chain(sam_optax.friendly_sam(loss_fn, rho=0.1),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   grads = jax.grad(loss_fn)(params, batch=batch)
    ...   updates, state = tx.update(grads, state, params, batch=batch)
    ...   params = optax.apply_updates(params, updates)
    >>> print(params['w'])
    [ 1.1871... -0.2406... -0.0946...]
    >>> print(state[0].momentum['w'].shape)  # a float32 tree like params
    (3,)

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    rho: radius of the ascent, a number >= 0 or a schedule.
    sigma: how much of the momentum is removed from the ascent direction, a
      number >= 0 or a schedule (``sigma=0`` is SAM).
    lmbda: the momentum's decay, in [0, 1], a number or a schedule.

  ``ascent_steps``, ``has_aux``, ``perturbation_mask`` and ``layout`` work
  as in `sam` (a mask applies to :math:`d`: the norm is over the selected
  leaves; the momentum keeps every leaf).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `FriendlySAMState`.

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.
  """
  del loss_fn  # the pipeline takes it
  bounds.check_below('friendly_sam', 'lmbda', lmbda, 1.0, inclusive=True)
  return variant_lib.Variant(
      name='friendly_sam',
      hyperparams={'rho': rho, 'sigma': sigma, 'lmbda': lmbda},
      state=FriendlySAMState, combine=_combine, agree={'momentum': 'mean'},
      init=lambda params: FriendlySAMState(
          **variant_lib.initial_diagnostics(),
          momentum=tree_math.float32_zeros_like(params)))
