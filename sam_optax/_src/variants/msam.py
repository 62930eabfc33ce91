"""Momentum-SAM: the gradient at w - rho v / |v|, one gradient per step."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import bounds


class MSAMState(NamedTuple):
  """State of `msam`: the count, diagnostics and the momentum.

  Attributes:
    count: number of updates so far (int32).
    perturbed_loss: L(w - rho v/|v|) at the last update, float32.
    grad_norm: 0 ("not measured"): msam never reads the clean gradient;
      with ``track_cosine=True`` it is ||g0||.
    cosine: cos(g0, g), 0 unless ``track_cosine=True``.
    sam_step: True on every step after the first (the perturbation is zero
      on the first step, where v = 0), a bool.
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
  momentum = bounds.nan_unless(beta <= 1.0, jax.tree.map(
      lambda m, g: beta * m + (1.0 - beta) * g.astype(jnp.float32), v, grad))
  grad = bounds.nan_unless(beta <= 1.0, grad)
  return variant_lib.Step(grad, loss, ctx.state._replace(
      sam_step=ctx.count > 0, momentum=momentum))


@transformation.transformation
def msam(
    loss_fn: Callable[..., Any],
    rho: variant_lib.ScalarOrSchedule = 1.0,
    beta: variant_lib.ScalarOrSchedule = 0.9,
) -> variant_lib.Variant:
  r"""Momentum-SAM: perturb along the negative momentum; one gradient a step.

  MSAM replaces SAM's ascent along the minibatch gradient by a step along
  the *negative* momentum, which it does not have to compute:

  .. math::

    g_t = \nabla L\Big(w_t - \rho\, \frac{v_{t-1}}{\|v_{t-1}\|}\Big),
    \qquad v_t = \beta\, v_{t-1} + (1 - \beta)\, g_t,

  with :math:`v_0 = 0` (the first step is a clean gradient at :math:`w`).
  The clean gradient :math:`g_0` is never read -- not even for the
  diagnostics (``grad_norm`` is 0) -- so under `jax.jit` XLA removes the
  caller's ``jax.grad`` and the step costs one forward-backward pass.
  ``rho=0`` hands on the gradient at :math:`w` (the same numbers as the
  caller's gradient when both are taken the same way).

  **Authors and peers.** The authors' code (MarlonBecker/MSAM) perturbs
  along the base optimizer's own momentum buffer and keeps the weights
  stored at the perturbed point to save a copy; here :math:`v` is msam's own
  EMA of the gradients it hands on (the direction of an EMA is that of
  PyTorch's sum-form buffer, :math:`v \leftarrow \mu v + g`, so ``beta`` is
  the base optimizer's momentum for the same direction), which keeps msam
  a front-of-chain transformation like every other. Their rho is larger
  than SAM's (the perturbation follows a descent direction); our default
  1.0 is the best of {0.3, 0.6, 1.0} in the MNIST-1D sweep of
  benchmarks/results/efficient.md (58 % of SAM's gain there).

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

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    rho: length of the step along the negative momentum, >= 0, a number or
      a schedule.
    beta: the momentum's decay, in [0, 1], a number or a schedule.

  ``has_aux``, ``perturbation_mask``, ``layout`` and ``track_cosine`` work
  as in `sam` (``track_cosine=True`` reads g0, and so costs its gradient);
  ``ascent_steps=k`` adds k - 1 SAM-style gradient steps after the first.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `MSAMState`.

  References:
    Becker et al., `Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.
  """
  del loss_fn  # the pipeline takes it
  bounds.check_below('msam', 'beta', beta, 1.0, inclusive=True)
  return variant_lib.Variant(
      name='msam', hyperparams={'rho': rho, 'beta': beta}, state=MSAMState,
      combine=_combine, uses_clean_grad=False,
      agree={'sam_step': 'same', 'momentum': 'mean'},
      init=lambda params: MSAMState(
          **variant_lib.initial_diagnostics(), sam_step=jnp.asarray(False),
          momentum=jax.tree.map(
              lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)))
