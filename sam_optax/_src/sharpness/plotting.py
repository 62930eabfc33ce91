"""PNG plots of landscapes and spectral densities (matplotlib is optional)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import numpy as np

from sam_optax._src.sharpness import density as density_lib
from sam_optax._src.sharpness import landscape
from sam_optax._src.sharpness import trajectory


def _figure(ncols: int = 1):
  """A matplotlib Figure drawn with the Agg canvas (no pyplot, no GUI)."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError as error:  # pragma: no cover - depends on the env.
    raise ImportError(
        'sam_optax.sharpness plotting needs matplotlib, an optional'
        ' dependency: `pip install matplotlib` (or `pip install'
        ' sam-optax[examples]`).'
    ) from error
  figure = Figure(figsize=(4.5 * ncols, 3.8), layout='constrained')
  FigureCanvasAgg(figure)
  return figure


def _as_mapping(value, kind) -> dict[str, Any]:
  if isinstance(value, kind):
    return {'': value}
  if isinstance(value, Mapping) and value and all(
      isinstance(v, kind) for v in value.values()):
    return dict(value)
  names = kind.__name__ if isinstance(kind, type) else ' or '.join(
      k.__name__ for k in kind)
  raise TypeError(
      f'expected a {names} or a dict label -> {names}, got'
      f' {type(value).__name__}.'
  )


def plot_loss_landscape(
    landscapes: Union[landscape.Landscape1D, landscape.Landscape2D,
                      Mapping[str, Any]],
    path: Union[str, os.PathLike[str]],
    *,
    title: Optional[str] = None,
    levels: int = 30,
    log_scale: bool = False,
) -> str:
  """Writes a PNG of one landscape, or of several side by side / overlaid.

  1-D landscapes are drawn as curves on one axis (one per label); 2-D
  landscapes as filled contour plots, one panel per label, with a shared
  colour scale so that panels compare directly.

  Examples:
    >>> import os, tempfile, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> out = sharpness.loss_landscape_1d(
    ...     lambda w: jnp.sum(w ** 2), jnp.ones(3), num_points=7,
    ...     ignore_1d=False)
    >>> path = os.path.join(tempfile.mkdtemp(), 'landscape.png')
    >>> sharpness.plot_loss_landscape({'run': out}, path) == path
    True

  Args:
    landscapes: a `Landscape1D` / `Landscape2D`, or a dict label -> landscape
      (all of one kind).
    path: where to write the PNG.
    title: figure title.
    levels: contour levels (2-D).
    log_scale: plot log10 of the loss.

  Returns:
    ``path`` as a string.

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.
  """
  items = _as_mapping(landscapes, (landscape.Landscape1D,
                                   landscape.Landscape2D))
  kinds = {type(v) for v in items.values()}
  if len(kinds) != 1:
    raise TypeError('plot_loss_landscape: mix of 1-D and 2-D landscapes.')
  transform = (lambda z: np.log10(np.maximum(z, 1e-12))) if log_scale else (
      lambda z: z)
  label = 'log10 loss' if log_scale else 'loss'
  if kinds == {landscape.Landscape1D}:
    figure = _figure()
    axis = figure.add_subplot()
    for name, value in items.items():
      axis.plot(np.asarray(value.alphas), transform(np.asarray(value.losses)),
                label=name or None)
    axis.set_xlabel('alpha')
    axis.set_ylabel(label)
    if any(items):
      axis.legend()
    if title:
      axis.set_title(title)
  else:
    figure = _figure(len(items))
    zs = {k: transform(np.asarray(v.losses)) for k, v in items.items()}
    low = min(float(np.min(z)) for z in zs.values())
    high = max(float(np.max(z)) for z in zs.values())
    bounds = np.linspace(low, high if high > low else low + 1.0, levels)
    axes = figure.subplots(1, len(items), squeeze=False)[0]
    contour: Any = None
    for axis, (name, value) in zip(axes, items.items()):
      contour = axis.contourf(np.asarray(value.alphas), np.asarray(value.betas),
                              zs[name], levels=bounds, cmap='viridis')
      axis.contour(np.asarray(value.alphas), np.asarray(value.betas),
                   zs[name], levels=bounds[::3], colors='white',
                   linewidths=0.5)
      axis.plot([0], [0], 'r+')
      axis.set_xlabel('alpha')
      axis.set_ylabel('beta')
      if name:
        axis.set_title(name)
    figure.colorbar(contour, ax=list(axes), label=label)
    if title:
      figure.suptitle(title)
  figure.savefig(os.fspath(path), dpi=110)
  return os.fspath(path)


