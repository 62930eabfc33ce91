"""First-order sharpness and SAM sharpness: one gradient, one normalized step."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp

from sam_optax._src.core import directions
from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.sharpness import compiled
from sam_optax._src.sharpness import metric
from sam_optax._src.sharpness import objective as objective_lib

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]

@compiled.reuse_compiled
def first_order_sharpness(
    loss_fn: Callable[..., Any],
    params: PyTree,
    rho: float = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
) -> jax.Array:
  r"""First-order sharpness: the linearized loss increase over the rho-ball.

  .. math::

    S_1(w) = \max_{\|\epsilon\|_2 \le \rho} \epsilon^\top \nabla L(w)
           = \rho \, \|\nabla L(w)\|_2,

  and, with ``adaptive=True`` (the ASAM ball
  :math:`\|T_w^{-1}\epsilon\|_2 \le \rho`, :math:`T_w = |w| + \eta`),
  :math:`\rho\,\|T_w \nabla L(w)\|_2`. The norm is taken in float32.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda params, x: jnp.sum(params * x)  # gradient x
    >>> s = sharpness.first_order_sharpness(
    ...     loss_fn, jnp.zeros(2), rho=0.1, loss_kwargs={'x': jnp.array([3., 4.])})
    >>> print(f'{s:.3f}')
    0.500

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    rho: radius of the ball, > 0.
    adaptive: measure in the ASAM metric :math:`T_w = |w| + \eta`.
    eta: offset of the adaptive metric, >= 0.

  Returns:
    The sharpness, a float32 scalar; NaN when L(w) is NaN or infinite.

  Raises:
    ValueError: rho not a finite number > 0; eta < 0.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (eq. 2).
  """
  owner = 'first_order_sharpness'
  validation.check_number(owner, 'rho', rho, allow_zero=False)
  metric.check_adaptive(owner, adaptive, eta)
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  loss, grad = obj.value_and_grad(params)
  scaled = metric.apply_scale(metric.scale(params, adaptive, eta), grad)
  value = jnp.asarray(rho, jnp.float32) * tree_math.tree_norm(scaled)
  return objective_lib.nan_unless_finite(value, loss)


@compiled.reuse_compiled
def sam_sharpness(
    loss_fn: Callable[..., Any],
    params: PyTree,
    rho: float = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
) -> jax.Array:
  r"""SAM sharpness: the loss increase at SAM's one-step worst point.

  .. math::

    \epsilon = \rho \, \frac{\nabla L(w)}{\|\nabla L(w)\|_2}, \qquad
    S_{\mathrm{SAM}}(w) = L(w + \epsilon) - L(w).

  With ``adaptive=True``, ASAM's point
  :math:`\epsilon = \rho\, T_w^2 \nabla L / \|T_w \nabla L\|_2` with
  :math:`T_w = |w| + \eta`. A zero gradient gives :math:`\epsilon = 0` and a
  sharpness of exactly 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(w ** 2)  # L(w + e) - L(w) = rho|w| + rho^2/2
    >>> s = sharpness.sam_sharpness(loss_fn, jnp.array([3., 4.]), rho=0.1)
    >>> print(f'{s:.3f}')
    0.505

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    rho: radius, > 0.
    adaptive: use ASAM's metric.
    eta: offset of the adaptive metric, >= 0.

  Returns:
    :math:`L(w + \epsilon) - L(w)`, a float32 scalar; NaN when either loss
    is NaN (or L(w) infinite).

  Raises:
    ValueError: rho not a finite number > 0; eta < 0.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021;
    Kwon et al., `ASAM <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  owner = 'sam_sharpness'
  validation.check_number(owner, 'rho', rho, allow_zero=False)
  metric.check_adaptive(owner, adaptive, eta)
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  loss, grad = obj.value_and_grad(params)
  if adaptive:
    direction = directions.adaptive_direction(
        grad, metric.scale(params, True, eta))
  else:
    direction = directions.normalized_direction(grad)
  epsilon = tree_math.tree_scale(jnp.asarray(rho, jnp.float32), direction)
  return objective_lib.nan_unless_finite(
      obj.loss(metric.shift(params, epsilon)) - loss, loss)
