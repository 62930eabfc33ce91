"""Sharpness measurement: stateless, jit-able helpers.

Every helper is a pure function ``name(loss_fn, params, ..., *,
loss_kwargs=None, batches=None, key=None, has_aux=False, ...)``:

- ``loss_fn(params, **loss_kwargs)`` returns a scalar loss (or ``(loss, aux)``
  with ``has_aux=True``), as in the transformations;
- ``loss_kwargs`` is one batch (the loss's keyword arguments, in a dict so
  they never collide with the helper's options);
- ``batches`` is an iterable of such dicts: the helper then measures the
  dataset loss, the mean over the batches (``loss_kwargs`` then holds the
  arguments shared by every batch); batches are stacked and scanned, so the
  helper stays jit-able;
- stochastic helpers take ``key`` (default: a fixed key) and are
  deterministic for a given key.

Hessian quantities use Hessian-vector products (forward-over-reverse); the
Hessian is never formed.

What every helper does with unusual input (tests/test_sharpness_battery.py
runs each through all of it):

- a zero gradient is an ordinary point: finite values and derivatives;
- bfloat16 params work: perturbations are added in float32 and rounded to
  the params' dtype, norms and results are float32;
- a NaN loss (at w, on one chunk, or anywhere on an ascent) gives NaN, never
  a plausible number (an infinite L(w) too); landscapes keep each loss as
  loss_fn gives it;
- complex params are a TypeError (norms and dot products here are real):
  split them, ``params = {'re': w.real, 'im': w.imag}``, and rebuild
  ``w = params['re'] + 1j * params['im']`` inside loss_fn;
- a loss that is not a scalar, a loss_fn whose output disagrees with
  ``has_aux``, a dict returned as the loss (``jax.grad(loss_fn)`` by
  mistake) and loss_kwargs that is not a dict are errors naming the helper
  and the fix.
"""

from sam_optax._src.sharpness.curvature import EmpiricalFisher
from sam_optax._src.sharpness.curvature import GGN
from sam_optax._src.sharpness.lanczos import HessianEigenvalues
from sam_optax._src.sharpness.power_iteration import HessianTopEigenvalue
from sam_optax._src.sharpness.trace import HessianTrace
from sam_optax._src.sharpness.density import SpectralDensity
from sam_optax._src.sharpness.lanczos import hessian_eigenvalues
from sam_optax._src.sharpness.density import hessian_spectral_density
from sam_optax._src.sharpness.power_iteration import hessian_top_eigenvalue
from sam_optax._src.sharpness.trace import hessian_trace
from sam_optax._src.sharpness.operator import hessian_vector_product
from sam_optax._src.sharpness.landscape import Landscape1D
from sam_optax._src.sharpness.landscape import Landscape2D
from sam_optax._src.sharpness.landscape import filter_normalized_direction
from sam_optax._src.sharpness.landscape import loss_landscape_1d
from sam_optax._src.sharpness.landscape import loss_landscape_2d
from sam_optax._src.sharpness.average_case import AverageCaseSharpness
from sam_optax._src.sharpness.worst_case import WorstCaseSharpness
from sam_optax._src.sharpness.average_case import average_case_sharpness
from sam_optax._src.sharpness.first_order import first_order_sharpness
from sam_optax._src.sharpness.m_sharpness import m_sharpness
from sam_optax._src.sharpness.first_order import sam_sharpness
from sam_optax._src.sharpness.worst_case import worst_case_sharpness
from sam_optax._src.sharpness.plotting import plot_loss_landscape
from sam_optax._src.sharpness.plotting import plot_spectral_density
from sam_optax._src.sharpness.plotting import plot_trajectory
from sam_optax._src.sharpness.trajectory import Interpolation
from sam_optax._src.sharpness.trajectory import TrajectoryPCA
from sam_optax._src.sharpness.trajectory import loss_interpolation
from sam_optax._src.sharpness.trajectory import trajectory_pca

__all__ = (
    'AverageCaseSharpness',
    'EmpiricalFisher',
    'GGN',
    'HessianEigenvalues',
    'HessianTopEigenvalue',
    'HessianTrace',
    'Interpolation',
    'Landscape1D',
    'Landscape2D',
    'SpectralDensity',
    'TrajectoryPCA',
    'WorstCaseSharpness',
    'average_case_sharpness',
    'filter_normalized_direction',
    'first_order_sharpness',
    'hessian_eigenvalues',
    'hessian_spectral_density',
    'hessian_top_eigenvalue',
    'hessian_trace',
    'hessian_vector_product',
    'loss_interpolation',
    'loss_landscape_1d',
    'loss_landscape_2d',
    'm_sharpness',
    'plot_loss_landscape',
    'plot_spectral_density',
    'plot_trajectory',
    'sam_sharpness',
    'trajectory_pca',
    'worst_case_sharpness',
)
