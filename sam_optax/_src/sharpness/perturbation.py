"""Sharpness as the loss increase under a weight perturbation.

First-order, SAM (one normalized step), worst-case (projected ascent with
Auto-PGD step-size control), average-case (Gaussian) and m-sharpness.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src.core import batching
from sam_optax._src.core import directions
from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import groups
from sam_optax._src.pipeline import layouts
from sam_optax._src.sharpness import objective as objective_lib

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]


def _scale(params: PyTree, adaptive: bool, eta) -> Optional[PyTree]:
  """T_w = |w| + eta (float32) when adaptive, else None (the identity)."""
  if not adaptive:
    return None
  mask = jax.tree.map(lambda _: True, params)
  return directions.adaptive_scale(params, jnp.asarray(eta, jnp.float32),
                                   mask)


def _apply_scale(scale: Optional[PyTree], tree: PyTree) -> PyTree:
  """T * tree in float32 (tree itself, widened, when T is the identity)."""
  wide = jax.tree.map(tree_math.wide, tree)
  if scale is None:
    return wide
  return jax.tree.map(lambda t, x: t * x, scale, wide)


def _shift(params: PyTree, delta: PyTree) -> PyTree:
  """w + delta, added in float32, returned in the parameters' dtypes."""
  return tree_math.tree_add_scaled(params, jnp.ones([], jnp.float32), delta)


