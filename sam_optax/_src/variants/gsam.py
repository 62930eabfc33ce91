"""GSAM: surrogate gap guided SAM (Zhuang et al., 2022)."""

from __future__ import annotations

from typing import Unpack

import jax

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import sam as sam_lib


def residual(a, b):
  """(a minus its projection on b, in float32): a - <a, b_hat> b_hat.

  ``b_hat = b / ||b||``, zero for a zero ``b`` (then the residual is ``a``).
  """
  a = jax.tree.map(tree_math.wide, a)
  b = jax.tree.map(tree_math.wide, b)
  unit = tree_math.tree_scale(tree_math.safe_inverse(tree_math.tree_norm(b)),
                              b)
  return tree_math.tree_add_scaled(a, -tree_math.tree_vdot(a, unit), unit)


def _combine(minimize_fp: bool):
  """GSAM's combine: g1 - alpha g0_perp (or g0 + alpha g1_perp)."""

  def combine(ctx: variant_lib.Context) -> variant_lib.Step:
    # The decomposition is not linear in g1, so it needs the group's own g1
    # (under PerDevice(sync=True) the pipeline averages it over the group).
    loss, perturbed = ctx.perturbed()
    alpha = ctx.hyperparams['alpha']
    clean = jax.tree.map(tree_math.wide, ctx.clean_grad)
    perturbed = jax.tree.map(tree_math.wide, perturbed)
    if minimize_fp:
      out = tree_math.tree_add_scaled(perturbed, -alpha,
                                      residual(clean, perturbed))
    else:
      out = tree_math.tree_add_scaled(clean, alpha,
                                      residual(perturbed, clean))
    return variant_lib.Step(out, loss, ctx.state)

  return combine


@transformation.transformation
def gsam(
    rho: ScalarOrSchedule = 0.05,
    alpha: ScalarOrSchedule = 0.4,
    *,
    minimize_fp: bool = True,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""GSAM: SAM's gradient, minus the clean gradient's part across it.

  GSAM minimizes the perturbed loss :math:`f_p(w) = L(w + \epsilon)` and the
  surrogate gap :math:`h(w) = f_p(w) - L(w)` together. With SAM's ascent
  :math:`\epsilon = \rho\, g_0/\|g_0\|` and :math:`g_1 = \nabla L(w +
  \epsilon)`, it descends along :math:`g_1` and ascends the clean loss
  across it, which lowers the gap without changing :math:`f_p` to first
  order:

  .. math::

    \hat g_1 = \frac{g_1}{\|g_1\|}, \qquad
    g_0^\perp = g_0 - \langle g_0, \hat g_1\rangle\, \hat g_1, \qquad
    g = g_1 - \alpha\, g_0^\perp.

  With ``minimize_fp=False`` the roles swap:
  :math:`g = g_0 + \alpha\,(g_1 - \langle g_1, \hat g_0\rangle \hat g_0)`.
  A zero vector has a zero unit vector (:math:`g_0^\perp = g_0` for a zero
  :math:`g_1`); ``alpha=0`` is SAM.

  Args:
    loss_fn: as in `sam`.
    rho: radius of the ascent, a number >= 0 or a schedule (the paper ties
      it to the learning rate: `sam_optax.rho_proportional_to_lr`).
    alpha: weight of the gap term, a number >= 0 or a schedule (the paper's
      values lie in [0, 1]).
    minimize_fp: True (the paper): minimize the perturbed loss and the gap;
      False: minimize the clean loss and the gap.

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam` (with a mask, g0 and g1 are still whole
  gradients).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SAMState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]),
    ...          'y': jnp.array([1.0, -1.0])}
    >>> tx = optax.chain(sam_optax.gsam(loss_fn, rho=0.1, alpha=0.4),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> updates, state = tx.update(grads, state, params, batch=batch)
    >>> print(updates['w'])
    [ 0.1019...  0.0515... -0.4569...]

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022 (authors'
    code: google-research/big_vision, ``trainers/proj/gsam``).
  """
  validation.check_bool('gsam', 'minimize_fp', minimize_fp)
  return variant_lib.Variant(
      hyperparams={'rho': rho, 'alpha': alpha},
      state=sam_lib.SAMState, combine=_combine(minimize_fp))
