r"""Sharpness measurement: stateless, jit-able helpers.

Every helper is a pure function ``name(loss_fn, params, ..., *,
loss_kwargs=None, batches=None, has_aux=False, layout=None, ...)``. A
direct (un-jitted) call compiles once per loss_fn, options and argument
shapes, and a repeated call reuses that program; under `jax.jit` the helper
is part of the caller's program. The arguments every helper shares, written
once here:

- ``loss_fn``: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss
  (or ``(loss, aux)`` with ``has_aux=True``), as in the transformations.
- ``params``: the weights w, a pytree of real floating-point leaves.
- ``loss_kwargs``: a dict of keyword arguments of ``loss_fn`` (one batch),
  so they never collide with the helper's options; with ``batches``, the
  arguments shared by every batch.
- ``batches``: an iterable of such dicts; the helper then measures the
  dataset loss :math:`L_D(w) = \frac{1}{B}\sum_b L(w; \text{batch}_b)`
  (batches are stacked and scanned, so the helper stays jit-able).
- ``has_aux``: whether ``loss_fn`` returns ``(loss, aux)``.
- ``layout``: where the batch lies: ``None`` (on this device),
  ``sam_optax.PerDevice(axis)`` inside `jax.pmap` / `jax.shard_map` with the
  batch sharded over ``axis`` (the measurement is that of the global batch,
  identical on every device: one all-reduce per loss, gradient or curvature
  product), or ``sam_optax.Chunks(m, shared=True)`` (the batch accumulated
  over chunks of m examples, at the memory of one chunk).
- ``key``: a PRNG key for the helper's random draws (default: a fixed key);
  results are deterministic for a given key.

The spectral helpers (``hessian_*``) also take:

- ``curvature``: the matrix C measured: ``'hessian'`` (the default), `GGN`
  (:math:`J^\top H_{\text{out}} J`, PSD) or `EmpiricalFisher`; H in their
  formulas is then C.
- ``select``: which leaves' diagonal block :math:`C_{SS}` to measure (a
  pytree of bools like params, a function ``params -> bools``, or a
  predicate ``(path, leaf) -> bool``), the other leaves held fixed; vectors
  in the result are like params, zero outside S. None: every leaf.
- ``per_leaf``: measure each selected leaf's own block in one call (one
  program) and return a pytree like params of per-leaf results (unselected
  leaves None; vectors there like the leaf).
- ``unroll``: how the loop over curvature products is compiled: ``False``,
  `jax.lax` loops (compile time independent of the count); ``True``, Python
  loops traced into the program (power iteration runs every step, its state
  frozen after the stop); ``None`` (the default), ``True`` exactly when the
  backend is CPU and one product contains a convolution, which XLA:CPU runs
  10-40x slower inside a loop body. Both agree up to rounding.

Every helper computes Hessian-vector products by forward-over-reverse
differentiation; the Hessian is never formed. What every helper does with
unusual input (tests/sharpness/test_sharpness_battery.py runs each through all of it):

- a zero gradient is an ordinary point: finite values and derivatives;
- bfloat16 params work: perturbations are added in float32 and rounded to
  the params' dtype, norms and results are float32;
- a NaN loss (at w, on one chunk, or anywhere on an ascent) gives NaN, never
  a plausible number (an infinite L(w) too); landscapes keep each loss as
  loss_fn gives it.

Errors every helper raises, each message naming the helper and the fix:

- TypeError: complex params (split them, ``params = {'re': w.real, 'im':
  w.imag}``, and rebuild ``w = params['re'] + 1j * params['im']`` inside
  loss_fn) or integer leaves; loss_kwargs that is not a dict; a loss_fn
  whose output disagrees with ``has_aux`` (the message names the right
  value); a dict returned as the loss (``jax.grad(loss_fn)`` by mistake).
- ValueError: a loss that is not a scalar; ``batches`` empty or unequally
  shaped; an empty batch (leading dimension 0); an unbound ``PerDevice``
  axis.
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
from sam_optax._src.sharpness.filter_normalization import filter_normalized_direction
from sam_optax._src.sharpness.landscape import Landscape1D
from sam_optax._src.sharpness.landscape import Landscape2D
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