def _check_adaptive(owner: str, adaptive: Any, eta: Any) -> None:
  if not isinstance(adaptive, bool):
    raise TypeError(f'{owner}: adaptive must be a bool, got {adaptive!r}.')
  validation.check_number(owner, 'eta', eta)


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

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss (or
      ``(loss, aux)`` with ``has_aux=True``).
    params: the weights w, a pytree.
    rho: radius of the ball, > 0.
    adaptive: measure in the ASAM metric :math:`T_w = |w| + \eta`.
    eta: offset of the adaptive metric, >= 0.
    loss_kwargs: keyword arguments of ``loss_fn`` (one batch); with
      ``batches``, the arguments shared by every batch.
    batches: an iterable of ``loss_kwargs`` dicts; the dataset loss (mean over
      the batches) is measured.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    layout: where the batch lies: ``None`` (on this device), or
      ``sam_optax.PerDevice(axis)`` inside `jax.pmap` / `jax.shard_map` with
      the batch sharded over ``axis`` (the measurement is that of the global
      batch, identical on every device: one all-reduce per loss, gradient
      or curvature product), or ``sam_optax.Chunks(m, shared=True)`` (the
      batch accumulated over chunks of m examples, memory of one chunk).
  Returns:
    The sharpness, a float32 scalar; NaN when L(w) is NaN or infinite.

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux`` (the message names ``has_aux=True`` or
      ``has_aux=False``), or that returns a dict (e.g. ``jax.grad(loss_fn)``
      passed by mistake).
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``;
      rho not a finite number > 0; eta < 0.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (eq. 2).
  """
  owner = 'first_order_sharpness'
  validation.check_number(owner, 'rho', rho, allow_zero=False)
  _check_adaptive(owner, adaptive, eta)
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  loss, grad = obj.value_and_grad(params)
  scaled = _apply_scale(_scale(params, adaptive, eta), grad)
  value = jnp.asarray(rho, jnp.float32) * tree_math.tree_norm(scaled)
  return objective_lib.nan_unless_finite(value, loss)


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

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss.
    params: the weights w.
    rho: radius, > 0.
    adaptive: use ASAM's metric.
    eta: offset of the adaptive metric, >= 0.
    loss_kwargs: keyword arguments of ``loss_fn`` (shared ones with
      ``batches``).
    batches: an iterable of ``loss_kwargs`` dicts (the dataset loss).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    layout: where the batch lies: ``None`` (on this device), or
      ``sam_optax.PerDevice(axis)`` inside `jax.pmap` / `jax.shard_map` with
      the batch sharded over ``axis`` (the measurement is that of the global
      batch, identical on every device: one all-reduce per loss, gradient
      or curvature product), or ``sam_optax.Chunks(m, shared=True)`` (the
      batch accumulated over chunks of m examples, memory of one chunk).
  Returns:
    :math:`L(w + \epsilon) - L(w)`, a float32 scalar; NaN when either loss
    is NaN (or L(w) infinite).

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux`` (the message names ``has_aux=True`` or
      ``has_aux=False``), or that returns a dict (e.g. ``jax.grad(loss_fn)``
      passed by mistake).
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``;
      rho not a finite number > 0; eta < 0.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021;
    Kwon et al., `ASAM <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  owner = 'sam_sharpness'
  validation.check_number(owner, 'rho', rho, allow_zero=False)
  _check_adaptive(owner, adaptive, eta)
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  loss, grad = obj.value_and_grad(params)
  if adaptive:
    direction = directions.adaptive_direction(
        grad, _scale(params, True, eta))
  else:
    direction = directions.normalized_direction(grad)
  epsilon = tree_math.tree_scale(jnp.asarray(rho, jnp.float32), direction)
  return objective_lib.nan_unless_finite(
      obj.loss(_shift(params, epsilon)) - loss, loss)


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


def apgd_checkpoints(num_steps: int) -> np.ndarray:
  """Auto-PGD's checkpoints w_j = ceil(p_j N) as a boolean mask over steps.

  p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
  (Croce & Hein 2020, section 3.2).
  """
  points = [0.0, 0.22]
  while points[-1] < 1.0:
    points.append(points[-1] + max(points[-1] - points[-2] - 0.03, 0.06))
  mask = np.zeros(num_steps + 1, dtype=bool)
  for p in points[1:]:
    step = int(math.ceil(p * num_steps - 1e-9))
    if 1 <= step <= num_steps:
      mask[step] = True
  return mask


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

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss.
    params: the weights w.
    rho: radius of the ball (in the metric of :math:`\gamma`), > 0.
    norm: ``'l2'`` or ``'linf'``.
    adaptive: scale the ball by :math:`|w| + \eta`.
    eta: offset of the adaptive metric, >= 0.
    num_steps: ascent steps N >= 1.
    step_size: initial step :math:`\eta_0`; default :math:`2\rho`.
    momentum: Auto-PGD's :math:`\alpha` in (0, 1]; 1 disables momentum.
    random_init: start at a random point of the ball (uniform in the
      L-infinity cube, uniform on the L2 sphere) instead of at w.
    key: PRNG key for ``random_init`` (default: a fixed key).
    loss_kwargs: keyword arguments of ``loss_fn`` (shared ones with
      ``batches``).
    batches: an iterable of ``loss_kwargs`` dicts (the dataset loss).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    layout: where the batch lies: ``None`` (on this device), or
      ``sam_optax.PerDevice(axis)`` inside `jax.pmap` / `jax.shard_map` with
      the batch sharded over ``axis`` (the measurement is that of the global
      batch, identical on every device: one all-reduce per loss, gradient
      or curvature product), or ``sam_optax.Chunks(m, shared=True)`` (the
      batch accumulated over chunks of m examples, memory of one chunk).
  Returns:
    A `WorstCaseSharpness` (sharpness, perturbation_norm, perturbation);
    every field NaN when L(w), or the loss at any point of the ascent, is
    NaN (a NaN point is never "the best", so it would otherwise be skipped
    and a plausible maximum of the others reported).

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux`` (the message names ``has_aux=True`` or
      ``has_aux=False``), or that returns a dict (e.g. ``jax.grad(loss_fn)``
      passed by mistake).
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``;
      rho or step_size not a finite number > 0; norm not 'l2' or
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
  _check_adaptive(owner, adaptive, eta)
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
  rho = jnp.asarray(rho, jnp.float32)
  ball = _Ball(norm, rho)
  scale = _scale(params, adaptive, eta)
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

  def value_and_grad(gamma):
    loss, grad = obj.value_and_grad(_shift(params, _apply_scale(scale, gamma)))
    return loss, _apply_scale(scale, grad)

  base_loss = obj.loss(params)
  start = (_random_start(norm, rho, zeros, objective_lib.resolve_key(key))
           if random_init else zeros)
  step = (2.0 * rho if step_size is None
          else jnp.asarray(step_size, jnp.float32))
  best_x, best_f, nan_seen = _apgd(
      value_and_grad, start, ball, step,
      jnp.asarray(momentum, jnp.float32), num_steps)
  gain = best_f - base_loss
  positive = gain > 0
  gamma = tree_math.tree_select(positive, best_x, zeros)
  result = WorstCaseSharpness(
      sharpness=jnp.where(positive, gain, 0.0),
      perturbation_norm=ball.norm(gamma),
      perturbation=_apply_scale(scale, gamma),
  )
  # A NaN loss anywhere on the ascent (or at w) has no maximum: NaN out.
  return objective_lib.nan_where(nan_seen | ~jnp.isfinite(base_loss), result)


class _Ball(NamedTuple):
  """The L2 or L-infinity ball of radius rho in which gamma lives."""

  kind: str
  rho: jax.Array

  def norm(self, gamma: PyTree) -> jax.Array:
    if self.kind == 'l2':
      return tree_math.tree_norm(gamma)
    leaves = [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(gamma) if x.size]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros([], jnp.float32)

  def ascent(self, grad: PyTree) -> PyTree:
    """The steepest-ascent direction of the ball's norm (unit, or a sign)."""
    if self.kind == 'l2':
      return tree_math.tree_scale(
          tree_math.safe_inverse(tree_math.tree_norm(grad)), grad)
    return jax.tree.map(jnp.sign, grad)

  def project(self, gamma: PyTree) -> PyTree:
    if self.kind == 'l2':
      norm = tree_math.tree_norm(gamma)
      factor = jnp.minimum(1.0, self.rho * tree_math.safe_inverse(norm))
      # gamma = 0 stays exactly 0 (and a NaN gamma stays NaN).
      factor = jnp.where(norm == 0, 1.0, factor)
      return tree_math.tree_scale(factor, gamma)
    return jax.tree.map(lambda x: jnp.clip(x, -self.rho, self.rho), gamma)


