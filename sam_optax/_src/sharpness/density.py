"""The curvature eigenvalue density by stochastic Lanczos quadrature."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from sam_optax._src.core import validation
from sam_optax._src.sharpness import blocks
from sam_optax._src.sharpness import checks
from sam_optax._src.sharpness import compiled
from sam_optax._src.sharpness import lanczos as lanczos_lib
from sam_optax._src.sharpness import loops
from sam_optax._src.sharpness import operator as operator_lib

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]

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


@compiled.reuse_compiled
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

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    num_lanczos: Lanczos steps per probe m, 1 <= m <= n (clipped to n).
    num_probes: random start vectors P, >= 1.
    grid_size: number of grid points, >= 2.
    bandwidth: kernel width relative to the width of the spectrum, > 0.

  Returns:
    A `SpectralDensity` (grid, density, nodes, weights); all NaN when L(w)
    or the Hessian is NaN.

  Raises:
    ValueError: num_lanczos or num_probes < 1; grid_size < 2; bandwidth not a
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
  op = operator_lib.make(owner, loss_fn, params, loss_kwargs, batches, has_aux,
                 curvature, layout, unroll)
  m = min(num_lanczos, op.size)
  key = checks.resolve_key(key)

  def one_probe(probe_key):
    start_key, restart_key = jax.random.split(probe_key)
    start = jax.random.rademacher(start_key, (op.size,), jnp.float32)
    alphas, betas, _, _ = lanczos_lib.lanczos(op, start, m, restart_key, op.unroll)
    nodes, vectors = jnp.linalg.eigh(lanczos_lib.tridiagonal(alphas, betas))
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
