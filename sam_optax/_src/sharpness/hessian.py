"""The Hessian spectrum through Hessian-vector products.

Every quantity here uses only :math:`v \\mapsto H v`, computed by
forward-over-reverse differentiation (`jax.jvp` of `jax.grad`) at about the
cost of two gradients; the Hessian itself is never formed. Vectors live as
flat float32 arrays (`jax.flatten_util.ravel_pytree`), so norms, dot products
and the Lanczos basis are float32 whatever the parameters' dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
from jax import flatten_util
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.sharpness import blocks
from sam_optax._src.sharpness import curvature as curvature_lib
from sam_optax._src.sharpness import loops
from sam_optax._src.sharpness import objective as objective_lib

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]


class _FlatOperator:
  """x -> H x on flat float32 vectors of length n."""

  def __init__(self, obj: objective_lib.Objective, params: PyTree,
               curvature: Any = None):
    wide = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    flat, self.unravel = flatten_util.ravel_pytree(wide)
    self.size = int(flat.shape[0])
    self._obj = obj
    self._params = params
    self._curvature = curvature

  def __call__(self, x: jax.Array) -> jax.Array:
    hv = self._obj.curvature_product(self._params, self.unravel(x),
                                     self._curvature)
    return flatten_util.ravel_pytree(
        jax.tree.map(lambda v: v.astype(jnp.float32), hv)
    )[0]


def _operator(owner, loss_fn, params, loss_kwargs, batches, has_aux,
              curvature='hessian', layout=None, unroll=False):
  """The flat operator; ``op.unroll`` is the resolved loop form."""
  loops.check_unroll(owner, unroll)
  curvature = curvature_lib.check_curvature(owner, curvature)
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  op = _FlatOperator(obj, params, curvature)
  if op.size == 0:
    raise ValueError(f'{owner}: params has no entries; there is no Hessian.')
  # Decided on the compact form (the scan over batches= included), then the
  # objective's scan follows the choice.
  op.unroll = loops.resolve(unroll, op, op.size)
  obj.unroll = op.unroll
  return op


def norm(x: jax.Array) -> jax.Array:
  """The 2-norm of a flat float32 vector, finite whenever the norm fits.

  Scaled by the largest entry before squaring: squares of entries above
  ~1.8e19 overflow float32 even where the norm itself is representable.
  """
  largest = jnp.max(jnp.abs(x), initial=0.0)
  return largest * jnp.linalg.norm(x * tree_math.safe_inverse(largest))


def _unit(x: jax.Array) -> jax.Array:
  return x * tree_math.safe_inverse(norm(x))


def hessian_vector_product(
    loss_fn: Callable[..., Any],
    params: PyTree,
    vector: PyTree,
    *,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
) -> PyTree:
  r"""The Hessian-vector product :math:`H(w)\,v`, without forming H.

  .. math::

    H v = \frac{\partial}{\partial t} \nabla L(w + t v) \Big|_{t=0},

  one `jax.jvp` (forward mode) of `jax.grad` (reverse mode): about two
  gradients of cost and one gradient of memory.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: w[0] ** 2 * w[1]  # H = [[2 w1, 2 w0], [2 w0, 0]]
    >>> hv = sharpness.hessian_vector_product(
    ...     loss_fn, jnp.array([1., 2.]), jnp.array([1., 0.]))
    >>> print(hv)
    [4. 2.]

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss.
    params: the weights w.
    vector: v, a pytree like params.
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
    :math:`H v`, a pytree like params; NaN when L(w) is NaN or infinite.

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux`` (the message names ``has_aux=True`` or
      ``has_aux=False``), or that returns a dict (e.g. ``jax.grad(loss_fn)``
      passed by mistake).
    TypeError: a complex or integer vector.
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``;
      a vector whose structure differs from params.

  References:
    Pearlmutter, `Fast Exact Multiplication by the Hessian
    <https://doi.org/10.1162/neco.1994.6.1.147>`_, Neural Computation 1994.
  """
  owner = 'hessian_vector_product'
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  objective_lib.check_params(owner, vector, 'vector')
  if jax.tree.structure(vector) != jax.tree.structure(params):
    raise ValueError(
        f'{owner}: vector must have the structure of params:'
        f' {jax.tree.structure(vector)} vs {jax.tree.structure(params)}.')
  return obj.hvp(params, vector)


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


def _rayleigh(op: _FlatOperator, v: jax.Array):
  """(H v, v^T H v, ||H v - (v^T H v) v||) for a unit v."""
  hv = op(v)
  eigenvalue = jnp.vdot(v, hv)
  return hv, eigenvalue, norm(hv - eigenvalue * v)


def _power_iteration(op: _FlatOperator, v0: jax.Array, num_iterations: int,
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
    hv_norm = norm(hv)
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


def _opposite_pair(op: _FlatOperator, v: jax.Array, residual_tol: jax.Array):
  """After no convergence: split an iterate swinging between +mu and -mu.

  If v spans the eigenvectors of +mu and -mu, then u = H v / mu flips the
  sign of the -mu component, so v + u and v - u are the two eigenvectors.
  The first of them (+mu first) that passes the residual test with an
  eigenvalue of magnitude mu is returned with converged=True; otherwise v
  and its Rayleigh quotient, with converged=False. Costs three HVPs.
  """
  hv = op(v)
  mu = norm(hv)
  u = hv * tree_math.safe_inverse(mu)

  def check(candidate):
    candidate = _unit(candidate)
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

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss.
    params: the weights w (real floating-point leaves; complex ones are a
      TypeError).
    num_iterations: the most power iterations, >= 1.
    tolerance: relative change of the eigenvalue at which to stop, >= 0
      (0 runs every iteration).
    key: PRNG key for the start vector (default: a fixed key).
    loss_kwargs: a dict of keyword arguments of ``loss_fn`` (shared ones
      with ``batches``).
    batches: an iterable of ``loss_kwargs`` dicts (the dataset loss).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; a mismatch is a
      TypeError naming ``has_aux``.

    curvature: the matrix C whose spectrum is measured: ``'hessian'``
      (the default), `GGN` (``sharpness.GGN(apply_fn, output_loss)``,
      :math:`J^\top H_{\text{out}} J`, PSD) or `EmpiricalFisher`
      (``sharpness.EmpiricalFisher(per_example_loss)``); H below is then C;
      anything else is a ValueError.
    layout: where the batch lies: ``None`` (on this device), or
      ``sam_optax.PerDevice(axis)`` inside `jax.pmap` / `jax.shard_map` with
      the batch sharded over ``axis`` (the measurement is that of the global
      batch, identical on every device: one all-reduce per loss, gradient
      or curvature product), or ``sam_optax.Chunks(m, shared=True)`` (the
      batch accumulated over chunks of m examples, memory of one chunk).
    select: which leaves' curvature block to measure (SAM-ON's
      ``perturbation_mask`` forms: a pytree of bools like params, a
      function ``params -> pytree of bools``, or a predicate
      ``(path, leaf) -> bool``): the helper measures the diagonal block
      :math:`C_{SS}` of the selected leaves S, the others held fixed; vectors
      in the result are like params, zero outside S. None: every leaf.
    per_leaf: measure each selected leaf's own diagonal block in one call
      and return a pytree like params whose selected leaves hold that
      leaf's result (unselected ones None); vectors there are like the leaf.
    unroll: how the loop over curvature products is compiled: ``False``, a
      `jax.lax` loop (compact; compile time independent of the count);
      ``True``, a Python loop traced into the program (all ``num_iterations``
      steps run, the state frozen by `jnp.where` after the stop;
      ``num_iterations`` in the result is still the step at which it stopped);
      ``None`` (the default), ``True`` exactly when the default backend is CPU
      and one product contains a convolution (``lax.conv_general_dilated`` in
      its jaxpr), since XLA:CPU runs a convolution in a loop body 10-40x
      slower (https://github.com/jax-ml/jax/issues/12868); matmul models and
      GPU / TPU keep the loop. Unrolled, compile time grows with the count
      (``num_iterations=100`` traces 103 HVPs): lower it, or pass
      ``unroll=False``, when compiling dominates. Both forms agree up to
      rounding; a value that is not None or a bool is a TypeError.
  Returns:
    A `HessianTopEigenvalue` (eigenvalue, eigenvector, num_iterations,
    converged).

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux`` (the message names ``has_aux=True`` or
      ``has_aux=False``), or that returns a dict (e.g. ``jax.grad(loss_fn)``
      passed by mistake).
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``;
      num_iterations < 1; tolerance < 0.

  References:
    Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
    <https://arxiv.org/abs/1912.07145>`_, 2020; Foret et al., `SAM
    <https://arxiv.org/abs/2010.01412>`_ (section 4.2), ICLR 2021.
  """
  owner = 'hessian_top_eigenvalue'
  num_iterations = validation.check_static_int(
      owner, 'num_iterations', num_iterations, 1)
  validation.check_number(owner, 'tolerance', tolerance)
  op = _operator(owner, loss_fn, params, loss_kwargs, batches, has_aux,
                 curvature, layout, unroll)
  key = objective_lib.resolve_key(key)
  v0 = _unit(jax.random.normal(key, (op.size,), jnp.float32))
  v, eigenvalue, steps, converged = _power_iteration(
      op, v0, num_iterations, jnp.asarray(tolerance, jnp.float32), op.unroll)
  return HessianTopEigenvalue(
      eigenvalue=eigenvalue, eigenvector=op.unravel(v), num_iterations=steps,
      converged=converged)