def _random_start(norm: str, rho: jax.Array, zeros: PyTree,
                  key: jax.Array) -> PyTree:
  """Uniform in the L-infinity cube, or uniform on the L2 sphere."""
  leaves, treedef = jax.tree.flatten(zeros)
  keys = jax.random.split(key, max(len(leaves), 1))
  if norm == 'linf':
    noise = [jax.random.uniform(k, x.shape, jnp.float32, -1.0, 1.0)
             for k, x in zip(keys, leaves)]
    return jax.tree.map(lambda x: rho * x, jax.tree.unflatten(treedef, noise))
  noise = jax.tree.unflatten(
      treedef, [jax.random.normal(k, x.shape, jnp.float32)
                for k, x in zip(keys, leaves)])
  return tree_math.tree_scale(
      rho * tree_math.safe_inverse(tree_math.tree_norm(noise)), noise)


class _ApgdCarry(NamedTuple):
  x_prev: PyTree
  x: PyTree
  f: jax.Array
  g: PyTree
  step: jax.Array
  best_x: PyTree
  best_f: jax.Array
  best_g: PyTree
  successes: jax.Array
  last_checkpoint: jax.Array
  step_at_checkpoint: jax.Array
  best_f_at_checkpoint: jax.Array
  nan_seen: jax.Array


