"""XSAM: explicit sharpness-aware minimization (Chen & Zhou, 2026)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Unpack

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib

# Below this sin(theta) the plane is degenerate (v0, v1 (anti)parallel or
# zero) and the slerp is replaced by its theta -> 0 limit.
_SIN_THETA_FLOOR = 1e-8


class XSAMState(NamedTuple):
  """State of `xsam`: the common fields of `SAMState`, alpha and the probe.

  Attributes:
    alpha: the interpolation fraction the probe chose (or the given
      ``alpha`` without a probe), float32; kept between probes, and not
      lowered by a ``max_angle`` cap of one step.
    probe_losses: the losses along the alpha grid at the last probe
      (float32, one per grid point; zeros until the first probe). A probe
      whose losses are all NaN keeps the previous alpha, and its losses
      here say so.
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  alpha: jax.Array
  probe_losses: jax.Array


def alpha_grid(alpha_max: float, alpha_step: float) -> np.ndarray:
  """The probe's candidates ``0, alpha_step, 2 alpha_step, ... <= alpha_max``.

  The grid is static (its length is a shape in the state). A point within
  1e-6 relative of ``alpha_max`` counts as on the grid, so ``(2.0, 0.1)``
  gives the 21 points 0, 0.1, ..., 2.0.
  """
  count = int(np.floor(alpha_max / alpha_step * (1 + 1e-6))) + 1
  return (np.arange(count, dtype=np.float64) * alpha_step).astype(np.float32)


def _every(period: int) -> Callable[[Any], jax.Array]:
  """``state -> bool``: whether the state's step count is a multiple."""
  return lambda state: state.count % period == 0


def _check_static_positive(owner: str, name: str, value: Any,
                           why: str) -> float:
  """A static number > 0 (not a schedule, not traced: ``why`` says why)."""
  if isinstance(value, jax.core.Tracer) or callable(value):
    raise TypeError(
        f'{owner}: {name} must be a static Python number ({why}), got'
        f' {value!r}.'
    )
  validation.check_number(owner, name, value, allow_zero=False)
  return float(value)


def _checked_grid(owner: str, alpha_max: Any, alpha_step: Any) -> np.ndarray:
  """The probe's alpha grid from static, validated bounds."""
  grid_shape = 'it fixes the size of the alpha grid, a shape in the state'
  alpha_max = _check_static_positive(owner, 'alpha_max', alpha_max, grid_shape)
  alpha_step = _check_static_positive(owner, 'alpha_step', alpha_step,
                                      grid_shape)
  if alpha_step > alpha_max:
    raise ValueError(
        f'{owner}: alpha_step ({alpha_step}) must not exceed alpha_max'
        f' ({alpha_max}); the probe grid is 0, alpha_step, ..., alpha_max.'
    )
  grid = alpha_grid(alpha_max, alpha_step)
  if grid.size > 10_000:
    raise ValueError(
        f'{owner}: alpha_max / alpha_step gives {grid.size} probe points, each'
        ' a forward pass; use a coarser alpha_step (e.g. 0.1).'
    )
  return grid


def _plane(displacement, perturbed_grad):
  """(v0, g_k in float32, ||g_k||, theta) of the spec's plane."""
  v0 = tree_math.tree_scale(
      tree_math.safe_inverse(tree_math.tree_norm(displacement)), displacement
  )
  grad_k = jax.tree.map(tree_math.wide, perturbed_grad)
  grad_k_norm = tree_math.tree_norm(grad_k)
  # <v0, v1> with v1 = g_k / ||g_k||; clipped so that rounding past +-1 never
  # reaches arccos as a NaN.
  cos_theta = jnp.clip(
      tree_math.tree_vdot(v0, grad_k) * tree_math.safe_inverse(grad_k_norm),
      -1.0,
      1.0,
  )
  return v0, grad_k, grad_k_norm, jnp.arccos(cos_theta)


def _ascent_plane(ctx: variant_lib.Context):
  """SAM's ascent and re-gradient, then the plane: (loss_k, v0, g_k, ...)."""
  displacement = ctx.ascend()
  loss_k, grad_k = ctx.grad_at(ctx.shift(displacement))
  return (loss_k,) + _plane(displacement, grad_k)


def _alpha_limit(theta, max_angle):
  """The largest alpha whose direction is within max_angle of v0."""
  positive = theta > 0
  return jnp.where(positive, max_angle / jnp.where(positive, theta, 1.0),
                   jnp.inf)