def plot_spectral_density(
    densities: Union[density_lib.SpectralDensity, Mapping[str, Any]],
    path: Union[str, os.PathLike[str]],
    *,
    title: Optional[str] = None,
    log_scale: bool = True,
) -> str:
  """Writes a PNG of one or several Hessian spectral densities (overlaid).

  Examples:
    >>> import os, tempfile, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> out = sharpness.hessian_spectral_density(
    ...     lambda w: jnp.sum(jnp.arange(4.) * w ** 2), jnp.zeros(4),
    ...     num_lanczos=4, grid_size=50)
    >>> path = os.path.join(tempfile.mkdtemp(), 'density.png')
    >>> sharpness.plot_spectral_density(out, path) == path
    True

  Args:
    densities: a `SpectralDensity` or a dict label -> `SpectralDensity`.
    path: where to write the PNG.
    title: figure title.
    log_scale: logarithmic density axis (as in Ghorbani et al.).

  Returns:
    ``path`` as a string.

  References:
    Ghorbani et al., `An Investigation into Neural Net Optimization via
    Hessian Eigenvalue Density <https://arxiv.org/abs/1901.10159>`_,
    ICML 2019.
  """
  items = _as_mapping(densities, density_lib.SpectralDensity)
  figure = _figure()
  axis = figure.add_subplot()
  for name, value in items.items():
    density = np.asarray(value.density)
    if log_scale:
      density = np.maximum(density, 1e-12)
    axis.plot(np.asarray(value.grid), density, label=name or None)
  if log_scale:
    axis.set_yscale('log')
    axis.set_ylim(bottom=1e-7)
  axis.set_xlabel('eigenvalue')
  axis.set_ylabel('density')
  if any(items):
    axis.legend()
  if title:
    axis.set_title(title)
  figure.savefig(os.fspath(path), dpi=110)
  return os.fspath(path)


def plot_trajectory(
    trajectories: Union[trajectory.TrajectoryPCA, Mapping[str, Any]],
    path: Union[str, os.PathLike[str]],
    *,
    title: Optional[str] = None,
    levels: int = 30,
    log_scale: bool = False,
) -> str:
  """Writes a PNG of training paths over their PCA-plane loss contours.

  One panel per label (a shared colour scale), each the filled contours of
  the `TrajectoryPCA` landscape with the projected path drawn on top, from
  its start (circle) to the final weights (star), the axes labelled with
  the variance each direction explains, as in Li et al.'s Figure 9.

  Examples:
    >>> import os, tempfile, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> run = [jnp.array([2., 1., 0.]), jnp.array([1., 1., 0.]),
    ...        jnp.array([0.5, 0., 0.]), jnp.zeros(3)]
    >>> out = sharpness.trajectory_pca(lambda w: jnp.sum(w ** 2), run,
    ...                                num_points=9)
    >>> path = os.path.join(tempfile.mkdtemp(), 'trajectory.png')
    >>> sharpness.plot_trajectory({'sgd': out}, path) == path
    True

  Args:
    trajectories: a `TrajectoryPCA`, or a dict label -> `TrajectoryPCA`.
    path: where to write the PNG.
    title: figure title.
    levels: contour levels.
    log_scale: plot log10 of the loss.

  Returns:
    ``path`` as a string.

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_ (section 7), NeurIPS 2018.
  """
  items = _as_mapping(trajectories, trajectory.TrajectoryPCA)
  transform = (lambda z: np.log10(np.maximum(z, 1e-12))) if log_scale else (
      lambda z: z)
  label = 'log10 loss' if log_scale else 'loss'
  figure = _figure(len(items))
  zs = {k: transform(np.asarray(v.landscape.losses)) for k, v in items.items()}
  low = min(float(np.nanmin(z)) for z in zs.values())
  high = max(float(np.nanmax(z)) for z in zs.values())
  bounds = np.linspace(low, high if high > low else low + 1.0, levels)
  axes = figure.subplots(1, len(items), squeeze=False)[0]
  contour: Any = None
  for axis, (name, value) in zip(axes, items.items()):
    grid = value.landscape
    contour = axis.contourf(np.asarray(grid.alphas), np.asarray(grid.betas),
                            zs[name], levels=bounds, cmap='viridis')
    points = np.asarray(value.path)
    axis.plot(points[:, 0], points[:, 1], 'w.-', linewidth=1)
    axis.plot(points[:1, 0], points[:1, 1], 'wo')
    axis.plot(points[-1:, 0], points[-1:, 1], 'r*', markersize=10)
    ratio = np.asarray(value.explained_variance)
    axis.set_xlabel(f'PC1 ({100 * ratio[0]:.1f}%)')
    axis.set_ylabel(f'PC2 ({100 * ratio[1]:.1f}%)')
    if name:
      axis.set_title(name)
  figure.colorbar(contour, ax=list(axes), label=label)
  if title:
    figure.suptitle(title)
  figure.savefig(os.fspath(path), dpi=110)
  return os.fspath(path)