def _apgd(value_and_grad, start, ball: _Ball, step, alpha, num_steps):
  """Auto-PGD from ``start``: (best point, its loss, whether a loss was NaN).

  ``best_f > f`` comparisons are False for NaN, so a NaN loss would never be
  the best one and the ascent would report a plausible maximum of the
  finite points; ``nan_seen`` records every NaN loss instead.
  """
  f0, g0 = value_and_grad(start)
  x1 = ball.project(_add(start, step, ball.ascent(g0)))
  f1, g1 = value_and_grad(x1)
  first_better = f1 > f0
  best_f = jnp.where(first_better, f1, f0)
  carry = _ApgdCarry(
      x_prev=start, x=x1, f=f1, g=g1, step=step,
      best_x=tree_math.tree_select(first_better, x1, start), best_f=best_f,
      best_g=tree_math.tree_select(first_better, g1, g0),
      successes=jnp.zeros([], jnp.int32),
      last_checkpoint=jnp.zeros([], jnp.int32),
      step_at_checkpoint=step, best_f_at_checkpoint=best_f,
      nan_seen=jnp.isnan(f0) | jnp.isnan(f1),
  )
  body = functools.partial(
      _apgd_step, value_and_grad=value_and_grad, ball=ball, alpha=alpha,
      checkpoints=jnp.asarray(apgd_checkpoints(num_steps)))
  carry = jax.lax.fori_loop(1, num_steps, body, carry)
  return carry.best_x, carry.best_f, carry.nan_seen


def _add(a: PyTree, s: jax.Array, b: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: x + s * y, a, b)


def _apgd_step(k, c: _ApgdCarry, *, value_and_grad, ball: _Ball, alpha,
               checkpoints) -> _ApgdCarry:
  """One Auto-PGD step with momentum, and the checkpoint's step-size rule."""
  z = ball.project(_add(c.x, c.step, ball.ascent(c.g)))
  moved = jax.tree.map(
      lambda x, zz, xp: x + alpha * (zz - x) + (1.0 - alpha) * (x - xp),
      c.x, z, c.x_prev)
  x_new = ball.project(moved)
  f_new, g_new = value_and_grad(x_new)
  successes = c.successes + (f_new > c.f).astype(jnp.int32)
  improved = f_new > c.best_f
  best_x = tree_math.tree_select(improved, x_new, c.best_x)
  best_f = jnp.where(improved, f_new, c.best_f)
  best_g = tree_math.tree_select(improved, g_new, c.best_g)
  at_checkpoint = checkpoints[k]
  span = (k - c.last_checkpoint).astype(jnp.float32)
  too_few = successes.astype(jnp.float32) < 0.75 * span
  stalled = (c.step == c.step_at_checkpoint) & (
      best_f == c.best_f_at_checkpoint)
  reduce = at_checkpoint & (too_few | stalled)
  return _ApgdCarry(
      x_prev=tree_math.tree_select(reduce, best_x, c.x),
      x=tree_math.tree_select(reduce, best_x, x_new),
      f=jnp.where(reduce, best_f, f_new),
      g=tree_math.tree_select(reduce, best_g, g_new),
      step=jnp.where(reduce, 0.5 * c.step, c.step),
      best_x=best_x, best_f=best_f, best_g=best_g,
      successes=jnp.where(at_checkpoint, 0, successes),
      last_checkpoint=jnp.where(at_checkpoint, k, c.last_checkpoint),
      step_at_checkpoint=jnp.where(at_checkpoint, c.step,
                                   c.step_at_checkpoint),
      best_f_at_checkpoint=jnp.where(at_checkpoint, best_f,
                                     c.best_f_at_checkpoint),
      nan_seen=c.nan_seen | jnp.isnan(f_new),
  )


class AverageCaseSharpness(NamedTuple):
  """Result of `average_case_sharpness`.

  Attributes:
    sharpness: the Monte-Carlo mean of :math:`L(w + \\sigma T_w z) - L(w)`.
    standard_error: its standard error (sample std / sqrt(num_samples)).
  """

  sharpness: jax.Array
  standard_error: jax.Array


