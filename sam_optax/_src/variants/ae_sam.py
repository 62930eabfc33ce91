"""AE-SAM: SAM only where the squared gradient norm is large (Jiang et al.)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Unpack

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import cheap


class AESAMState(NamedTuple):
  """State of `ae_sam`: the common fields of `SAMState`, the norm statistics.

  Attributes:
    sam_step: whether the last update was a SAM step (bool).
    mean: mu, the EMA of ||g0||^2 (float32).
    variance: sigma^2, the EMA of (||g0||^2 - mu)^2 (float32).
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  sam_step: jax.Array
  mean: jax.Array
  variance: jax.Array


def threshold(count, total_steps: Optional[int], c_start: float,
              c_end: float) -> jax.Array:
  """c_t = c_start + (c_end - c_start) min(t / T, 1); c_start without T."""
  if total_steps is None:
    return jnp.asarray(c_start, jnp.float32)
  fraction = jnp.minimum(jnp.asarray(count, jnp.float32) / total_steps, 1.0)
  return jnp.asarray(c_start + (c_end - c_start) * fraction, jnp.float32)


def _statistics(ctx, delta):
  """(n, mu_t, sigma^2_t): n = ||g0||^2 (averaged over groups)."""
  n = ctx.decision
  first = ctx.count == 0
  mean = jnp.where(first, n, delta * ctx.state.mean + (1.0 - delta) * n)
  variance = jnp.where(first, 0.0, delta * ctx.state.variance
                       + (1.0 - delta) * (n - mean) ** 2)
  return n, mean, variance


def _combine(total_steps, c_start, c_end):
  """SAM where ||g0||^2 >= mu + c_t sigma, g0 elsewhere."""

  def combine(ctx: variant_lib.Context) -> variant_lib.Step:
    delta = ctx.hyperparams['delta']
    n, mean, variance = _statistics(ctx, delta)
    c = threshold(ctx.count, total_steps, c_start, c_end)
    positive = variance > 0  # sqrt with a finite derivative at 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)),
                    variance)
    sam_step = n - mean >= c * std
    loss, grad = cheap.sam_or(ctx, sam_step, ctx.perturbed,
                              cheap.clean_gradient(ctx))
    return variant_lib.Step(grad, loss, ctx.state._replace(
        sam_step=sam_step, mean=mean, variance=variance))

  return combine


def _squared_norm(ctx: variant_lib.Context) -> jax.Array:
  return tree_math.tree_sum_of_squares(ctx.clean_grad)


@transformation.transformation
def ae_sam(
    rho: ScalarOrSchedule = 0.05,
    delta: ScalarOrSchedule = 0.9,
    *,
    total_steps: Optional[int] = None,
    c_start: float = -1.0,
    c_end: float = 1.0,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""AE-SAM: a SAM step where the gradient norm is large for its history.

  With :math:`n_t = \|g_0\|^2`, AE-SAM keeps exponential moving averages of
  its mean and variance, from :math:`\mu_0 = n_0` and :math:`\sigma_0 = 0`,

  .. math::

    \mu_t = \delta\, \mu_{t-1} + (1 - \delta)\, n_t, \qquad
    \sigma_t^2 = \delta\, \sigma_{t-1}^2 + (1 - \delta)\, (n_t - \mu_t)^2,

  and takes a SAM step (hands on :math:`\nabla L(w + \rho\, g_0/\|g_0\|)`)
  when :math:`n_t \ge \mu_t + c_t \sigma_t`, a plain :math:`g_0` step with
  no second gradient otherwise. The threshold rises linearly,

  .. math::

    c_t = c_{start} + (c_{end} - c_{start}) \min(t/T, 1),

  so SAM steps are frequent early and rare late. Under a layout
  :math:`n_t` is the mean of the groups' :math:`\|g_0\|^2`.

  Args:
    loss_fn: as in `sam`.
    rho: radius of the ascent, a number >= 0 or a schedule.
    delta: decay of the moving averages, in [0, 1], a number or schedule.
    total_steps: T, a static int >= 1, or None: the threshold stays at
      ``c_start``.
    c_start: the threshold c at step 0 (a number, may be negative).
    c_end: the threshold c from step T on.

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an
    `AESAMState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.eye(3), 'y': jnp.zeros(3)}
    >>> tx = sam_optax.ae_sam(loss_fn, rho=0.1, total_steps=100)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> _, state = tx.update(grads, state, params, batch=batch)
    >>> print(bool(state.sam_step), round(float(state.mean), 4))
    True 0.5833

  References:
    Jiang et al., `An Adaptive Policy to Employ Sharpness-Aware
    Minimization <https://arxiv.org/abs/2304.14647>`_, ICLR 2023.
  """
  if total_steps is not None:
    total_steps = validation.check_static_int('ae_sam', 'total_steps',
                                              total_steps, minimum=1)
  for name, value in (('c_start', c_start), ('c_end', c_end)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        value != value):
      raise TypeError(f'ae_sam: {name} must be a number, got {value!r}.')
  zero = jnp.zeros([], jnp.float32)
  return variant_lib.Variant(
      hyperparams={'rho': rho, 'delta': delta},
      bounds={'delta': variant_lib.UNIT},
      state=AESAMState, decide=_squared_norm,
      combine=_combine(total_steps, float(c_start), float(c_end)),
      agree={'sam_step': 'same', 'mean': 'same', 'variance': 'same'},
      init=lambda params: dict(sam_step=jnp.asarray(False), mean=zero,
                               variance=zero))
