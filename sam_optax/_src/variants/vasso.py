"""VaSSO: variance-suppressed sharpness-aware optimization (Li & Giannakis)."""

from __future__ import annotations

from typing import Any, NamedTuple, Unpack

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib

PyTree = Any


class VaSSOState(NamedTuple):
  """State of `vasso`: the common fields of `SAMState`, the averaged direction.

  Attributes:
    direction: d, the moving average of the clean gradients that the ascent
      follows, a float32 tree like ``params`` (zeros before the first
      update); under a layout, the mean over the perturbation groups.
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  direction: PyTree


def _combine(ctx: variant_lib.Context) -> variant_lib.Step:
  """d = (1 - theta) d + theta g0 (g0 on the first step); ascent along d."""
  theta = ctx.hyperparams['theta']
  clean = jax.tree.map(tree_math.wide, ctx.clean_grad)
  direction = jax.tree.map(
      lambda g, d: jnp.where(ctx.count == 0, g, (1.0 - theta) * d + theta * g),
      clean, ctx.state.direction)
  loss, grad = ctx.perturbed(direction)
  return variant_lib.Step(grad, loss, ctx.state._replace(direction=direction))


@transformation.transformation
def vasso(
    rho: ScalarOrSchedule = 0.05,
    theta: ScalarOrSchedule = 0.9,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""VaSSO: ascend along a moving average of the gradients, not the last one.

  SAM's ascent follows one minibatch gradient, whose noise makes the
  adversary "friendly"; VaSSO suppresses that variance by averaging:

  .. math::

    d_t = (1 - \theta)\, d_{t-1} + \theta\, g_{0,t}, \qquad
    \epsilon = \rho\, \frac{d_t}{\|d_t\|}, \qquad
    g = \nabla L(w + \epsilon),

  with :math:`d_0 = g_{0,0}` on the first step (plain SAM).

  Args:
    loss_fn: as in `sam`.
    rho: radius of the ascent, a number >= 0 or a schedule.
    theta: the weight of the new gradient in the average, in [0, 1], a
      number or a schedule (``theta=1`` is SAM, a small theta a long
      average).

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam`; the first of k ascent steps follows
  :math:`d`, a mask applies to the ascent and the average keeps every leaf.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `VaSSOState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]),
    ...          'y': jnp.array([1.0, -1.0])}
    >>> tx = optax.chain(sam_optax.vasso(loss_fn, rho=0.1, theta=0.4),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   grads = jax.grad(loss_fn)(params, batch=batch)
    ...   updates, state = tx.update(grads, state, params, batch=batch)
    ...   params = optax.apply_updates(params, updates)
    >>> print(params['w'])
    [ 1.1953... -0.2766... -0.2517...]

  References:
    Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023 (authors'
    code: BingcongLi/VaSSO).
  """
  return variant_lib.Variant(
      hyperparams={'rho': rho, 'theta': theta},
      bounds={'theta': variant_lib.UNIT},
      state=VaSSOState, combine=_combine, agree={'direction': 'mean'},
      init=lambda params: dict(
          direction=tree_math.float32_zeros_like(params)))