def average_case_sharpness(
    loss_fn: Callable[..., Any],
    params: PyTree,
    sigma: float = 0.01,
    *,
    num_samples: int = 16,
    adaptive: bool = False,
    eta: float = 0.01,
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
) -> AverageCaseSharpness:
  r"""Average-case sharpness: the mean loss increase under Gaussian noise.

  .. math::

    S_{\mathrm{avg}}(w) = \mathbb{E}_{z \sim \mathcal{N}(0, I)}
      \left[L(w + \sigma\, T_w z)\right] - L(w)
      \approx \tfrac{\sigma^2}{2} \mathrm{tr}(T_w H T_w),

  with :math:`T_w = I`, or :math:`\mathrm{diag}(|w| + \eta)` when
  ``adaptive``; estimated with ``num_samples`` draws (one forward pass of the
  dataset loss each), returned with its standard error.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(w ** 2)  # exact: sigma^2 n / 2
    >>> out = sharpness.average_case_sharpness(
    ...     loss_fn, jnp.zeros(100), sigma=0.1, num_samples=64,
    ...     key=jax.random.key(0))
    >>> bool(abs(out.sharpness - 0.5) < 4 * out.standard_error)
    True

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss.
    params: the weights w.
    sigma: standard deviation of the noise, > 0.
    num_samples: number of Gaussian draws, >= 1.
    adaptive: scale the noise by :math:`|w| + \eta`.
    eta: offset of the adaptive metric, >= 0.
    key: PRNG key (default: a fixed key).
    loss_kwargs: keyword arguments of ``loss_fn`` (shared ones with
      ``batches``).
    batches: an iterable of ``loss_kwargs`` dicts (the dataset loss).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    layout: where the batch lies: ``None`` (on this device), or
      ``sam_optax.PerDevice(axis)`` inside `jax.pmap` / `jax.shard_map` with
      the batch sharded over ``axis`` (the measurement is that of the global
      batch, identical on every device: one all-reduce per loss, gradient
      or curvature product), or ``sam_optax.Chunks(m, shared=True)`` (the
      batch accumulated over chunks of m examples, memory of one chunk).
  Returns:
    An `AverageCaseSharpness` (sharpness, standard_error); NaN when L(w)
    or any perturbed loss is NaN.

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux`` (the message names ``has_aux=True`` or
      ``has_aux=False``), or that returns a dict (e.g. ``jax.grad(loss_fn)``
      passed by mistake).
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``;
      sigma not a finite number > 0; num_samples < 1.

  References:
    Keskar et al., `On Large-Batch Training for Deep Learning
    <https://arxiv.org/abs/1609.04836>`_, ICLR 2017; Andriushchenko et al.,
    `A Modern Look at the Relationship between Sharpness and Generalization
    <https://arxiv.org/abs/2302.07011>`_, ICML 2023.
  """
  owner = 'average_case_sharpness'
  validation.check_number(owner, 'sigma', sigma, allow_zero=False)
  _check_adaptive(owner, adaptive, eta)
  num_samples = validation.check_static_int(owner, 'num_samples', num_samples, 1)
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  key = objective_lib.resolve_key(key)
  sigma = jnp.asarray(sigma, jnp.float32)
  scale = _scale(params, adaptive, eta)
  base_loss = obj.loss(params)
  leaves, treedef = jax.tree.flatten(params)

  def sample(total, sample_key):
    keys = jax.random.split(sample_key, max(len(leaves), 1))
    z = jax.tree.unflatten(
        treedef,
        [jax.random.normal(k, p.shape, jnp.float32)
         for k, p in zip(keys, leaves)],
    )
    delta = tree_math.tree_scale(sigma, _apply_scale(scale, z))
    gain = obj.loss(_shift(params, delta)) - base_loss
    return (total[0] + gain, total[1] + gain * gain), None

  zero = jnp.zeros([], jnp.float32)
  (total, total_sq), _ = jax.lax.scan(
      sample, (zero, zero), jax.random.split(key, num_samples)
  )
  mean = total / num_samples
  if num_samples > 1:
    variance = jnp.maximum(total_sq - num_samples * mean * mean, 0.0) / (
        num_samples - 1)
    standard_error = jnp.sqrt(variance / num_samples)
  else:
    standard_error = zero
  return objective_lib.nan_unless_finite(
      AverageCaseSharpness(sharpness=mean, standard_error=standard_error),
      base_loss)


