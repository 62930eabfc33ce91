"""Momentum-SAM: the gradient at w - rho v / |v|, one gradient per step."""

from __future__ import annotations

from typing import NamedTuple, Unpack

import jax
import jax.numpy as jnp

from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib


class MSAMState(NamedTuple):
  """State of `msam`: the common fields of `SAMState`, the momentum.

  ``grad_norm`` holds 0 unless ``track_cosine=True``: msam never reads g0.

  Attributes:
    sam_step: True on every step after the first (on the first, v = 0 and
      the perturbation is zero), a bool.
    momentum: v, the EMA of the gradients handed on, a float32 tree like
      the parameters; zeros at init.
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  sam_step: jax.Array
  momentum: jax.Array


def _combine(ctx: variant_lib.Context) -> variant_lib.Step:
  """g = grad L(w - rho v / |v|); v <- beta v + (1 - beta) g."""
  beta = ctx.hyperparams['beta']
  v = ctx.state.momentum
  # ascend(-v): rho (-v) / |v|, zero-safe, masked like every variant's.
  eps = ctx.ascend(jax.tree.map(jnp.negative, v))
  loss, grad = ctx.grad_at(ctx.shift(eps))
  momentum = jax.tree.map(
      lambda m, g: beta * m + (1.0 - beta) * g.astype(jnp.float32), v, grad)
  return variant_lib.Step(grad, loss, ctx.state._replace(
      sam_step=ctx.count > 0, momentum=momentum))


@transformation.transformation
def msam(
    rho: ScalarOrSchedule = 0.3,
    beta: ScalarOrSchedule = 0.9,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""Momentum-SAM: perturb along the negative momentum; one gradient a step.

  MSAM replaces SAM's ascent along the minibatch gradient by a step along
  the *negative* momentum, which it does not have to compute:

  .. math::

    g_t = \nabla L\Big(w_t - \rho\, \frac{v_{t-1}}{\|v_{t-1}\|}\Big),
    \qquad v_t = \beta\, v_{t-1} + (1 - \beta)\, g_t,

  with :math:`v_0 = 0` (the first step is a clean gradient at :math:`w`).
  The clean gradient :math:`g_0` is never read, so under `jax.jit` XLA
  removes the caller's ``jax.grad`` and a step costs one forward-backward
  pass.

  Args:
    loss_fn: as in `sam`.
    rho: length of the step along the negative momentum, >= 0, a number or
      a schedule (larger than SAM's: it follows a descent direction). The
      default 0.3 trained on all four tasks of our study
      (docs/guide/choosing.md); 0.2's 1.0 was worse than AdamW on the
      language model.
    beta: the momentum's decay, in [0, 1], a number or a schedule.

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam`; ``ascent_steps=k`` adds k - 1 SAM-style
  steps after the first, and ``track_cosine=True`` reads g0.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `MSAMState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.eye(3), 'y': jnp.zeros(3)}
    >>> tx = optax.chain(sam_optax.msam(loss_fn, rho=0.1), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   grads = jax.grad(loss_fn)(params, batch=batch)
    ...   updates, state = tx.update(grads, state, params, batch=batch)
    ...   params = optax.apply_updates(params, updates)
    >>> print(' '.join(f'{x:.4f}' for x in params['w']))
    0.8769 -0.4385 0.2192

  References:
    Becker et al., `Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024
    (authors' code: MarlonBecker/MSAM).
  """
  return variant_lib.Variant(
      hyperparams={'rho': rho, 'beta': beta}, state=MSAMState,
      bounds={'beta': variant_lib.UNIT},
      combine=_combine, uses_clean_grad=False,
      agree={'sam_step': 'same', 'momentum': 'mean'},
      init=lambda params: dict(
          sam_step=jnp.asarray(False),
          momentum=jax.tree.map(
              lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)))
