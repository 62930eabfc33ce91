"""The dominant curvature eigenvalue by power iteration with a residual test."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.sharpness import blocks
from sam_optax._src.sharpness import checks
from sam_optax._src.sharpness import compiled
from sam_optax._src.sharpness import loops
from sam_optax._src.sharpness import operator as operator_lib

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]

class HessianTopEigenvalue(NamedTuple):
  """Result of `hessian_top_eigenvalue`.

  Attributes:
    eigenvalue: the dominant eigenvalue (Rayleigh quotient), float32.
    eigenvector: its unit eigenvector, a float32 pytree like params.
    num_iterations: power iterations run (<= num_iterations).
    converged: whether the pair passed both tests (a stable Rayleigh
      quotient and a small residual :math:`\\|Hv - \\lambda v\\|`); when
      False, ``eigenvalue`` is only the last estimate.
  """

  eigenvalue: jax.Array
  eigenvector: PyTree
  num_iterations: jax.Array
  converged: jax.Array


def _rayleigh(op: operator_lib.FlatOperator, v: jax.Array):
  """(H v, v^T H v, ||H v - (v^T H v) v||) for a unit v."""
  hv = op(v)
  eigenvalue = jnp.vdot(v, hv)
  return hv, eigenvalue, operator_lib.norm(hv - eigenvalue * v)


def _power_iteration(op: operator_lib.FlatOperator, v0: jax.Array, num_iterations: int,
                     tol: jax.Array, unroll: bool = False):
  """(v, lambda, steps, converged): power iteration with a residual test.

  A stable Rayleigh quotient alone is no proof: with eigenvalues +mu and -mu
  the iterate swings between two vectors whose Rayleigh quotients are equal
  (and wrong), so the residual must be small too. The residual converges
  like the square root of the Rayleigh quotient, hence ``sqrt(tol)``.

  ``unroll``: all ``num_iterations`` steps traced in, the state frozen after
  the stop (`loops.while_frozen`), and the split of ``_opposite_pair``
  computed unconditionally and selected (a `lax.cond` branch is a loop body
  for XLA:CPU's convolutions); equal to the while loop up to rounding.
  """
  residual_tol = jnp.sqrt(tol)

  def cond(state):
    i, _, eigenvalue, converged = state
    return (i < num_iterations) & ~converged & ~jnp.isnan(eigenvalue)

  def body(state):
    i, v, eigenvalue, _ = state
    hv, new_eigenvalue, residual = _rayleigh(op, v)
    hv_norm = operator_lib.norm(hv)
    converged = (i > 0) & (
        jnp.abs(new_eigenvalue - eigenvalue) <= tol * jnp.abs(new_eigenvalue)
    ) & (residual <= residual_tol * hv_norm)
    # Keep the vector whose residual was checked; a zero H v keeps v.
    keep = converged | (hv_norm == 0)
    new_v = jnp.where(keep, v, hv * tree_math.safe_inverse(hv_norm))
    return i + 1, new_v, new_eigenvalue, converged

  init = (jnp.zeros([], jnp.int32), v0, jnp.zeros([], jnp.float32),
          jnp.zeros([], bool))
  steps, v, eigenvalue, converged = loops.while_frozen(
      cond, body, init, num_iterations, unroll)
  if unroll:
    split = _opposite_pair(op, v, residual_tol)
    v, eigenvalue, converged = jax.tree.map(
        lambda a, b: jnp.where(converged, a, b), (v, eigenvalue, converged),
        split)
  else:
    v, eigenvalue, converged = jax.lax.cond(
        converged, lambda: (v, eigenvalue, converged),
        lambda: _opposite_pair(op, v, residual_tol))
  return v, eigenvalue, steps, converged


def _opposite_pair(op: operator_lib.FlatOperator, v: jax.Array, residual_tol: jax.Array):
  """After no convergence: split an iterate swinging between +mu and -mu.

  If v spans the eigenvectors of +mu and -mu, then u = H v / mu flips the
  sign of the -mu component, so v + u and v - u are the two eigenvectors.
  The first of them (+mu first) that passes the residual test with an
  eigenvalue of magnitude mu is returned with converged=True; otherwise v
  and its Rayleigh quotient, with converged=False. Costs three HVPs.
  """
  hv = op(v)
  mu = operator_lib.norm(hv)
  u = hv * tree_math.safe_inverse(mu)

  def check(candidate):
    candidate = operator_lib.unit(candidate)
    _, eigenvalue, residual = _rayleigh(op, candidate)
    ok = (residual <= residual_tol * jnp.abs(eigenvalue)) & (
        jnp.abs(jnp.abs(eigenvalue) - mu) <= residual_tol * mu) & (mu > 0)
    return candidate, eigenvalue, ok

  plus, plus_value, plus_ok = check(v + u)
  minus, minus_value, minus_ok = check(v - u)
  vector = jnp.where(plus_ok, plus, jnp.where(minus_ok, minus, v))
  value = jnp.where(plus_ok, plus_value,
                    jnp.where(minus_ok, minus_value, jnp.vdot(v, hv)))
  return vector, value, plus_ok | minus_ok


@compiled.reuse_compiled
@blocks.selectable
def hessian_top_eigenvalue(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *,
    num_iterations: int = 100,
    tolerance: float = 1e-4,
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
    curvature: Any = 'hessian',
    unroll: Optional[bool] = None,
    select: Any = None,  # select and per_leaf: see blocks.selectable
    per_leaf: bool = False,
) -> HessianTopEigenvalue:
  r"""The dominant Hessian eigenvalue and its eigenvector, by power iteration.

  .. math::

    v_{k+1} = \frac{H v_k}{\|H v_k\|_2}, \qquad
    \lambda_k = v_k^\top H v_k, \qquad r_k = \|H v_k - \lambda_k v_k\|_2,

  from a random unit :math:`v_0`, stopping when
  :math:`|\lambda_k - \lambda_{k-1}| \le \mathrm{tol}\,|\lambda_k|` *and*
  :math:`r_k \le \sqrt{\mathrm{tol}}\,\|H v_k\|_2`, or after
  ``num_iterations`` steps (a `jax.lax.while_loop`, or unrolled: see
  ``unroll``; one HVP per step).
  Power iteration converges to the eigenvalue of largest *magnitude*; near a
  minimum that is the top (positive) eigenvalue :math:`\lambda_{\max}`. The
  residual test catches the case where the Rayleigh quotient is stable but
  wrong: two dominant eigenvalues :math:`\pm\mu` of equal magnitude, between
  whose eigenvectors the iterate swings. Then (and whenever the loop ends
  unconverged) the iterate is split into those two eigenvectors (three more
  HVPs); when the split passes the residual test, :math:`+\mu` (or
  :math:`-\mu`) is returned with ``converged=True``, else the last estimate
  with ``converged=False``. Use `hessian_eigenvalues` for the largest
  algebraic
  ones, or when the gap :math:`|\lambda_1| - |\lambda_2|` is small (power
  iteration converges at the rate :math:`|\lambda_2/\lambda_1|^k`). A zero
  Hessian gives 0 (converged); a NaN loss or Hessian gives a NaN eigenvalue
  and eigenvector with ``converged=False``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * (3. * w[0] ** 2 + w[1] ** 2)  # H = diag(3, 1)
    >>> top = sharpness.hessian_top_eigenvalue(loss_fn, jnp.zeros(2))
    >>> print(f'{top.eigenvalue:.3f}', abs(top.eigenvector).round(3),
    ...       bool(top.converged))
    3.000 [1. 0.] True

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    num_iterations: the most power iterations, >= 1.
    tolerance: relative change of the eigenvalue at which to stop, >= 0
      (0 runs every iteration).

  Returns:
    A `HessianTopEigenvalue` (eigenvalue, eigenvector, num_iterations,
    converged).

  Raises:
    ValueError: num_iterations < 1; tolerance < 0.

  References:
    Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
    <https://arxiv.org/abs/1912.07145>`_, 2020; Foret et al., `SAM
    <https://arxiv.org/abs/2010.01412>`_ (section 4.2), ICLR 2021.
  """
  owner = 'hessian_top_eigenvalue'
  num_iterations = validation.check_static_int(
      owner, 'num_iterations', num_iterations, 1)
  validation.check_number(owner, 'tolerance', tolerance)
  op = operator_lib.make(owner, loss_fn, params, loss_kwargs, batches, has_aux,
                 curvature, layout, unroll)
  key = checks.resolve_key(key)
  v0 = operator_lib.unit(jax.random.normal(key, (op.size,), jnp.float32))
  v, eigenvalue, steps, converged = _power_iteration(
      op, v0, num_iterations, jnp.asarray(tolerance, jnp.float32), op.unroll)
  return HessianTopEigenvalue(
      eigenvalue=eigenvalue, eigenvector=op.unravel(v), num_iterations=steps,
      converged=converged)
