"""Linear interpolation between two weights, and trajectory PCA planes."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.core
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.sharpness import landscape
from sam_optax._src.sharpness import compiled
from sam_optax._src.sharpness import objective as objective_lib

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]


class Interpolation(NamedTuple):
  """Result of `loss_interpolation`: ``plt.plot(ts, losses)``.

  Attributes:
    ts: the interpolation coefficients t, shape (num_points,), float32.
    losses: :math:`L((1 - t)\\, a + t\\, b)` at each t, float32.
  """

  ts: jax.Array
  losses: jax.Array


def _check_ts(owner: str, ts: Any) -> jax.Array:
  if isinstance(ts, (list, tuple)):
    ts = np.asarray(ts, np.float64)
  if not hasattr(ts, 'shape') or not hasattr(ts, 'dtype'):
    raise TypeError(
        f'{owner}: ts must be a 1-D array of floats (e.g.'
        f' jnp.linspace(-0.5, 1.5, 41)), got {type(ts).__name__}.')
  if jnp.ndim(ts) != 1 or jnp.shape(ts)[0] < 1:
    raise ValueError(
        f'{owner}: ts must be a non-empty 1-D array, got shape'
        f' {jnp.shape(ts)}; pass jnp.ravel(ts) or a list of floats.')
  if jnp.issubdtype(ts.dtype, jnp.complexfloating) or not (
      jnp.issubdtype(ts.dtype, jnp.floating)
      or jnp.issubdtype(ts.dtype, jnp.integer)):
    raise TypeError(f'{owner}: ts must be real numbers, got {ts.dtype}.')
  if not isinstance(ts, jax.core.Tracer) and not np.all(
      np.isfinite(np.asarray(ts, np.float64))):
    raise ValueError(f'{owner}: ts must be finite, got {ts!r}.')
  return jnp.asarray(ts, jnp.float32)


def _between(a: PyTree, b: PyTree, t: jax.Array) -> PyTree:
  """(1 - t) a + t b, in float32, rounded to a's dtype."""
  return jax.tree.map(
      lambda x, y: ((1 - t) * tree_math.wide(x) + t * tree_math.wide(y))
      .astype(x.dtype), a, b)