def lanczos(
    matvec: Callable[[jax.Array], jax.Array],
    start: jax.Array,
    num_steps: int,
    key: jax.Array,
    unroll: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Lanczos tridiagonalization with full reorthogonalization.

  Args:
    matvec: x -> A x for a symmetric A on flat float32 vectors of length n.
    start: the start vector (normalized here).
    num_steps: m <= n, the size of the Krylov basis.
    key: PRNG key for restart vectors: when the Krylov space becomes
      invariant (beta ~ 0), the basis continues with a random vector
      orthogonal to it and a zero off-diagonal, so the tridiagonal matrix
      stays exact (block diagonal) instead of filling with spurious zeros.
    unroll: a Python loop with static indices instead of `lax.fori_loop`
      (`loops.fori`): fast convolutions on XLA:CPU, compile time growing
      with num_steps.

  Returns:
    (alphas (m,), betas (m - 1,), basis (m, n), residual_norm): the
    tridiagonal matrix T = V A V^T with diagonal alphas and off-diagonal
    betas, V, and beta_m, the norm of the part of A v_m outside the basis:
    the Ritz pair (theta_i, V^T s_i) has the residual |beta_m s_i[m-1]|.
  """
  n = start.shape[0]
  basis = jnp.zeros((num_steps, n), jnp.float32)
  basis = basis.at[0].set(_unit(start.astype(jnp.float32)))
  alphas = jnp.zeros((num_steps,), jnp.float32)
  betas = jnp.zeros((max(num_steps - 1, 0),), jnp.float32)

  def orthogonalize(x, basis):
    for _ in range(2):  # twice is enough (Parlett's "twice is enough").
      x = x - basis.T @ (basis @ x)
    return x

  def body(i, state):
    basis, alphas, betas, scale, residual_norm = state
    v = basis[i]
    w = matvec(v)
    alpha = jnp.vdot(v, w)
    w = orthogonalize(w, basis)
    beta = norm(w)
    scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
    invariant = beta <= 1e-5 * scale

    def restart():
      fresh = orthogonalize(
          jax.random.normal(jax.random.fold_in(key, i), (n,), jnp.float32),
          basis)
      return _unit(orthogonalize(_unit(fresh), basis))

    nxt = jax.lax.cond(invariant, restart,
                       lambda: w * tree_math.safe_inverse(beta))
    last = i + 1 >= num_steps
    index = jnp.minimum(i + 1, num_steps - 1)
    # Row updates only (a select over the whole basis would copy it).
    basis = basis.at[index].set(jnp.where(last, basis[index], nxt))
    alphas = alphas.at[i].set(alpha)
    if num_steps > 1:
      beta_index = jnp.minimum(i, num_steps - 2)
      beta_value = jnp.where(invariant, 0.0, beta)
      betas = betas.at[beta_index].set(
          jnp.where(last, betas[beta_index], beta_value))
    residual_norm = jnp.where(last, beta, residual_norm)
    return basis, alphas, betas, scale, residual_norm

  zero = jnp.zeros([], jnp.float32)
  basis, alphas, betas, _, residual_norm = loops.fori(
      0, num_steps, body, (basis, alphas, betas, zero, zero), unroll)
  return alphas, betas, basis, residual_norm


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
  return jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)


class HessianEigenvalues(NamedTuple):
  r"""Result of `hessian_eigenvalues`.

  Attributes:
    eigenvalues: the k eigenvalues (Ritz values), shape (k,), sorted as
      selected by ``which`` (largest first for 'largest' and 'magnitude').
    eigenvectors: the Ritz vectors, a float32 pytree like params whose leaves
      have a leading axis of size k.
    residuals: :math:`\|H y_i - \theta_i y_i\|_2` of each Ritz pair, shape
      (k,): some eigenvalue of H lies within it of :math:`\theta_i` (within
      residual^2 / gap once converged); ~0 with a full basis.
  """

  eigenvalues: jax.Array
  eigenvectors: PyTree
  residuals: jax.Array


def _krylov_size(owner: str, k: int, num_iterations, n: int) -> int:
  """The checked Lanczos size m, k <= m <= n (default min(n, max(4k, 40)))."""
  if k > n:
    raise ValueError(
        f'{owner}: k={k} is larger than the number of parameters n={n}; the'
        f' Hessian has only {n} eigenvalues. Ask for k <= {n}.'
    )
  if num_iterations is None:
    num_iterations = min(n, max(4 * k, 40))
  num_iterations = validation.check_static_int(
      owner, 'num_iterations', num_iterations, k)
  if num_iterations > n:
    raise ValueError(
        f'{owner}: num_iterations={num_iterations} exceeds the number of'
        f' parameters n={n}; the Krylov space has at most n dimensions. Use'
        f' num_iterations <= {n}.'
    )
  return num_iterations


def _ritz_order(ritz_values: jax.Array, which: str) -> jax.Array:
  """Indices of the Ritz values in ``which`` order (+mu before -mu)."""
  if which == 'largest':
    return jnp.argsort(-ritz_values)
  if which == 'smallest':
    return jnp.argsort(ritz_values)
  return jnp.lexsort((-ritz_values, -jnp.abs(ritz_values)))


@blocks.selectable
def hessian_eigenvalues(
    loss_fn: Callable[..., Any],
    params: PyTree,
    k: int,
    *,
    num_iterations: Optional[int] = None,
    which: str = 'largest',
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
    curvature: Any = 'hessian',
    unroll: Optional[bool] = None,
    select: Any = None,  # select and per_leaf: see blocks.selectable
    per_leaf: bool = False,
) -> HessianEigenvalues:
  r"""The k extreme Hessian eigenvalues by Lanczos with full reorthogonalization.

  m Lanczos steps build an orthonormal basis :math:`V \in \mathbb{R}^{m \times
  n}` of the Krylov space of a random start vector and the tridiagonal
  :math:`T = V H V^\top`; the eigenvalues of T (Ritz values) approximate the
  extreme eigenvalues of H, exactly when m = n. Every new Lanczos vector is
  reorthogonalized against the whole basis (twice), so no ghost copies of
  converged eigenvalues appear; the cost is m HVPs and :math:`O(m n)` memory.
  Each Ritz pair comes with its residual :math:`\|H y - \theta y\|_2 =
  |\beta_m s_m|` (free: the last Lanczos coefficient times the last entry of
  the Ritz coordinates), the check that a partial basis has converged;
  eigenvalues of equal magnitude and opposite sign (:math:`\pm\mu`) are two
  Ritz values here, not a failure as in power iteration. A NaN loss or
  Hessian gives NaN eigenvalues, eigenvectors and residuals.

  .. math::

    \lambda_1 \ge \dots \ge \lambda_k: \text{the top } k
    \text{ eigenvalues of } T_m = V_m H V_m^\top.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.arange(1., 6.) * w ** 2)
    >>> out = sharpness.hessian_eigenvalues(loss_fn, jnp.zeros(5), k=2)
    >>> print(out.eigenvalues.round(3), bool(out.residuals.max() < 1e-4))
    [5. 4.] True

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss.
    params: the weights w.
    k: how many eigenvalues, 1 <= k <= n (the number of parameters).
    num_iterations: Lanczos steps m, k <= m <= n; default
      ``min(n, max(4 k, 40))``.
    which: ``'largest'`` (algebraic), ``'smallest'`` (algebraic) or
      ``'magnitude'`` (largest absolute value).
    key: PRNG key for the start vector (default: a fixed key).
    loss_kwargs: keyword arguments of ``loss_fn`` (shared ones with
      ``batches``).
    batches: an iterable of ``loss_kwargs`` dicts (the dataset loss).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    curvature: the matrix C whose spectrum is measured: ``'hessian'``
      (the default), `GGN` (``sharpness.GGN(apply_fn, output_loss)``,
      :math:`J^\top H_{\text{out}} J`, PSD) or `EmpiricalFisher`
      (``sharpness.EmpiricalFisher(per_example_loss)``); H below is then C;
      anything else is a ValueError.
    layout: where the batch lies: ``None`` (on this device), or
      ``sam_optax.PerDevice(axis)`` inside `jax.pmap` / `jax.shard_map` with
      the batch sharded over ``axis`` (the measurement is that of the global
      batch, identical on every device: one all-reduce per loss, gradient
      or curvature product), or ``sam_optax.Chunks(m, shared=True)`` (the
      batch accumulated over chunks of m examples, memory of one chunk).
    select: which leaves' curvature block to measure (SAM-ON's
      ``perturbation_mask`` forms: a pytree of bools like params, a
      function ``params -> pytree of bools``, or a predicate
      ``(path, leaf) -> bool``): the helper measures the diagonal block
      :math:`C_{SS}` of the selected leaves S, the others held fixed; vectors
      in the result are like params, zero outside S. None: every leaf.
    per_leaf: measure each selected leaf's own diagonal block in one call
      and return a pytree like params whose selected leaves hold that
      leaf's result (unselected ones None); vectors there are like the leaf.
    unroll: how the loop over curvature products is compiled: ``False``, a
      `jax.lax` loop (compact; compile time independent of the count);
      ``True``, a Python loop traced into the program (the Lanczos steps with
      static indices); ``None`` (the default), ``True`` exactly when the
      default backend is CPU and one product contains a convolution
      (``lax.conv_general_dilated`` in its jaxpr), since XLA:CPU runs a
      convolution in a loop body 10-40x slower
      (https://github.com/jax-ml/jax/issues/12868); matmul models and GPU /
      TPU keep the loop. Unrolled, compile time grows with the count
      (``num_iterations`` HVPs, e.g. 100 for ``num_iterations=100``): lower
      it, or pass ``unroll=False``, when compiling dominates. Both forms agree
      up to rounding; a value that is not None or a bool is a TypeError.
  Returns:
    A `HessianEigenvalues` (eigenvalues, eigenvectors, residuals).

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux`` (the message names ``has_aux=True`` or
      ``has_aux=False``), or that returns a dict (e.g. ``jax.grad(loss_fn)``
      passed by mistake).
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``;
      k < 1 or k > n; which not 'largest', 'smallest' or 'magnitude';
      num_iterations < k or > n.

  References:
    Lanczos, `An iteration method for the solution of the eigenvalue problem
    <https://doi.org/10.6028/jres.045.026>`_, 1950; Ghorbani et al.,
    `An Investigation into Neural Net Optimization via Hessian Eigenvalue
    Density <https://arxiv.org/abs/1901.10159>`_, ICML 2019.
  """
  owner = 'hessian_eigenvalues'
  k = validation.check_static_int(owner, 'k', k, 1)
  if which not in ('largest', 'smallest', 'magnitude'):
    raise ValueError(
        f"{owner}: which must be 'largest', 'smallest' or 'magnitude', got"
        f' {which!r}.'
    )
  op = _operator(owner, loss_fn, params, loss_kwargs, batches, has_aux,
                 curvature, layout, unroll)
  n = op.size
  num_iterations = _krylov_size(owner, k, num_iterations, n)
  key = objective_lib.resolve_key(key)
  start_key, restart_key = jax.random.split(key)
  start = jax.random.normal(start_key, (n,), jnp.float32)
  alphas, betas, basis, residual_norm = lanczos(op, start, num_iterations,
                                                restart_key, op.unroll)
  ritz_values, ritz_coords = jnp.linalg.eigh(_tridiagonal(alphas, betas))
  order = _ritz_order(ritz_values, which)[:k]
  vectors = (basis.T @ ritz_coords[:, order]).T  # (k, n)
  return HessianEigenvalues(
      eigenvalues=ritz_values[order],
      eigenvectors=jax.vmap(op.unravel)(vectors),
      residuals=jnp.abs(residual_norm * ritz_coords[-1, order]),
  )


class HessianTrace(NamedTuple):
  """Result of `hessian_trace`.

  Attributes:
    trace: the estimate of tr(H) (Hutchinson or Hutch++), float32.
    standard_error: its standard error: sample std / sqrt(number of
      Hutchinson probes); for Hutch++ that of the probes of the deflated
      part (the low-rank part is exact given the sketch).
  """

  trace: jax.Array
  standard_error: jax.Array


def _mean_and_error(samples: jax.Array):
  """(mean, sample std / sqrt(N)) of a 1-D array; error 0 for N = 1."""
  count = samples.shape[0]
  mean = jnp.mean(samples)
  if count == 1:
    return mean, jnp.zeros([], jnp.float32)
  variance = jnp.sum(jnp.square(samples - mean)) / (count - 1)
  return mean, jnp.sqrt(variance / count)


def _hutchinson(op: _FlatOperator, key: jax.Array, num_samples: int):
  def probe(probe_key):
    v = jax.random.rademacher(probe_key, (op.size,), jnp.float32)
    return jnp.vdot(v, op(v))

  return _mean_and_error(
      loops.map(probe, jax.random.split(key, num_samples), op.unroll))


def _hutch_plus_plus(op: _FlatOperator, key: jax.Array, num_samples: int):
  """Hutch++: k = N // 3 sketch HVPs, k for tr(Q^T H Q), N - 2k probes."""
  k = min(num_samples // 3, op.size)
  sketch_key, probe_key = jax.random.split(key)
  sketch = jax.random.rademacher(sketch_key, (k, op.size), jnp.float32)
  q, _ = jnp.linalg.qr(loops.map(op, sketch, op.unroll).T)  # (n, k)
  low_rank = jnp.sum(q * loops.map(op, q.T, op.unroll).T)  # tr(Q^T H Q)
  num_probes = num_samples - 2 * k

  def probe(one_key):
    g = jax.random.rademacher(one_key, (op.size,), jnp.float32)
    g = g - q @ (q.T @ g)  # (I - Q Q^T) g
    return jnp.vdot(g, op(g))

  rest, error = _mean_and_error(
      loops.map(probe, jax.random.split(probe_key, num_probes), op.unroll))
  return low_rank + rest, error


_TRACE_METHODS = {'hutchinson': (_hutchinson, 1), 'hutch++': (
    _hutch_plus_plus, 3)}


@blocks.selectable
def hessian_trace(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *,
    num_samples: int = 64,
    method: str = 'hutchinson',
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
    curvature: Any = 'hessian',
    unroll: Optional[bool] = None,
    select: Any = None,  # select and per_leaf: see blocks.selectable
    per_leaf: bool = False,
) -> HessianTrace:
  r"""The Hessian trace by Hutchinson's estimator or by Hutch++.

  ``method='hutchinson'`` (the default) averages N Rademacher probes:

  .. math::

    \mathrm{tr}(H) = \mathbb{E}_v\left[v^\top H v\right]
      \approx \frac{1}{N} \sum_{i=1}^{N} v_i^\top H v_i,
    \qquad v_i \in \{-1, +1\}^n \text{ uniform},

  unbiased, with variance :math:`2(\|H\|_F^2 - \sum_j H_{jj}^2)` per probe
  (the smallest of any i.i.d. probe distribution). One HVP per probe.

  ``method='hutch++'`` spends the same N HVPs differently: with
  :math:`k = \lfloor N/3 \rfloor` (at most n), a Rademacher sketch
  :math:`S \in \mathbb{R}^{n \times k}`, :math:`Q = \mathrm{orth}(H S)`, and
  :math:`N - 2k` Rademacher probes :math:`g_i`,

  .. math::

    \mathrm{tr}(H) \approx \mathrm{tr}(Q^\top H Q) + \frac{1}{N - 2k}
      \sum_i g_i^\top (I - QQ^\top) H (I - QQ^\top) g_i,

  unbiased; the top of the spectrum is taken exactly and only the deflated
  rest is sampled, so on a decaying spectrum the error falls like 1/N
  instead of :math:`1/\sqrt{N}` (it needs N >= 3; with 3k >= 3n it is
  exact).

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.arange(1., 5.) * w ** 2)
    >>> out = sharpness.hessian_trace(loss_fn, jnp.zeros(4), num_samples=8)
    >>> print(f'{out.trace:.3f} {out.standard_error:.3f}')  # diagonal: exact
    10.000 0.000
    >>> out = sharpness.hessian_trace(loss_fn, jnp.zeros(4), num_samples=12,
    ...                               method='hutch++')  # k = n: exact
    >>> print(f'{out.trace:.3f}')
    10.000

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss.
    params: the weights w.
    num_samples: the HVP budget N, >= 1 (>= 3 for Hutch++).
    method: ``'hutchinson'`` or ``'hutch++'``.
    key: PRNG key for the probes (default: a fixed key).
    loss_kwargs: keyword arguments of ``loss_fn`` (shared ones with
      ``batches``).
    batches: an iterable of ``loss_kwargs`` dicts (the dataset loss).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    curvature: the matrix C whose spectrum is measured: ``'hessian'``
      (the default), `GGN` (``sharpness.GGN(apply_fn, output_loss)``,
      :math:`J^\top H_{\text{out}} J`, PSD) or `EmpiricalFisher`
      (``sharpness.EmpiricalFisher(per_example_loss)``); H below is then C;
      anything else is a ValueError.
    layout: where the batch lies: ``None`` (on this device), or
      ``sam_optax.PerDevice(axis)`` inside `jax.pmap` / `jax.shard_map` with
      the batch sharded over ``axis`` (the measurement is that of the global
      batch, identical on every device: one all-reduce per loss, gradient
      or curvature product), or ``sam_optax.Chunks(m, shared=True)`` (the
      batch accumulated over chunks of m examples, memory of one chunk).
    select: which leaves' curvature block to measure (SAM-ON's
      ``perturbation_mask`` forms: a pytree of bools like params, a
      function ``params -> pytree of bools``, or a predicate
      ``(path, leaf) -> bool``): the helper measures the diagonal block
      :math:`C_{SS}` of the selected leaves S, the others held fixed; vectors
      in the result are like params, zero outside S. None: every leaf.
    per_leaf: measure each selected leaf's own diagonal block in one call
      and return a pytree like params whose selected leaves hold that
      leaf's result (unselected ones None); vectors there are like the leaf.
    unroll: how the loop over curvature products is compiled: ``False``, a
      `jax.lax` loop (compact; compile time independent of the count);
      ``True``, a Python loop traced into the program (the probes one after
      another); ``None`` (the default), ``True`` exactly when the default
      backend is CPU and one product contains a convolution
      (``lax.conv_general_dilated`` in its jaxpr), since XLA:CPU runs a
      convolution in a loop body 10-40x slower
      (https://github.com/jax-ml/jax/issues/12868); matmul models and GPU /
      TPU keep the loop. Unrolled, compile time grows with the count
      (``num_samples`` HVPs, 64 by default): lower it, or pass
      ``unroll=False``, when compiling dominates. Both forms agree up to
      rounding; a value that is not None or a bool is a TypeError.
  Returns:
    A `HessianTrace` (trace, standard_error); NaN when L(w) or the Hessian
    is NaN.

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux`` (the message names ``has_aux=True`` or
      ``has_aux=False``), or that returns a dict (e.g. ``jax.grad(loss_fn)``
      passed by mistake).
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``;
      num_samples < 1 (< 3 for Hutch++); method not 'hutchinson' or
      'hutch++'.

  References:
    Hutchinson, `A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines
    <https://doi.org/10.1080/03610919008812866>`_, 1990; Meyer et al.,
    `Hutch++: Optimal Stochastic Trace Estimation
    <https://arxiv.org/abs/2010.09649>`_, SOSA 2021; Yao et al.,
    `PyHessian <https://arxiv.org/abs/1912.07145>`_, 2020.
  """
  owner = 'hessian_trace'
  if method not in _TRACE_METHODS:
    raise ValueError(
        f"{owner}: method must be 'hutchinson' or 'hutch++', got {method!r}.")
  estimate, minimum = _TRACE_METHODS[method]
  num_samples = validation.check_static_int(owner, 'num_samples', num_samples, 1)
  if num_samples < minimum:
    raise ValueError(
        f"{owner}: method='hutch++' needs num_samples >= 3 (a sketch, its"
        f' product and one probe), got {num_samples}; raise num_samples or'
        " use method='hutchinson'.")
  op = _operator(owner, loss_fn, params, loss_kwargs, batches, has_aux,
                 curvature, layout, unroll)
  trace, error = estimate(op, objective_lib.resolve_key(key), num_samples)
  return HessianTrace(trace=trace, standard_error=error)


class SpectralDensity(NamedTuple):
  """Result of `hessian_spectral_density`.

  Attributes:
    grid: eigenvalue grid t, shape (grid_size,).
    density: the smoothed spectral density at the grid points, integrating
      to about 1 over the grid.
    nodes: Gauss quadrature nodes (Ritz values), shape (num_probes, m).
    weights: their weights, shape (num_probes, m); each row sums to 1. The
      moments of the spectrum are
      ``mean(sum(weights * nodes ** j, axis=1)) ~ tr(H^j) / n``.
  """

  grid: jax.Array
  density: jax.Array
  nodes: jax.Array
  weights: jax.Array


@blocks.selectable
def hessian_spectral_density(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *,
    num_lanczos: int = 32,
    num_probes: int = 4,
    grid_size: int = 512,
    bandwidth: float = 0.01,
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
    curvature: Any = 'hessian',
    unroll: Optional[bool] = None,
    select: Any = None,  # select and per_leaf: see blocks.selectable
    per_leaf: bool = False,
) -> SpectralDensity:
  r"""The Hessian eigenvalue density by stochastic Lanczos quadrature.

  The spectral density :math:`\phi(t) = \frac{1}{n}\sum_i \delta(t -
  \lambda_i)` is smoothed with a Gaussian kernel :math:`g_s` and estimated
  from ``num_probes`` random unit vectors :math:`v` (normalized Rademacher),
  each run through m Lanczos steps; the eigenpairs
  :math:`(\theta_j, u_j)` of the tridiagonal matrix give Gauss quadrature
  nodes :math:`\theta_j` and weights :math:`\tau_j = u_j[0]^2`:

  .. math::

    \hat\phi(t) = \frac{1}{P} \sum_{p=1}^{P} \sum_{j=1}^{m}
      \tau^{(p)}_j\, g_s(t - \theta^{(p)}_j), \qquad
    \mathbb{E}\Big[\sum_j \tau_j \theta_j^{\,q}\Big]
      = \frac{\mathrm{tr}(H^q)}{n} \quad (q < 2m).

  The kernel width is ``s = bandwidth * (max theta - min theta)``; the grid
  spans the nodes with a margin of 5 s. Costs ``num_probes * num_lanczos``
  HVPs (probes run one after another: `jax.lax.map`, or a Python loop with
  ``unroll``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.arange(1., 9.) * w ** 2)
    >>> out = sharpness.hessian_spectral_density(
    ...     loss_fn, jnp.zeros(8), num_lanczos=8, grid_size=200)
    >>> mean = (out.weights * out.nodes).sum(axis=1).mean()  # tr(H) / n
    >>> print(f'{mean:.3f}', out.grid.shape, out.density.shape)
    4.500 (200,) (200,)

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss.
    params: the weights w.
    num_lanczos: Lanczos steps per probe m, 1 <= m <= n (clipped to n).
    num_probes: random start vectors P, >= 1.
    grid_size: number of grid points, >= 2.
    bandwidth: kernel width relative to the width of the spectrum, > 0.
    key: PRNG key for the probes (default: a fixed key).
    loss_kwargs: keyword arguments of ``loss_fn`` (shared ones with
      ``batches``).
    batches: an iterable of ``loss_kwargs`` dicts (the dataset loss).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    curvature: the matrix C whose spectrum is measured: ``'hessian'``
      (the default), `GGN` (``sharpness.GGN(apply_fn, output_loss)``,
      :math:`J^\top H_{\text{out}} J`, PSD) or `EmpiricalFisher`
      (``sharpness.EmpiricalFisher(per_example_loss)``); H below is then C;
      anything else is a ValueError.
    layout: where the batch lies: ``None`` (on this device), or
      ``sam_optax.PerDevice(axis)`` inside `jax.pmap` / `jax.shard_map` with
      the batch sharded over ``axis`` (the measurement is that of the global
      batch, identical on every device: one all-reduce per loss, gradient
      or curvature product), or ``sam_optax.Chunks(m, shared=True)`` (the
      batch accumulated over chunks of m examples, memory of one chunk).
    select: which leaves' curvature block to measure (SAM-ON's
      ``perturbation_mask`` forms: a pytree of bools like params, a
      function ``params -> pytree of bools``, or a predicate
      ``(path, leaf) -> bool``): the helper measures the diagonal block
      :math:`C_{SS}` of the selected leaves S, the others held fixed; vectors
      in the result are like params, zero outside S. None: every leaf.
    per_leaf: measure each selected leaf's own diagonal block in one call
      and return a pytree like params whose selected leaves hold that
      leaf's result (unselected ones None); vectors there are like the leaf.
    unroll: how the loop over curvature products is compiled: ``False``, a
      `jax.lax` loop (compact; compile time independent of the count);
      ``True``, a Python loop traced into the program (the probes and their
      Lanczos steps); ``None`` (the default), ``True`` exactly when the
      default backend is CPU and one product contains a convolution
      (``lax.conv_general_dilated`` in its jaxpr), since XLA:CPU runs a
      convolution in a loop body 10-40x slower
      (https://github.com/jax-ml/jax/issues/12868); matmul models and GPU /
      TPU keep the loop. Unrolled, compile time grows with the count
      (``num_probes * num_lanczos`` HVPs, 128 by default): lower it, or pass
      ``unroll=False``, when compiling dominates. Both forms agree up to
      rounding; a value that is not None or a bool is a TypeError.
  Returns:
    A `SpectralDensity` (grid, density, nodes, weights); all NaN when L(w)
    or the Hessian is NaN.

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux`` (the message names ``has_aux=True`` or
      ``has_aux=False``), or that returns a dict (e.g. ``jax.grad(loss_fn)``
      passed by mistake).
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``;
      num_lanczos or num_probes < 1; grid_size < 2; bandwidth not a
      finite number > 0.

  References:
    Ghorbani et al., `An Investigation into Neural Net Optimization via
    Hessian Eigenvalue Density <https://arxiv.org/abs/1901.10159>`_,
    ICML 2019; Lin et al., `Approximating Spectral Densities of Large
    Matrices <https://arxiv.org/abs/1308.5467>`_, SIAM Review 2016.
  """
  owner = 'hessian_spectral_density'
  num_lanczos = validation.check_static_int(owner, 'num_lanczos', num_lanczos, 1)
  num_probes = validation.check_static_int(owner, 'num_probes', num_probes, 1)
  grid_size = validation.check_static_int(owner, 'grid_size', grid_size, 2)
  validation.check_number(owner, 'bandwidth', bandwidth, allow_zero=False)
  op = _operator(owner, loss_fn, params, loss_kwargs, batches, has_aux,
                 curvature, layout, unroll)
  m = min(num_lanczos, op.size)
  key = objective_lib.resolve_key(key)

  def one_probe(probe_key):
    start_key, restart_key = jax.random.split(probe_key)
    start = jax.random.rademacher(start_key, (op.size,), jnp.float32)
    alphas, betas, _, _ = lanczos(op, start, m, restart_key, op.unroll)
    nodes, vectors = jnp.linalg.eigh(_tridiagonal(alphas, betas))
    return nodes, jnp.square(vectors[0])

  nodes, weights = loops.map(one_probe, jax.random.split(key, num_probes),
                             op.unroll)
  low, high = jnp.min(nodes), jnp.max(nodes)
  spread = high - low
  width = bandwidth * jnp.where(
      spread > 0, spread, jnp.maximum(jnp.abs(high), 1.0))
  grid = jnp.linspace(low - 5 * width, high + 5 * width, grid_size)
  kernel = jnp.exp(
      -0.5 * jnp.square((grid[:, None, None] - nodes[None]) / width)
  ) / (width * jnp.sqrt(2 * jnp.pi))
  density = jnp.sum(kernel * weights[None], axis=(1, 2)) / num_probes
  return SpectralDensity(grid=grid, density=density, nodes=nodes,
                         weights=weights)