def _slerp_coefficients(alpha: jax.Array, theta: jax.Array):
  """(c0, c1) with d(alpha) = c0 v0 + c1 v1.

  ``c0 = sin((1 - alpha) theta) / sin(theta)``, ``c1 = sin(alpha theta) /
  sin(theta)``; where ``sin(theta) < 1e-8`` the theta -> 0 limit
  ``(1 - alpha, alpha)`` (a select, and a guarded division: no NaN in either
  branch).
  """
  sin_theta = jnp.sin(theta)
  degenerate = sin_theta < _SIN_THETA_FLOOR
  safe_sin = jnp.where(degenerate, 1.0, sin_theta)
  c0 = jnp.where(degenerate, 1.0 - alpha, jnp.sin((1.0 - alpha) * theta)
                 / safe_sin)
  c1 = jnp.where(degenerate, alpha, jnp.sin(alpha * theta) / safe_sin)
  return c0, c1


def _probe(grid: np.ndarray, probe_batch_size: Optional[int]):
  """XSAM's decide piece: the losses along the arc, and theta."""

  def decide(ctx: variant_lib.Context):
    _, v0, grad_k, grad_k_norm, theta = _ascent_plane(ctx)
    rho_max = ctx.hyperparams['rho_max']
    unit_k = tree_math.tree_scale(tree_math.safe_inverse(grad_k_norm),
                                  grad_k)  # v1

    def probe_loss(a):
      c0, c1 = _slerp_coefficients(a, theta)
      point = jax.tree.map(
          lambda p, x, y: (tree_math.wide(p) + rho_max * (c0 * x + c1 * y)
                           ).astype(p.dtype), ctx.params, v0, unit_k)
      return ctx.loss_at(point)

    losses = jax.lax.map(probe_loss, jnp.asarray(grid),
                         batch_size=probe_batch_size)
    return losses, theta

  return decide


def _choose(grid, losses, theta, max_angle, previous):
  """The alpha of the largest finite loss (ties: the smaller alpha).

  A NaN loss is never chosen; if every loss is NaN the previous alpha stays.
  """
  allowed = ~jnp.isnan(losses)
  if max_angle is not None:
    allowed &= jnp.asarray(grid) <= _alpha_limit(theta, max_angle)
  best = jnp.argmax(jnp.where(allowed, losses, -jnp.inf))
  return jnp.where(jnp.any(allowed), jnp.asarray(grid)[best], previous)


def _combine(grid, probe_every, max_angle):
  """XSAM's combine piece: ||g_k|| d(alpha), alpha probed or given."""

  def combine(ctx: variant_lib.Context) -> variant_lib.Step:
    loss_k, v0, grad_k, grad_k_norm, theta = _ascent_plane(ctx)
    state = ctx.state
    if probe_every is None:
      alpha, probe_losses = ctx.hyperparams['alpha'], state.probe_losses
    else:
      losses, mean_theta = ctx.decision
      probed = _choose(grid, losses, mean_theta, max_angle, state.alpha)
      alpha = jnp.where(ctx.decided, probed, state.alpha)
      probe_losses = jnp.where(ctx.decided, losses, state.probe_losses)
    # The cap applies to this step's update only; the state keeps the probed
    # (or given) alpha, so one tight step does not lower it until the next
    # probe.
    used = alpha if max_angle is None else jnp.minimum(
        alpha, _alpha_limit(theta, max_angle))
    if probe_every is not None:  # a bad traced rho_max shows in the update
      used = jnp.where(ctx.decided & jnp.isnan(ctx.hyperparams['rho_max']),
                       jnp.nan, used)
    # ||g_k|| d(alpha) = c0 ||g_k|| v0 + c1 g_k: using g_k itself (rather
    # than ||g_k|| v1) keeps alpha = 1 equal to SAM.
    c0, c1 = _slerp_coefficients(used, theta)
    scale0 = c0 * grad_k_norm
    out = jax.tree.map(lambda x, y: scale0 * x + c1 * y, v0, grad_k)
    return variant_lib.Step(out, loss_k, state._replace(
        alpha=jnp.asarray(alpha, jnp.float32), probe_losses=probe_losses))

  return combine


