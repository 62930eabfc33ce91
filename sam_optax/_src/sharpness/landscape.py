"""Loss landscapes: the loss along one or two directions in weight space."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.sharpness import compiled
from sam_optax._src.sharpness import checks
from sam_optax._src.sharpness import filter_normalization
from sam_optax._src.sharpness import objective as objective_lib

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]
Span = tuple[float, float]


class Landscape1D(NamedTuple):
  """Result of `loss_landscape_1d`: ``plt.plot(alphas, losses)``.

  Attributes:
    alphas: the step sizes along the direction, shape (num_points,).
    losses: :math:`L(w + \\alpha\\, d)` at each alpha, float32.
  """

  alphas: jax.Array
  losses: jax.Array


class Landscape2D(NamedTuple):
  """Result of `loss_landscape_2d`: ``plt.contour(alphas, betas, losses)``.

  Attributes:
    alphas: steps along the first direction, shape (nx,).
    betas: steps along the second direction, shape (ny,).
    losses: :math:`L(w + \\alpha_j d_1 + \\beta_i d_2)` at ``[i, j]``, shape
      (ny, nx) (rows follow betas, the layout matplotlib expects).
  """

  alphas: jax.Array
  betas: jax.Array
  losses: jax.Array


def _points(owner: str, name: str, value: Any) -> int:
  return validation.check_static_int(owner, name, value, 2)


def _span(owner: str, span: Any) -> Span:
  try:
    low, high = (float(s) for s in span)
  except (TypeError, ValueError) as error:
    raise TypeError(
        f'{owner}: span must be a pair (low, high), got {span!r}.') from error
  if not low < high:
    raise ValueError(f'{owner}: span must have low < high, got {span!r}.')
  return low, high


def _check_like(owner: str, name: str, tree: PyTree, params: PyTree) -> None:
  checks.check_params(owner, tree, name)
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError(
        f'{owner}: {name} must have the structure of params:'
        f' {jax.tree.structure(tree)} vs {jax.tree.structure(params)}.'
    )
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(
          f'{owner}: {name} has a leaf of shape {jnp.shape(a)} where params'
          f' has {jnp.shape(b)}.'
      )


def _grid(span: Span, num: int) -> jax.Array:
  """linspace whose zero (when inside the span) is exactly 0."""
  low, high = span
  values = [low + (high - low) * i / (num - 1) for i in range(num)]
  step = (high - low) / (num - 1)
  values = [0.0 if abs(v) < 1e-9 * step else v for v in values]
  return jnp.asarray(values, jnp.float32)


@compiled.reuse_compiled
def loss_landscape_1d(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *,
    direction: Optional[PyTree] = None,
    endpoint: Optional[PyTree] = None,
    num_points: int = 51,
    span: Optional[Sequence[float]] = None,
    filter_axis: int = -1,
    ignore_1d: bool = True,
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
) -> Landscape1D:
  r"""The loss along a line through w: a random direction or towards w'.

  .. math::

    f(\alpha) = L(w + \alpha\, d), \qquad
    d = \begin{cases} w' - w & \text{with an endpoint } w'
        \text{ (linear interpolation)}\\
        \text{given} & \text{with a direction}\\
        \text{random, filter-normalized} & \text{otherwise.}\end{cases}

  ``span`` defaults to (-1, 1) for a direction and (-0.5, 1.5) for the line
  to an endpoint (f(0) = L(w), f(1) = L(w')). The grid is built so that 0 is
  exactly on it when it lies in the span; points are evaluated one after
  another with `jax.lax.map`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: jnp.sum(w ** 2)
    >>> out = sharpness.loss_landscape_1d(
    ...     loss_fn, jnp.zeros(2), endpoint=jnp.ones(2), num_points=5,
    ...     span=(0., 1.))
    >>> print(out.alphas, out.losses)
    [0.   0.25 0.5  0.75 1.  ] [0.    0.125 0.5   1.125 2.   ]

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    direction: d, a pytree like params (used as given).
    endpoint: w', a pytree like params (exclusive with ``direction``).
    num_points: number of alphas, >= 2.
    span: (low, high) of alpha.
    filter_axis: see `filter_normalized_direction` (random direction only).
    ignore_1d: see `filter_normalized_direction` (random direction only).

  Returns:
    A `Landscape1D` (alphas, losses); each loss as loss_fn gives it (NaN
    where it is NaN).

  Raises:
    TypeError: a complex or integer direction or endpoint.
    ValueError: both direction and endpoint, or one not like params; num_points < 2;
      span not a pair low < high.

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018; Goodfellow et al.,
    `Qualitatively characterizing neural network optimization problems
    <https://arxiv.org/abs/1412.6544>`_, ICLR 2015 (interpolation).
  """
  owner = 'loss_landscape_1d'
  num_points = _points(owner, 'num_points', num_points)
  if direction is not None and endpoint is not None:
    raise ValueError(
        f'{owner}: give either direction= or endpoint=, not both.')
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  if endpoint is not None:
    _check_like(owner, 'endpoint', endpoint, params)
    d = tree_math.tree_sub(endpoint, params)
    default_span = (-0.5, 1.5)
  elif direction is not None:
    _check_like(owner, 'direction', direction, params)
    d = jax.tree.map(tree_math.wide, direction)
    default_span = (-1.0, 1.0)
  else:
    d = filter_normalization.random_direction(owner, params, key, filter_axis,
                                              ignore_1d)
    default_span = (-1.0, 1.0)
  alphas = _grid(_span(owner, default_span if span is None else span),
                 num_points)
  losses = jax.lax.map(
      lambda a: obj.loss(tree_math.tree_add_scaled(params, a, d)), alphas)
  return Landscape1D(alphas=alphas, losses=losses)


@compiled.reuse_compiled
def loss_landscape_2d(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *,
    directions: Optional[tuple[PyTree, PyTree]] = None,
    num_points: Union[int, tuple[int, int]] = 25,
    span: Union[Sequence[float], tuple[Sequence[float], Sequence[float]]] = (
        -1.0, 1.0),
    filter_axis: int = -1,
    ignore_1d: bool = True,
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
) -> Landscape2D:
  r"""The loss on a plane through w spanned by two directions.

  .. math::

    f(\alpha, \beta) = L(w + \alpha\, d_1 + \beta\, d_2),

  with :math:`d_1, d_2` given, or two independent random filter-normalized
  directions (`filter_normalized_direction`; in high dimension they are
  nearly orthogonal). ``losses[i, j]`` is :math:`f(\alpha_j, \beta_i)`, ready
  for ``plt.contour(alphas, betas, losses)``; the centre is exactly L(w).

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: w[0] ** 2 + 2 * w[1] ** 2
    >>> e0, e1 = jnp.array([1., 0.]), jnp.array([0., 1.])
    >>> out = sharpness.loss_landscape_2d(
    ...     loss_fn, jnp.zeros(2), directions=(e0, e1), num_points=3)
    >>> print(out.losses)
    [[3. 2. 3.]
     [1. 0. 1.]
     [3. 2. 3.]]

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    directions: (d1, d2), pytrees like params (used as given).
    num_points: grid points per axis, an int or (nx, ny), each >= 2.
    span: (low, high) for both axes, or ((low, high), (low, high)).
    filter_axis: see `filter_normalized_direction`.
    ignore_1d: see `filter_normalized_direction`.

  Returns:
    A `Landscape2D` (alphas, betas, losses); each loss as loss_fn gives it
    (NaN where it is NaN).

  Raises:
    TypeError: complex or integer directions.
    ValueError: directions not a pair like params; num_points < 2; span not a pair
      (or two pairs) low < high.

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.
  """
  owner = 'loss_landscape_2d'
  if isinstance(num_points, (tuple, list)):
    if len(num_points) != 2:
      raise ValueError(f'{owner}: num_points must be an int or a pair.')
    nx, ny = (_points(owner, 'num_points', n) for n in num_points)
  else:
    nx = ny = _points(owner, 'num_points', num_points)
  if (isinstance(span, (tuple, list)) and len(span) == 2
      and all(isinstance(s, (tuple, list)) for s in span)):
    span_x, span_y = _span(owner, span[0]), _span(owner, span[1])
  else:
    span_x = span_y = _span(owner, span)
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  if directions is None:
    key1, key2 = jax.random.split(checks.resolve_key(key))
    d1, d2 = (filter_normalization.random_direction(
        owner, params, k, filter_axis, ignore_1d) for k in (key1, key2))
  else:
    if not isinstance(directions, (tuple, list)) or len(directions) != 2:
      raise ValueError(f'{owner}: directions must be a pair (d1, d2).')
    for name, d in zip(('directions[0]', 'directions[1]'), directions):
      _check_like(owner, name, d, params)
    d1, d2 = (jax.tree.map(tree_math.wide, d) for d in directions)
  alphas, betas = _grid(span_x, nx), _grid(span_y, ny)
  bb, aa = jnp.meshgrid(betas, alphas, indexing='ij')

  def at(point):
    a, b = point
    shifted = jax.tree.map(lambda p, x, y: (tree_math.wide(p) + a * x + b * y)
                           .astype(p.dtype), params, d1, d2)
    return obj.loss(shifted)

  losses = jax.lax.map(at, (aa.reshape(-1), bb.reshape(-1))).reshape(ny, nx)
  return Landscape2D(alphas=alphas, betas=betas, losses=losses)
