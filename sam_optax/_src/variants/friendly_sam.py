"""Friendly SAM: the ascent without the gradient's running mean (Li et al.)."""

from __future__ import annotations

from typing import Any, NamedTuple, Unpack

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib

PyTree = Any


class FriendlySAMState(NamedTuple):
  """State of `friendly_sam`: the common fields of `SAMState`, the momentum.

  Attributes:
    momentum: m, the exponential moving average of the clean gradients, a
      float32 tree like ``params`` (zeros before the first update); under
      a layout, the mean over the perturbation groups.
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
  loss, grad = ctx.perturbed(direction)
  return variant_lib.Step(grad, loss, ctx.state._replace(momentum=momentum))


@transformation.transformation
def friendly_sam(
    rho: ScalarOrSchedule = 0.05,
    sigma: ScalarOrSchedule = 1.0,
    lmbda: ScalarOrSchedule = 0.9,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""Friendly SAM: ascend along the gradient minus its running mean.

  F-SAM removes from the ascent an estimate of the full-batch gradient,
  which contributes little to SAM's generalization: a momentum of the
  clean gradients,

  .. math::

    d_t = g_{0,t} - \sigma\, m_{t-1}, \qquad
    m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_{0,t}, \qquad
    \epsilon = \rho\, \frac{d_t}{\|d_t\|}, \qquad
    g = \nabla L(w + \epsilon),

  with :math:`m_0 = g_{0,0}` and :math:`d = g_{0,0}` on the first step
  (plain SAM).

  Args:
    loss_fn: as in `sam`.
    rho: radius of the ascent, a number >= 0 or a schedule.
    sigma: how much of the momentum is removed from the ascent direction, a
      number >= 0 or a schedule (``sigma=0`` is SAM).
    lmbda: the momentum's decay, in [0, 1], a number or a schedule.

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam`; the first of k ascent steps follows
  :math:`d`, a mask applies to :math:`d` and the momentum keeps every leaf.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `FriendlySAMState`.

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

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024 (authors' code:
    nblt/F-SAM).
  """
  return variant_lib.Variant(
      hyperparams={'rho': rho, 'sigma': sigma, 'lmbda': lmbda},
      bounds={'lmbda': variant_lib.UNIT},
      state=FriendlySAMState, combine=_combine, agree={'momentum': 'mean'},
      init=lambda params: dict(
          momentum=tree_math.float32_zeros_like(params)))
