"""The k extreme curvature eigenvalues by Lanczos with full reorthogonalization."""

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

def lanczos(
    matvec: Callable[[jax.Array], jax.Array],
    start: jax.Array,
    num_steps: int,
    key: jax.Array,
    unroll: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
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
  basis = basis.at[0].set(operator_lib.unit(start.astype(jnp.float32)))
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
    beta = operator_lib.norm(w)
    scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
    invariant = beta <= 1e-5 * scale

    def restart():
      fresh = orthogonalize(
          jax.random.normal(jax.random.fold_in(key, i), (n,), jnp.float32),
          basis)
      return operator_lib.unit(orthogonalize(operator_lib.unit(fresh), basis))

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


def tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
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


@compiled.reuse_compiled
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

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    k: how many eigenvalues, 1 <= k <= n (the number of parameters).
    num_iterations: Lanczos steps m, k <= m <= n; default
      ``min(n, max(4 k, 40))``.
    which: ``'largest'`` (algebraic), ``'smallest'`` (algebraic) or
      ``'magnitude'`` (largest absolute value).

  Returns:
    A `HessianEigenvalues` (eigenvalues, eigenvectors, residuals).

  Raises:
    ValueError: k < 1 or k > n; which not 'largest', 'smallest' or 'magnitude';
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
  op = operator_lib.make(owner, loss_fn, params, loss_kwargs, batches, has_aux,
                 curvature, layout, unroll)
  n = op.size
  num_iterations = _krylov_size(owner, k, num_iterations, n)
  key = checks.resolve_key(key)
  start_key, restart_key = jax.random.split(key)
  start = jax.random.normal(start_key, (n,), jnp.float32)
  alphas, betas, basis, residual_norm = lanczos(op, start, num_iterations,
                                                restart_key, op.unroll)
  ritz_values, ritz_coords = jnp.linalg.eigh(tridiagonal(alphas, betas))
  order = _ritz_order(ritz_values, which)[:k]
  vectors = (basis.T @ ritz_coords[:, order]).T  # (k, n)
  return HessianEigenvalues(
      eigenvalues=ritz_values[order],
      eigenvectors=jax.vmap(op.unravel)(vectors),
      residuals=jnp.abs(residual_norm * ritz_coords[-1, order]),
  )