def _accepts_key(measure: Callable[..., Any]) -> bool:
  try:
    return 'key' in inspect.signature(measure).parameters
  except (TypeError, ValueError):
    return False


# The field of a measure's NamedTuple result that m_sharpness averages, in
# this order: WorstCaseSharpness / AverageCaseSharpness -> sharpness,
# HessianTopEigenvalue -> eigenvalue, HessianEigenvalues -> eigenvalues,
# HessianTrace -> trace.
MAIN_FIELDS = ('sharpness', 'eigenvalue', 'eigenvalues', 'trace')


def _name(measure: Callable[..., Any]) -> str:
  inner = getattr(measure, 'func', measure)  # functools.partial
  return getattr(inner, '__name__', repr(measure))


def _main_value(owner: str, measure: Callable[..., Any], out: Any):
  """The number (or fixed-shape array) that m_sharpness averages."""
  fields = getattr(out, '_fields', None)
  if fields is not None:
    field = next((f for f in MAIN_FIELDS if f in fields), None)
    if field is None:
      raise TypeError(
          f'{owner}: measure {_name(measure)} returned a'
          f' {type(out).__name__}, which has none of the fields m_sharpness'
          f' averages over chunks ({", ".join(MAIN_FIELDS)}). Pass a measure'
          ' that gives one value per chunk (a sharpness, an eigenvalue, a'
          ' trace), or a function returning that value.'
      )
    out = getattr(out, field)
  if not hasattr(out, 'dtype') and not isinstance(out, float):
    raise TypeError(
        f'{owner}: measure {_name(measure)} returned a {type(out).__name__};'
        ' m_sharpness averages a number (or an array of fixed shape) per'
        ' chunk, or a NamedTuple with one of the fields'
        f' {", ".join(MAIN_FIELDS)}.'
    )
  return jnp.asarray(out, jnp.float32)


def _chunked(owner, m, loss_kwargs, batches):
  """(leaves, treedef, indices of the chunked leaves, common kwargs, count).

  Each chunked leaf has a leading axis over all chunks (of every batch).
  """
  if batches is None:
    if not loss_kwargs:
      raise ValueError(
          f'{owner}: m-sharpness splits a batch into chunks of m examples, so'
          ' it needs the batch: pass loss_kwargs={...} (or batches=[...]).'
      )
    split, mask, num_chunks = batching.split_into_chunks(owner, loss_kwargs, m)
    leaves, treedef = jax.tree.flatten(split)
    mapped = [i for i, s in enumerate(jax.tree.leaves(mask)) if s]
    return leaves, treedef, mapped, {}, num_chunks
  stacked, num_batches = objective_lib.stack_batches(owner, batches)
  first = jax.tree.map(lambda x: x[0], stacked)
  _, _, per_batch = batching.split_into_chunks(owner, first, m)  # the errors

  def chunks(x):
    # (B, n, ...) -> (B * n / m, m, ...): the chunks of every batch; a
    # per-batch scalar (shape (B,)) goes to each of that batch's chunks.
    if x.ndim > 1:
      return jnp.reshape(x, (-1, m) + x.shape[2:])
    return jnp.repeat(x, per_batch)

  leaves, treedef = jax.tree.flatten(jax.tree.map(chunks, stacked))
  return (leaves, treedef, list(range(len(leaves))), dict(loss_kwargs or {}),
          num_batches * per_batch)


