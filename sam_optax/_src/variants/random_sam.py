"""Random SAM: a SAM step with probability p, or every k-th step."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Unpack

import jax
import jax.numpy as jnp

from sam_optax._src.core import validation
from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import cheap


class RandomSAMState(NamedTuple):
  """State of `random_sam`: the count, diagnostics, the key, the choice.

  Attributes:
    count: number of updates so far (int32).
    perturbed_loss: L(w + eps) at the last SAM step, float32.
    grad_norm: ||g0|| at the last update, float32.
    cosine: cos(g0, g), 0 unless ``track_cosine=True``.
    sam_step: whether the last update was a SAM step (bool).
    key: the raw PRNG key (uint32) the next choice is drawn from; the same
      in every group and device, so the choice is too (with ``interval``
      nothing is drawn and it stays the seed's).
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  sam_step: jax.Array
  key: jax.Array


def _combine(when: cheap.When, interval: Optional[int], scale_rho: bool):
  """SAM where ``when`` says so (the coin or the interval), g0 elsewhere."""

  def combine(ctx: variant_lib.Context) -> variant_lib.Step:
    if interval is not None and scale_rho:
      hp = dict(ctx.hyperparams, rho=ctx.hyperparams['rho'] * interval)
      ctx = dataclasses.replace(ctx, hyperparams=hp)
    sam_step, fields, loss, grad = when.sam_or_clean(ctx)
    return variant_lib.Step(grad, loss, ctx.state._replace(
        sam_step=sam_step, **fields))

  return combine


@transformation.transformation
def random_sam(
    rho: ScalarOrSchedule = 0.05,
    p: ScalarOrSchedule = 0.5,
    *,
    interval: Optional[int] = None,
    scale_rho: bool = False,
    seed: int = 0,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""SAM on a random fraction p of the steps (or every ``interval``-th).

  Each step draws :math:`u \sim U[0, 1)` from the key in the state; where
  :math:`u < p` it is a SAM step (:math:`\epsilon = \rho\, g_0/\|g_0\|`,
  hands on :math:`\nabla L(w + \epsilon)`), elsewhere it hands on
  :math:`g_0` with no second gradient (a `jax.lax.cond`). The key lives in
  the state, so a run is reproducible from ``seed`` and resumes exactly
  from a checkpoint; it is the same in every group and device, so they
  all take the same branch. Expected cost: :math:`1 + p` gradients.

  ``interval=k`` is the fixed form (Composer's ``SAM(interval=k)``): SAM on
  steps 0, k, 2k, ..., ``p`` unused. ``scale_rho=True`` multiplies rho by
  k there, a scaling attributed to Composer (we did not confirm it in
  Composer's source); off by default.

  **Sources.** Random SAM steps are the "SAM with probability p" baseline
  of Zhao et al. (2022, "SS-SAM") and of the LookSAM / AE-SAM papers; the
  interval form is MosaicML Composer's. Neither has a reference we could
  run here, so the tests check the equations above.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.eye(3), 'y': jnp.zeros(3)}
    >>> tx = sam_optax.random_sam(loss_fn, rho=0.1, interval=2)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> _, state = tx.update(grads, state, params, batch=batch)
    >>> print(bool(state.sam_step))
    True

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    rho: radius of the ascent, a number >= 0 or a schedule.
    p: the probability of a SAM step, in [0, 1], a number or a schedule.
    interval: None (random steps) or an int k >= 1 (every k-th step).
    scale_rho: with ``interval``, use rho * k (see above).
    seed: seeds the key in the state (an int).

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `RandomSAMState`.

  References:
    Zhao et al., `SS-SAM: Stochastic Scheduled Sharpness-Aware Minimization
    for Efficiently Training Deep Neural Networks
    <https://arxiv.org/abs/2203.09962>`_, 2022; MosaicML Composer, ``SAM``.
  """
  if interval is not None:
    interval = validation.check_static_int('random_sam', 'interval',
                                           interval, minimum=1)
  validation.check_bool('random_sam', 'scale_rho', scale_rho)
  seed = validation.check_static_int('random_sam', 'seed', seed, minimum=0)
  when = cheap.coin('p') if interval is None else cheap.every(interval)
  return variant_lib.Variant(
      hyperparams={'rho': rho, 'p': p},
      bounds={'p': variant_lib.UNIT},
      state=RandomSAMState, combine=_combine(when, interval, scale_rho),
      agree={'sam_step': 'same', 'key': 'same'},
      init=lambda params: dict(sam_step=jnp.asarray(False),
                               key=jax.random.PRNGKey(seed)))