def loss_interpolation(
    loss_fn: Callable[..., Any],
    params_a: PyTree,
    params_b: PyTree,
    *,
    ts: Optional[Any] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
) -> Interpolation:
  r"""The loss on the straight line through two weights, a and b.

  .. math::

    f(t) = L\big((1 - t)\, a + t\, b\big), \qquad f(0) = L(a),\ f(1) = L(b),

  at every t of ``ts``, inside [0, 1] (between the two) and beyond it
  (extrapolation past either end). A barrier
  :math:`\max_{t \in [0,1]} f(t) - \max(f(0), f(1)) \approx 0` says that a
  and b are linearly connected, e.g. the initialization and the solution of
  one run (Goodfellow et al.) or two solutions (linear mode connectivity).
  The points are mixed in float32 and rounded to ``params_a``'s dtype; they
  are evaluated one after another with `jax.lax.map`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: jnp.sum((w - 1.) ** 2)
    >>> out = sharpness.loss_interpolation(
    ...     loss_fn, jnp.zeros(2), jnp.ones(2), ts=[-1., 0., 0.5, 1., 2.])
    >>> print(out.losses)
    [8.  2.  0.5 0.  2. ]

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    params_a: the weights a (t = 0).
    params_b: the weights b (t = 1), a pytree like params_a.
    ts: a 1-D array (or list) of finite coefficients t; default 41 points
      on [-0.5, 1.5].

  Returns:
    An `Interpolation` (ts, losses); each loss as loss_fn gives it (NaN
    where it is NaN).

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux``, or that returns a dict; ts not real
      numbers.
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``; params_b not like params_a; ts empty, not 1-D or not
      finite.

  References:
    Goodfellow et al., `Qualitatively characterizing neural network
    optimization problems <https://arxiv.org/abs/1412.6544>`_, ICLR 2015;
    Frankle et al., `Linear Mode Connectivity and the Lottery Ticket
    Hypothesis <https://arxiv.org/abs/1912.05671>`_, ICML 2020.
  """
  owner = 'loss_interpolation'
  obj = objective_lib.Objective(
      owner, loss_fn, params_a, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  landscape._check_like(owner, 'params_b', params_b, params_a)  # pylint: disable=protected-access
  ts = (landscape._grid((-0.5, 1.5), 41) if ts is None  # pylint: disable=protected-access
        else _check_ts(owner, ts))
  losses = jax.lax.map(lambda t: obj.loss(_between(params_a, params_b, t)),
                       ts)
  return Interpolation(ts=ts, losses=losses)


class TrajectoryPCA(NamedTuple):
  """Result of `trajectory_pca`.

  Attributes:
    directions: (d1, d2), the unit top-2 PCA directions, float32 pytrees
      like params (orthonormal as flat vectors).
    path: the coordinates of every checkpoint in the plane, shape (T, 2):
      ``path[i] = (<w_i - w_T, d1>, <w_i - w_T, d2>)`` (the final one is
      (0, 0)).
    explained_variance: the fraction of :math:`\\|M\\|_F^2` that each
      direction captures, shape (2,).
    landscape: the `Landscape2D` of :math:`L(w_T + \\alpha d_1 + \\beta
      d_2)` on a grid around the path.
  """

  directions: tuple[PyTree, PyTree]
  path: jax.Array
  explained_variance: jax.Array
  landscape: landscape.Landscape2D


def _flat_checkpoints(owner: str, checkpoints: Any):
  """(M (T, n) float32 rows w_i, unravel, final) from a list of pytrees."""
  if not isinstance(checkpoints, (list, tuple)):
    raise TypeError(
        f'{owner}: checkpoints must be a list of pytrees (w_1, ..., w_T, the'
        f' last one final), got {type(checkpoints).__name__}; pass'
        ' list(checkpoints).')
  if len(checkpoints) < 3:
    raise ValueError(
        f'{owner}: checkpoints must hold at least 3 pytrees (two'
        f' differences w_i - w_T span the plane), got {len(checkpoints)};'
        ' save more checkpoints of the run.')
  final = checkpoints[-1]
  for i, w in enumerate(checkpoints):
    landscape._check_like(owner, f'checkpoints[{i}]', w, final)  # pylint: disable=protected-access
  rows = [flatten_util.ravel_pytree(jax.tree.map(
      lambda p: tree_math.wide(jnp.asarray(p)).astype(jnp.float32), w))
          for w in checkpoints]
  return jnp.stack([r[0] for r in rows]), rows[0][1], final


def _pca_plane(matrix: jax.Array, center: bool):
  """(d1, d2 flat, explained (2,)) of the rows of matrix; signs fixed."""
  data = matrix - jnp.mean(matrix, axis=0) if center else matrix
  _, s, vt = jnp.linalg.svd(data, full_matrices=False)
  directions = vt[:2]
  # Sign: the first checkpoint has a coordinate >= 0 on each direction.
  signs = jnp.where(directions @ matrix[0] < 0, -1.0, 1.0)
  explained = jnp.square(s[:2]) * tree_math.safe_inverse(
      jnp.sum(jnp.square(s)))
  return directions * signs[:, None], explained


def _around(coords: jax.Array, num: int, margin: float) -> jax.Array:
  low, high = jnp.min(coords), jnp.max(coords)
  pad = margin * jnp.where(high > low, high - low, 1.0)
  return jnp.linspace(low - pad, high + pad, num).astype(jnp.float32)


@compiled.reuse_compiled
def trajectory_pca(
    loss_fn: Callable[..., Any],
    checkpoints: Sequence[PyTree],
    *,
    num_points: int = 25,
    margin: float = 0.25,
    center: bool = False,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
) -> TrajectoryPCA:
  r"""The plane of a training run's top-2 PCA directions, its loss and path.

  With checkpoints :math:`w_1, \dots, w_T` (the last one final), the rows of
  :math:`M = [w_1 - w_T; \dots; w_{T-1} - w_T]` are decomposed by SVD,
  :math:`M = U \Sigma V^\top`; the first two right singular vectors are the
  directions :math:`d_1, d_2` (``center=True`` subtracts the rows' mean
  first, as Li et al.'s code does with scikit-learn's PCA). Each checkpoint
  is projected onto the plane through :math:`w_T`,

  .. math::

    p_i = \big(\langle w_i - w_T, d_1\rangle,\
               \langle w_i - w_T, d_2\rangle\big),

  and the loss :math:`L(w_T + \alpha d_1 + \beta d_2)` is evaluated on a
  ``num_points`` x ``num_points`` grid that spans the path with a margin of
  ``margin`` times its extent on each side. A random plane shows almost
  none of a trajectory; this one holds as much of it as any plane can
  (``explained_variance``). Each direction's sign makes the first
  checkpoint's coordinate >= 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: jnp.sum(w ** 2)
    >>> run = [jnp.array([4., 2., 0.]), jnp.array([2., 0., 0.]),
    ...        jnp.array([1., 0., 0.]), jnp.zeros(3)]
    >>> out = sharpness.trajectory_pca(loss_fn, run, num_points=5)
    >>> # The run lies in a plane: the path keeps every distance to w_T.
    >>> print(' '.join(f'{r:.2f}' for r in jnp.linalg.norm(out.path, axis=1)),
    ...       f'{out.explained_variance.sum():.2f}')
    4.47 2.00 1.00 0.00 1.00
    >>> print(out.landscape.losses.shape)
    (5, 5)

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    checkpoints: a list of >= 3 pytrees of one structure, in training
      order; the last is the final weights.
    num_points: grid points per axis, >= 2.
    margin: the grid's margin beyond the path, a fraction of its extent.
    center: subtract the mean of the rows of M before the SVD.

  Returns:
    A `TrajectoryPCA` (directions, path, explained_variance, landscape);
    NaN checkpoints give NaN throughout; each loss as loss_fn gives it.

  Raises:
    TypeError: checkpoints with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``, rebuilt inside loss_fn) or an
      integer leaf; loss_kwargs that is not a dict; a loss_fn whose output
      disagrees with ``has_aux``, or that returns a dict.
    ValueError: a loss that is not a scalar; empty or unequally shaped
      ``batches``; fewer than 3 checkpoints or checkpoints of different
      structures or shapes; num_points < 2; margin < 0.

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_ (section 7), NeurIPS 2018.
  """
  owner = 'trajectory_pca'
  num_points = landscape._points(owner, 'num_points', num_points)  # pylint: disable=protected-access
  validation.check_number(owner, 'margin', margin)
  matrix, unravel, final = _flat_checkpoints(owner, checkpoints)
  obj = objective_lib.Objective(
      owner, loss_fn, final, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  diffs = matrix - matrix[-1]
  directions, explained = _pca_plane(diffs[:-1], center)
  path = diffs @ directions.T
  alphas = _around(path[:, 0], num_points, margin)
  betas = _around(path[:, 1], num_points, margin)
  bb, aa = jnp.meshgrid(betas, alphas, indexing='ij')

  def at(point):
    shift = unravel(point[0] * directions[0] + point[1] * directions[1])
    return obj.loss(jax.tree.map(
        lambda p, d: (tree_math.wide(p) + d).astype(p.dtype), final, shift))

  losses = jax.lax.map(at, (aa.reshape(-1), bb.reshape(-1)))
  return TrajectoryPCA(
      directions=(unravel(directions[0]), unravel(directions[1])),
      path=path, explained_variance=explained,
      landscape=landscape.Landscape2D(
          alphas=alphas, betas=betas,
          losses=losses.reshape(num_points, num_points)))