def m_sharpness(
    loss_fn: Callable[..., Any],
    params: PyTree,
    m: int,
    *,
    measure: Optional[Callable[..., Any]] = None,
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
    **measure_options: Any,
) -> jax.Array:
  r"""m-sharpness: the mean sharpness of disjoint chunks of m examples.

  .. math::

    S_m(w) = \frac{1}{|\mathcal{C}|} \sum_{C \in \mathcal{C}}
      \Big[\max_{\|\epsilon\| \le \rho} L_C(w + \epsilon) - L_C(w)\Big],

  where :math:`\mathcal{C}` splits the examples into disjoint chunks of m and
  :math:`L_C` is the loss on chunk C. The bracket is ``measure`` (default
  `sam_sharpness`, SAM's one-step approximation of the max; pass
  `worst_case_sharpness` for multi-step ascent, or any helper of this module
  that measures one value), called with ``measure_options`` (e.g.
  ``rho=0.05``) on each chunk; chunks are processed one after another with
  `jax.lax.map`. The value averaged is the measure's result itself when it
  is an array, else its main field: ``.sharpness`` (`worst_case_sharpness`,
  `average_case_sharpness`), ``.eigenvalue`` (`hessian_top_eigenvalue`),
  ``.eigenvalues`` (`hessian_eigenvalues`, averaged entrywise: the mean
  i-th eigenvalue) or ``.trace`` (`hessian_trace`). Every array with a
  leading batch dimension in ``loss_kwargs`` (or in each of ``batches``) is
  split; with ``batches`` the mean is over the chunks of every batch. A
  ``measure`` that takes a ``key`` gets an independent key per chunk. A NaN
  loss on any chunk makes the result NaN.

  With ``layout=sam_optax.PerDevice(axis)`` inside `jax.pmap` /
  `jax.shard_map`, each device splits its own shard of the batch and the
  mean runs over the chunks of every device (one all-reduce of the result):
  m = the per-device batch is the SAM paper's data-parallel m-sharpness.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> def loss_fn(w, x):  # mean over examples of (x_i . w)^2 / 2
    ...   return 0.5 * jnp.mean((x @ w) ** 2)
    >>> x = jnp.array([[1., 0.], [0., 1.], [1., 1.], [1., -1.]])
    >>> w = jnp.array([1., 0.5])
    >>> per_example = sharpness.m_sharpness(  # mean of 4 one-example values
    ...     loss_fn, w, 1, rho=0.1, loss_kwargs={'x': x})
    >>> whole_batch = sharpness.m_sharpness(  # = sam_sharpness on the batch
    ...     loss_fn, w, 4, rho=0.1, loss_kwargs={'x': x})
    >>> print(f'{per_example:.4f} {whole_batch:.4f}')
    0.1157 0.0876
    >>> top = sharpness.m_sharpness(  # mean over chunks of lambda_max(H_C)
    ...     loss_fn, w, 2, measure=sharpness.hessian_top_eigenvalue,
    ...     loss_kwargs={'x': x})
    >>> print(f'{top:.3f}')  # H_C = x_C^T x_C / 2: (1/2 + 1) / 2
    0.750

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss
      averaged over the examples it is given.
    params: the weights w (real floating-point leaves).
    m: examples per chunk; must divide the batch size.
    measure: a sharpness helper ``measure(loss_fn, params, *, loss_kwargs,
      has_aux, **measure_options)`` returning an array or a NamedTuple with
      one of the fields above; default `sam_sharpness`. A result without
      one (e.g. `hessian_spectral_density`) is a TypeError.
    key: PRNG key, split over the chunks when ``measure`` takes one.
    loss_kwargs: a dict of keyword arguments of ``loss_fn`` holding the batch
      (with ``batches``: arguments shared by every batch, not split).
    batches: an iterable of batch dicts, each split into chunks of m.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; a mismatch is a
      TypeError naming ``has_aux``.
    **measure_options: forwarded to ``measure`` (e.g. ``rho``).

    layout: ``None``, or ``sam_optax.PerDevice(axis)`` with the batch
      sharded over ``axis`` inside pmap / shard_map (the mean over the
      chunks of every device).
  Returns:
    The mean over chunks of the per-chunk value, float32 (a scalar, or the
    shape of the per-chunk value, e.g. (k,) for `hessian_eigenvalues`);
    NaN when the measure is NaN on any chunk.

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux`` (the message names ``has_aux=True`` or
      ``has_aux=False``), or that returns a dict (e.g. ``jax.grad(loss_fn)``
      passed by mistake).
    TypeError: a measure whose result has no main field (e.g.
      `hessian_spectral_density`); measure options named loss_kwargs,
      batches, has_aux or key (pass those to m_sharpness itself).
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``;
      no batch to split; m not dividing the batch size.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021
    (section 4.1); Andriushchenko & Flammarion, `Towards Understanding
    Sharpness-Aware Minimization <https://arxiv.org/abs/2206.06232>`_,
    ICML 2022.
  """
  owner = 'm_sharpness'
  m = validation.check_static_int(owner, 'm', m, 1)
  measure = sam_sharpness if measure is None else measure
  if not callable(measure):
    raise TypeError(
        f'{owner}: measure must be a sharpness helper such as'
        f' sam_sharpness or worst_case_sharpness, got {measure!r}.'
    )
  for reserved in ('loss_kwargs', 'batches', 'has_aux', 'key', 'layout'):
    if reserved in measure_options:
      raise TypeError(f'{owner}: pass {reserved} to m_sharpness itself.')
  objective_lib.check_inputs(owner, loss_fn, params, loss_kwargs, has_aux)
  axes = _device_axes(owner, layout)
  leaves, treedef, mapped, common, num_chunks = _chunked(
      owner, m, loss_kwargs, batches)

  def chunk_kwargs(chunk_leaves):
    full = list(leaves)
    for i, x in zip(mapped, chunk_leaves):
      full[i] = x
    return {**common, **jax.tree.unflatten(treedef, full)}

  # The loss's output is checked once here, so that its errors name
  # m_sharpness rather than the measure.
  first = chunk_kwargs([leaves[i][0] for i in mapped])
  jax.eval_shape(lambda: objective_lib.check_loss_output(
      owner, loss_fn(params, **first), has_aux))
  objective_lib.check_sharded(owner, layout, params, (leaves, common))
  # Each device measures its own chunks: at weights marked device-varying
  # inside shard_map, so that autodiff does not sum over the devices.
  tracked = any(set(axes) & groups.varying_axes(x)
                for x in jax.tree.leaves((leaves, common)))
  params = groups.make_local(params, axes, tracked)
  pass_key = _accepts_key(measure)
  keys = jax.random.split(objective_lib.resolve_key(key), num_chunks)

  def one_chunk(inputs):
    chunk_leaves, chunk_key = inputs
    extra = {'key': chunk_key} if pass_key else {}
    out = measure(loss_fn, params, loss_kwargs=chunk_kwargs(chunk_leaves),
                  has_aux=has_aux, **extra, **measure_options)
    return _main_value(owner, measure, out)

  values = jax.lax.map(one_chunk, ([leaves[i] for i in mapped], keys))
  mean = jnp.mean(values, axis=0)
  return jax.lax.pmean(mean, axes) if axes else mean


def _device_axes(owner: str, layout: Any) -> tuple:
  """m_sharpness's layout: None or a plain PerDevice(axis); its axes."""
  layout = layouts.check_layout(owner, layout)
  if layout is None:
    return ()
  if isinstance(layout, layouts.Chunks) or layout.chunks is not None or (
      layout.groups is not None):
    raise ValueError(
        f'{owner}: layout={layout!r}: m already splits the batch into chunks;'
        ' the layout only says which axis the batch is sharded over. Use'
        ' layout=None on one device or sam_optax.PerDevice(axis) inside'
        ' pmap / shard_map.')
  objective_lib.check_bound(owner, layout)
  return layout.axes