@transformation.transformation
def xsam(
    rho: ScalarOrSchedule = 0.05,
    *,
    rho_max: ScalarOrSchedule = 0.15,
    probe_every: Optional[int] = 100,
    alpha: ScalarOrSchedule = 1.0,
    alpha_max: float = 2.0,
    alpha_step: float = 0.1,
    probe_batch_size: Optional[int] = None,
    max_angle: Optional[float] = None,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""Explicit SAM: the update points at the loss maximum found in a plane.

  From SAM's ascent to :math:`w_k` and the gradient
  :math:`g_k = \nabla L(w_k)` there, XSAM searches the plane of

  .. math::

    v_0 = \frac{w_k - w_0}{\|w_k - w_0\|}, \qquad
    v_1 = \frac{g_k}{\|g_k\|}, \qquad
    \theta = \arccos \mathrm{clip}(\langle v_0, v_1 \rangle, -1, 1)

  along the spherical interpolation, and hands on

  .. math::

    d(\alpha) = \frac{\sin((1-\alpha)\theta)\, v_0 + \sin(\alpha\theta)\,
    v_1}{\sin\theta}, \qquad g = \|g_k\|\, d(\alpha)

  (the limit :math:`(1-\alpha) v_0 + \alpha v_1` where
  :math:`\sin\theta < 10^{-8}`). On steps 0, p, 2p, ... (p =
  ``probe_every``) a probe evaluates :math:`L(w_0 + \rho_{\max}
  d(\alpha))`, forward passes only, for :math:`\alpha \in \{0, \Delta,
  \dots, \alpha_{\max}\}` and keeps the alpha of the largest loss (ties:
  the smaller); between probes alpha stays in the state while
  :math:`v_0, v_1, \theta` are recomputed every step. ``alpha=1`` is SAM's
  gradient, ``alpha=0`` the ascent direction.

  Args:
    loss_fn: as in `sam`.
    rho: total ascent length, a number >= 0 or a schedule.
    rho_max: the probe's radius, a number > 0 or a schedule.
    probe_every: the probe period p, a static int >= 1, or None: no probe,
      ``alpha`` at every step.
    alpha: the interpolation fraction without a probe (a number >= 0 or a
      schedule); with the probe, the state's value before the first probe.
    alpha_max: the largest alpha the probe tries, a static number > 0.
    alpha_step: the spacing :math:`\Delta` of the probe's grid, a static
      number in ``(0, alpha_max]``.
    probe_batch_size: grid points evaluated at once: None (one at a time,
      `jax.lax.map`), up to the grid's length (one `jax.vmap`).
    max_angle: None (the paper), or the largest angle in (0, pi] radians
      between d(alpha) and v0: each step uses at most alpha =
      ``max_angle / theta`` and the probe chooses below it.

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an `XSAMState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 4)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.eye(3), 'y': jnp.zeros(3)}
    >>> tx = optax.chain(sam_optax.xsam(loss_fn, rho=0.1, rho_max=0.2),
    ...                  optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    >>> print(opt_state[0].alpha, opt_state[0].probe_losses.shape)
    1.9 (21,)

  References:
    Chen & Zhou, `Revisiting Sharpness-Aware Minimization: A More Faithful
    and Effective Implementation <https://arxiv.org/abs/2603.10048>`_,
    ICLR 2026.
  """
  owner = 'xsam'
  grid = _checked_grid(owner, alpha_max, alpha_step)
  if probe_every is not None:
    probe_every = validation.check_static_int(
        owner, 'probe_every', probe_every, minimum=1
    )
  if max_angle is not None:
    max_angle = _check_static_positive(
        owner, 'max_angle', max_angle, 'a fixed angle in radians')
    if max_angle > np.pi + 1e-6:
      raise ValueError(
          f'{owner}: max_angle is in radians and at most pi, got {max_angle}'
          ' (e.g. max_angle=math.pi / 2 for a right angle).'
      )
  if probe_batch_size is not None:
    probe_batch_size = validation.check_static_int(
        owner, 'probe_batch_size', probe_batch_size, minimum=1
    )

  def init(params):
    del params
    initial = alpha(0) if callable(alpha) else alpha
    return dict(alpha=jnp.asarray(initial, jnp.float32),
                probe_losses=jnp.zeros(grid.shape, jnp.float32))

  probing = probe_every is not None
  return variant_lib.Variant(
      hyperparams={'rho': rho, 'rho_max': rho_max, 'alpha': alpha},
      bounds={'rho_max': variant_lib.POSITIVE},
      state=XSAMState,
      init=init,
      combine=_combine(grid, probe_every, max_angle),
      agree={'alpha': 'same', 'probe_losses': 'same'},
      decide=_probe(grid, probe_batch_size) if probing else None,
      decides=_every(probe_every) if probing else None,
  )
