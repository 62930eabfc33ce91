"""Worst-case sharpness: the largest loss increase over a ball, by Auto-PGD."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.core
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.sharpness import apgd
from sam_optax._src.sharpness import checks
from sam_optax._src.sharpness import compiled
from sam_optax._src.sharpness import metric
from sam_optax._src.sharpness import objective as objective_lib

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]

class WorstCaseSharpness(NamedTuple):
  """Result of `worst_case_sharpness`.

  Attributes:
    sharpness: the largest :math:`L(w + \\delta) - L(w)` found (>= 0).
    perturbation_norm: the norm of the maximizer in the ball's own metric
      (:math:`\\|\\gamma\\|` with :math:`\\delta = T_w\\gamma` when adaptive),
      at most rho.
    perturbation: the maximizer :math:`\\delta` itself, float32, like params.
  """

  sharpness: jax.Array
  perturbation_norm: jax.Array
  perturbation: PyTree


@compiled.reuse_compiled
def worst_case_sharpness(
    loss_fn: Callable[..., Any],
    params: PyTree,
    rho: float = 0.05,
    *,
    norm: str = 'l2',
    adaptive: bool = False,
    eta: float = 0.01,
    num_steps: int = 20,
    step_size: Optional[float] = None,
    momentum: float = 0.75,
    random_init: bool = False,
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
) -> WorstCaseSharpness:
  r"""Worst-case sharpness by projected multi-step ascent (Auto-PGD).

  .. math::

    S_{\max}(w) = \max_{\|\gamma\|_p \le \rho} L(w + T_w\gamma) - L(w),
    \qquad p \in \{2, \infty\},

  with :math:`T_w = I` (plain) or :math:`T_w = \mathrm{diag}(|w| + \eta)`
  (``adaptive=True``; :math:`\eta = 0` is the |w|-scaled adaptive sharpness of
  Andriushchenko et al.). The maximum is approached by Auto-PGD on
  :math:`\gamma`: steps :math:`z = P(\gamma_k + \eta_k s(\nabla_\gamma))` with
  :math:`s` the normalized gradient (L2) or its sign (L-infinity), momentum
  :math:`\gamma_{k+1} = P(\gamma_k + \alpha(z - \gamma_k) + (1 - \alpha)
  (\gamma_k - \gamma_{k-1}))`, and at Auto-PGD's checkpoints the step size is
  halved and the ascent restarted from the best point whenever fewer than 75%
  of the steps since the last checkpoint increased the loss, or neither the
  step size nor the best loss changed. The initial step is
  :math:`\eta_0 = 2\rho`. The best point found is returned; since
  :math:`\gamma = 0` is in the ball, the sharpness is never negative. Costs
  ``num_steps + 1`` gradients (of the dataset loss, with ``batches``) and one
  forward pass. Andriushchenko et al. report the *mean over batches* of each
  batch's worst-case sharpness; that is
  ``m_sharpness(loss_fn, params, m=batch_size,
  measure=worst_case_sharpness, ...)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: jnp.sum(w)  # linear: the max over the
    >>> out = sharpness.worst_case_sharpness(  # L-inf ball is rho * ||1||_1
    ...     loss_fn, jnp.zeros(4), rho=0.1, norm='linf', num_steps=5)
    >>> print(f'{out.sharpness:.3f} {out.perturbation_norm:.3f}')
    0.400 0.100

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    rho: radius of the ball (in the metric of :math:`\gamma`), > 0.
    norm: ``'l2'`` or ``'linf'``.
    adaptive: scale the ball by :math:`|w| + \eta`.
    eta: offset of the adaptive metric, >= 0.
    num_steps: ascent steps N >= 1.
    step_size: initial step :math:`\eta_0`; default :math:`2\rho`.
    momentum: Auto-PGD's :math:`\alpha` in (0, 1]; 1 disables momentum.
    random_init: start at a random point of the ball (uniform in the
      L-infinity cube, uniform on the L2 sphere) instead of at w.

  Returns:
    A `WorstCaseSharpness` (sharpness, perturbation_norm, perturbation);
    every field NaN when L(w), or the loss at any point of the ascent, is
    NaN (a NaN point is never "the best", so it would otherwise be skipped
    and a plausible maximum of the others reported).

  Raises:
    ValueError: rho or step_size not a finite number > 0; norm not 'l2' or
      'linf'; num_steps < 1; momentum outside (0, 1].

  References:
    Andriushchenko et al., `A Modern Look at the Relationship between
    Sharpness and Generalization <https://arxiv.org/abs/2302.07011>`_,
    ICML 2023; Croce & Hein, `Reliable evaluation of adversarial robustness
    with an ensemble of diverse parameter-free attacks
    <https://arxiv.org/abs/2003.01690>`_ (Auto-PGD), ICML 2020.
  """
  owner = 'worst_case_sharpness'
  validation.check_number(owner, 'rho', rho, allow_zero=False)
  metric.check_adaptive(owner, adaptive, eta)
  if norm not in ('l2', 'linf'):
    raise ValueError(
        f"{owner}: norm must be 'l2' or 'linf', got {norm!r}."
    )
  num_steps = validation.check_static_int(owner, 'num_steps', num_steps, 1)
  if step_size is not None:
    validation.check_number(owner, 'step_size', step_size, allow_zero=False)
  if not isinstance(momentum, jax.core.Tracer) and not 0 < float(momentum) <= 1:
    raise ValueError(f'{owner}: momentum must be in (0, 1], got {momentum!r}.')
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  radius = jnp.asarray(rho, jnp.float32)
  ball = apgd.Ball(norm, radius)
  scale = metric.scale(params, adaptive, eta)
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

  def value_and_grad(gamma):
    loss, grad = obj.value_and_grad(metric.shift(params, metric.apply_scale(scale, gamma)))
    return loss, metric.apply_scale(scale, grad)

  base_loss = obj.loss(params)
  start = (apgd.random_start(norm, radius, zeros, checks.resolve_key(key))
           if random_init else zeros)
  step = (2.0 * radius if step_size is None
          else jnp.asarray(step_size, jnp.float32))
  best_x, best_f, nan_seen = apgd.ascend(
      value_and_grad, start, ball, step,
      jnp.asarray(momentum, jnp.float32), num_steps)
  gain = best_f - base_loss
  positive = gain > 0
  gamma = tree_math.tree_select(positive, best_x, zeros)
  result = WorstCaseSharpness(
      sharpness=jnp.where(positive, gain, 0.0),
      perturbation_norm=ball.norm(gamma),
      perturbation=metric.apply_scale(scale, gamma),
  )
  # A NaN loss anywhere on the ascent (or at w) has no maximum: NaN out.
  return objective_lib.nan_where(nan_seen | ~jnp.isfinite(base_loss), result)
