"""Schedules for the radius: rho tied to the learning rate (GSAM's)."""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
import optax

from sam_optax._src.core import validation

_OWNER = 'rho_proportional_to_lr'


def _check(rho_max, rho_min, lr_max, lr_min) -> None:
  for name, value in (('rho_max', rho_max), ('rho_min', rho_min),
                      ('lr_max', lr_max), ('lr_min', lr_min)):
    validation.check_number(_OWNER, name, value)
  if float(rho_min) > float(rho_max):
    raise ValueError(f'{_OWNER}: rho_min ({rho_min}) must not exceed rho_max'
                     f' ({rho_max}).')
  if float(lr_min) > float(lr_max):
    raise ValueError(f'{_OWNER}: lr_min ({lr_min}) must not exceed lr_max'
                     f' ({lr_max}).')


def rho_proportional_to_lr(
    lr_schedule: Union[float, optax.Schedule],
    rho_max: float,
    rho_min: float,
    lr_max: float,
    lr_min: float,
) -> optax.Schedule:
  r"""An optax schedule for rho that follows the learning rate (GSAM's).

  .. math::

    \rho_t = \max\Bigl(\rho_{\min},\; \rho_{\min} + (\rho_{\max} -
    \rho_{\min})\, \frac{\eta_t - \eta_{\min}}{\eta_{\max} -
    \eta_{\min}}\Bigr),

  so rho is ``rho_max`` at the peak learning rate and ``rho_min`` at
  ``lr_min`` (GSAM, Algorithm 1, ties rho to a cosine or linear decay
  this way). With ``lr_max == lr_min`` it is the constant ``rho_max``.

  **Clipped at rho_min.** During a warm-up the learning rate starts below
  ``lr_min`` (often at 0), where the formula gives a rho below ``rho_min``,
  negative when ``rho_min`` is small: big_vision's ``gsam_gradient``
  computes it unclipped, so its warm-up steps ascend *against* the gradient.
  Here rho never goes below ``rho_min`` (nor below 0). A learning rate above
  ``lr_max`` still scales rho past ``rho_max`` (state the true peak).

  Pass it as ``rho=`` of any transformation. It is evaluated on that
  transformation's own step count, so it follows ``lr_schedule`` as long as
  the optimizer's count moves in step with it (one update per step, as in
  ``optax.chain``); with `optax.MultiSteps` around both, the counts differ.

  Examples:
    >>> import optax, sam_optax
    >>> lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100, 0.001)
    >>> rho = sam_optax.rho_proportional_to_lr(lr, rho_max=0.04,
    ...                                        rho_min=0.02, lr_max=0.1,
    ...                                        lr_min=0.001)
    >>> print(float(rho(0)), float(rho(10)), float(rho(100)))
    0.02 0.04 0.02

  Args:
    lr_schedule: the learning rate, a number or an optax schedule.
    rho_max: rho at ``lr_max`` (>= rho_min).
    rho_min: rho at ``lr_min`` and the floor of the schedule (>= 0).
    lr_max: the peak learning rate.
    lr_min: the learning rate at which rho is ``rho_min`` (<= lr_max).

  Returns:
    A schedule ``count -> rho`` (float32).

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  _check(rho_max, rho_min, lr_max, lr_min)
  if not callable(lr_schedule):
    validation.check_number(_OWNER, 'lr_schedule', lr_schedule)
  span = float(lr_max) - float(lr_min)
  rho_max, rho_min, lr_min = float(rho_max), float(rho_min), float(lr_min)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    lr = lr_schedule(count) if callable(lr_schedule) else lr_schedule
    lr = jnp.asarray(lr, jnp.float32)
    if span == 0.0:
      return jnp.full_like(lr, rho_max)
    rho = rho_min + (rho_max - rho_min) * ((lr - lr_min) / span)
    return jnp.maximum(rho, rho_min)

  return schedule
