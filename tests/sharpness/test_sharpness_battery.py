"""One battery over every public helper of `sam_optax.sharpness`.

Each helper is one row of ``ROWS``: how to call it on the tiny model below,
which part of its result is checked (``main``) and the independent reference
for that part (hand-written least-squares formulas in numpy float64). Every
row then runs through the same checks:

- under `jax.jit`, against the reference;
- at a zero gradient (an exact fit): finite and equal to the reference;
- with bfloat16 params: finite and close to the reference at those params;
- with a NaN loss (NaN offset, NaN example, NaN params): NaN out;
- with bad input: a clear error that names the helper and the fix.

One compiled function per row (and dtype) serves every check, so the
battery stays fast.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import sam_optax
from sam_optax import sharpness

# --- the tiny model: weighted least squares, 8 parameters -------------------
# Dyadic numbers, so the fit below is exact in float32: a zero gradient.

OUTPUT_WEIGHTS = np.array([1.0, 0.3])  # splits the Hessian's two blocks
X = np.array([[1, 0, 2], [0, 1, -1], [1, 1, 0], [-1, 2, 1]], np.float64)
PARAMS = {'w': jnp.asarray([[0.5, -1.0], [0.25, 1.0], [-0.5, 0.75]]),
          'b': jnp.asarray([0.25, -0.5])}
Y_FIT = X @ np.asarray(PARAMS['w'], np.float64) + np.asarray(PARAMS['b'])
Y = Y_FIT + np.array([[0.5, -0.25], [0.0, 0.5], [-0.75, 0.25], [0.25, 1.0]])
# Directions for the landscapes and the HVP.
D1 = {'w': jnp.asarray([[1.0, 0.0], [0.5, -0.5], [0.0, 1.0]]),
      'b': jnp.asarray([0.5, 0.0])}
D2 = {'w': jnp.asarray([[0.0, 0.5], [-1.0, 0.0], [0.25, 0.25]]),
      'b': jnp.asarray([0.0, -1.0])}


def batch(y=Y, offset=0.0):
  return {'x': jnp.asarray(X, jnp.float32), 'y': jnp.asarray(y, jnp.float32),
          'offset': jnp.float32(offset)}


def loss_fn(params, x, y, offset):
  pred = x @ params['w'] + params['b']
  weights = jnp.asarray(OUTPUT_WEIGHTS, jnp.float32)
  return 0.5 * jnp.mean(jnp.sum(weights * (pred - y) ** 2, axis=1)) + offset


# --- hand-written references (numpy float64) ---------------------------------
# The flat order is ravel_pytree's: b (2), then w row by row (6).


def ravel(tree) -> jax.Array:
  """The flat float32 vector of a pytree (jit-able)."""
  return flatten_util.ravel_pytree(
      jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), tree))[0]


def flat(tree) -> np.ndarray:
  return np.asarray(ravel(tree), np.float64)


def theta(z: np.ndarray) -> np.ndarray:
  """Flat params -> the (4, 2) matrix [w; b] acting on features [x, 1]."""
  return np.vstack([z[2:].reshape(3, 2), z[:2]])


def features(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return np.hstack([x, np.ones((len(x), 1))])


def np_loss(z, kw) -> float:
  residual = features(kw['x']) @ theta(z) - np.asarray(kw['y'], np.float64)
  return 0.5 * np.mean(np.sum(OUTPUT_WEIGHTS * residual ** 2, axis=1)) + float(
      kw['offset'])


def np_grad(z, kw) -> np.ndarray:
  phi = features(kw['x'])
  residual = phi @ theta(z) - np.asarray(kw['y'], np.float64)
  g = phi.T @ (residual * OUTPUT_WEIGHTS) / len(phi)  # (4, 2) like theta
  return np.concatenate([g[3], g[:3].reshape(-1)])


def np_hessian(kw) -> np.ndarray:
  phi = features(kw['x'])
  gram = phi.T @ phi / len(phi)
  index = lambda k, j: j if k == 3 else 2 + 2 * k + j
  h = np.zeros((8, 8))
  for k in range(4):
    for kk in range(4):
      for j in range(2):
        h[index(k, j), index(kk, j)] = OUTPUT_WEIGHTS[j] * gram[k, kk]
  return h


def sam_gain(z, kw, rho) -> float:
  g = np_grad(z, kw)
  norm = np.linalg.norm(g)
  eps = rho * g / norm if norm > 0 else 0 * g
  return np_loss(z + eps, kw) - np_loss(z, kw)


def trust_region_max(h, g, rho) -> float:
  """max g.d + d^T H d / 2 over ||d|| <= rho for a PSD H (secular equation)."""
  lam, q = np.linalg.eigh(h)
  if np.linalg.norm(g) < 1e-12:
    return 0.5 * rho ** 2 * max(lam[-1], 0.0)
  gq = q.T @ g
  lo, hi = lam[-1], lam[-1] + np.linalg.norm(g) / rho
  for _ in range(200):
    mu = 0.5 * (lo + hi)
    lo, hi = (mu, hi) if np.linalg.norm(gq / (mu - lam)) > rho else (lo, mu)
  d = q @ (gq / (hi - lam))
  return g @ d + 0.5 * d @ h @ d


def exact(value, rtol=2e-3):
  value = np.asarray(value, np.float64)
  return value, 1e-5 + rtol * np.abs(value).max()


def ref_average_case(z, kw, sigma=0.1, n=256):
  g, h = np_grad(z, kw), np_hessian(kw)
  var = sigma ** 2 * g @ g + 0.5 * sigma ** 4 * np.sum(h ** 2)
  return 0.5 * sigma ** 2 * np.trace(h), 5 * np.sqrt(var / n)


def ref_trace(kw, n=256):
  h = np_hessian(kw)
  var = 2 * (np.sum(h ** 2) - np.sum(np.diag(h) ** 2))
  return np.trace(h), 5 * np.sqrt(var / n) + 1e-5


def ref_m_sharpness(z, kw, m=2, rho=0.1):
  chunks = [{**kw, 'x': kw['x'][i:i + m], 'y': kw['y'][i:i + m]}
            for i in range(0, len(kw['x']), m)]
  return exact(np.mean([sam_gain(z, c, rho) for c in chunks]))


def ref_landscape_2d(z, kw):
  grid = np.linspace(-1, 1, 3)
  return exact([[np_loss(z + a * flat(D1) + b * flat(D2), kw) for a in grid]
                for b in grid])


def dominant(h):
  eigs = np.linalg.eigvalsh(h)
  return eigs[np.argmax(np.abs(eigs))]


def column_norms(w):
  return jnp.linalg.norm(jnp.asarray(w, jnp.float32), axis=0)


TS = (-0.5, 0.0, 0.5, 1.0, 1.5)  # beyond [0, 1] on both sides
RUN = (D1, D2, jax.tree.map(lambda a, b: 0.5 * a - 0.5 * b, D1, D2))


def shifted(params, d):
  return jax.tree.map(lambda p, x: (p.astype(jnp.float32) + x).astype(p.dtype),
                      params, d)


def ref_trajectory(z, kw):
  """numpy SVD of [w_i - w_T], signs as documented, the 3 x 3 grid."""
  diffs = np.stack([flat(d) for d in RUN] + [0 * z])
  _, _, vt = np.linalg.svd(diffs[:-1], full_matrices=False)
  d = vt[:2] * np.where(vt[:2] @ diffs[0] < 0, -1.0, 1.0)[:, None]
  path = diffs @ d.T
  axes = []
  for c in path.T:
    pad = 0.25 * (c.max() - c.min())
    axes.append(np.linspace(c.min() - pad, c.max() + pad, 3))
  return exact([[np_loss(z + a * d[0] + b * d[1], kw) for a in axes[0]]
                for b in axes[1]])


def apply_fn(params, x, **_):
  return x @ params['w'] + params['b']


def output_loss(pred, y, offset, **_):
  weights = jnp.asarray(OUTPUT_WEIGHTS, jnp.float32)
  return 0.5 * jnp.mean(jnp.sum(weights * (pred - y) ** 2, axis=1)) + offset


def per_example_loss(params, x, y, offset):
  weights = jnp.asarray(OUTPUT_WEIGHTS, jnp.float32)
  return 0.5 * jnp.sum(weights * (apply_fn(params, x) - y) ** 2, 1) + offset


def ref_fisher_trace(z, kw):
  """tr F = mean_i |g_i|^2, g_i = phi_i (x) (weights * r_i)."""
  phi = features(kw['x'])
  residual = phi @ theta(z) - np.asarray(kw['y'], np.float64)
  norms = np.sum(phi ** 2, 1) * np.sum((OUTPUT_WEIGHTS * residual) ** 2, 1)
  return exact(np.mean(norms))


# --- the table ---------------------------------------------------------------


class Row(NamedTuple):
  call: Callable[..., Any]  # (loss_fn, params, loss_kwargs, **extra)
  main: Callable[[Any], Any]  # the part of the result that is checked
  reference: Callable[[np.ndarray, dict], tuple]  # (expected, tolerance)
  bf16_rtol: float = 2e-2  # relative to the largest |expected|
  takes_loss: bool = True


def _measure(helper, **options):
  """A row's call for ``helper(loss_fn, params, **options, loss_kwargs=...)``."""
  return lambda f, p, kw, **extra: helper(f, p, loss_kwargs=kw, **options,
                                          **extra)


ROWS = {
    'first_order_sharpness': Row(
        _measure(sharpness.first_order_sharpness, rho=0.1), lambda out: out,
        lambda z, kw: exact(0.1 * np.linalg.norm(np_grad(z, kw)))),
    'sam_sharpness': Row(
        _measure(sharpness.sam_sharpness, rho=0.1), lambda out: out,
        lambda z, kw: exact(sam_gain(z, kw, 0.1))),
    'worst_case_sharpness': Row(
        _measure(sharpness.worst_case_sharpness, rho=0.1, num_steps=40,
                 random_init=True),
        lambda out: out.sharpness,
        lambda z, kw: exact(trust_region_max(np_hessian(kw), np_grad(z, kw),
                                             0.1), rtol=2e-2),
        bf16_rtol=5e-2),
    'average_case_sharpness': Row(
        _measure(sharpness.average_case_sharpness, sigma=0.1,
                 num_samples=256),
        lambda out: out.sharpness, ref_average_case),
    'm_sharpness': Row(
        _measure(sharpness.m_sharpness, m=2, rho=0.1), lambda out: out,
        ref_m_sharpness),
    'hessian_vector_product': Row(
        _measure(sharpness.hessian_vector_product, vector=D1), ravel,
        lambda z, kw: exact(np_hessian(kw) @ flat(D1))),
    'hessian_top_eigenvalue': Row(
        _measure(sharpness.hessian_top_eigenvalue),
        lambda out: out.eigenvalue,
        lambda z, kw: exact(dominant(np_hessian(kw)), rtol=1e-3)),
    'hessian_eigenvalues': Row(
        _measure(sharpness.hessian_eigenvalues, k=2),
        lambda out: out.eigenvalues,
        lambda z, kw: exact(np.linalg.eigvalsh(np_hessian(kw))[::-1][:2])),
    'hessian_trace': Row(
        _measure(sharpness.hessian_trace, num_samples=256),
        lambda out: out.trace, lambda z, kw: ref_trace(kw)),
    # A row per method of a helper: 'helper[method]'. n = 8, k = 4, so half
    # the spectrum is sampled; the bound is Hutchinson's on 4 probes.
    'hessian_trace[hutch++]': Row(
        _measure(sharpness.hessian_trace, num_samples=12, method='hutch++'),
        lambda out: out.trace, lambda z, kw: ref_trace(kw, n=4)),
    # curvature=: GGN = H here (a linear model), the Fisher by hand.
    'hessian_eigenvalues[ggn]': Row(
        _measure(sharpness.hessian_eigenvalues, k=2,
                 curvature=sharpness.GGN(apply_fn, output_loss)),
        lambda out: out.eigenvalues,
        lambda z, kw: exact(np.linalg.eigvalsh(np_hessian(kw))[::-1][:2])),
    'hessian_trace[fisher]': Row(
        _measure(sharpness.hessian_trace, num_samples=24, method='hutch++',
                 curvature=sharpness.EmpiricalFisher(per_example_loss)),
        lambda out: out.trace, ref_fisher_trace),
    # Per-layer blocks: flat order b (0:2), w (2:8), as np_hessian's.
    'hessian_top_eigenvalue[per_leaf]': Row(
        _measure(sharpness.hessian_top_eigenvalue, per_leaf=True),
        lambda out: jnp.stack([out['b'].eigenvalue, out['w'].eigenvalue]),
        lambda z, kw: exact([dominant(np_hessian(kw)[:2, :2]),
                             dominant(np_hessian(kw)[2:, 2:])], rtol=1e-3)),
    'hessian_trace[select]': Row(
        # The w block has n = 6 = k: Hutch++ is exact.
        _measure(sharpness.hessian_trace, num_samples=18, method='hutch++',
                 select={'b': False, 'w': True}),
        lambda out: out.trace,
        lambda z, kw: exact(np.trace(np_hessian(kw)[2:, 2:]))),
    # layout=: the batch accumulated over chunks of 2 is the whole batch.
    'sam_sharpness[chunks]': Row(
        _measure(sharpness.sam_sharpness, rho=0.1,
                 layout=sam_optax.Chunks(2, shared=True)),
        lambda out: out, lambda z, kw: exact(sam_gain(z, kw, 0.1))),
    'hessian_spectral_density': Row(
        # With m = n Lanczos steps the quadrature nodes are the eigenvalues.
        _measure(sharpness.hessian_spectral_density, num_lanczos=8,
                 num_probes=1, grid_size=16),
        lambda out: jnp.sort(out.nodes[0]),
        lambda z, kw: exact(np.linalg.eigvalsh(np_hessian(kw)))),
    'loss_landscape_1d': Row(
        _measure(sharpness.loss_landscape_1d, direction=D1, num_points=5),
        lambda out: out.losses,
        lambda z, kw: exact([np_loss(z + a * flat(D1), kw)
                             for a in np.linspace(-1, 1, 5)])),
    'loss_landscape_2d': Row(
        _measure(sharpness.loss_landscape_2d, directions=(D1, D2),
                 num_points=3),
        lambda out: out.losses, ref_landscape_2d),
    'loss_interpolation': Row(
        lambda f, p, kw, **extra: sharpness.loss_interpolation(
            f, p, shifted(p, D1), ts=TS, loss_kwargs=kw, **extra),
        lambda out: out.losses,
        lambda z, kw: exact([np_loss((1 - t) * z + t * (z + flat(D1)), kw)
                             for t in TS])),
    'trajectory_pca': Row(
        lambda f, p, kw, **extra: sharpness.trajectory_pca(
            f, [shifted(p, d) for d in RUN] + [p], num_points=3,
            loss_kwargs=kw, **extra),
        lambda out: out.landscape.losses, ref_trajectory),
    'filter_normalized_direction': Row(
        lambda f, p, kw, **extra: sharpness.filter_normalized_direction(
            p, jax.random.key(0), **extra),
        lambda out: column_norms(out['w']),
        lambda z, kw: exact(np.linalg.norm(theta(z)[:3], axis=0)),
        takes_loss=False),
}
# Not measurements: they draw the results above into PNG files
# (tests/sharpness/test_landscape.py::test_plots_write_png,
# tests/sharpness/test_trajectory.py::test_plot_trajectory_writes_png).
NOT_IN_THE_BATTERY = {'plot_loss_landscape', 'plot_spectral_density',
                      'plot_trajectory'}



@functools.lru_cache(maxsize=None)
def compiled(name: str):
  """The row's helper on (params, loss_kwargs), jitted once per row."""
  row = ROWS[name]
  return jax.jit(lambda params, kw: row.main(row.call(loss_fn, params, kw)))


def check_close(name, params, kw, rtol_of_max=0.0):
  out = np.asarray(compiled(name)(params, kw), np.float64)
  expected, tol = ROWS[name].reference(flat(params), kw)
  assert np.all(np.isfinite(out)), (name, out)
  tol = tol + rtol_of_max * np.abs(expected).max()
  assert np.all(np.abs(out - expected) <= tol), (name, out, expected, tol)


def check_jit(name):
  check_close(name, PARAMS, batch())


def check_zero_gradient(name):
  kw = batch(y=Y_FIT)
  assert not np.any(np_grad(flat(PARAMS), kw))  # an exact fit
  check_close(name, PARAMS, kw)


def check_bfloat16(name):
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  # The reference at the bfloat16 params themselves, widened exactly.
  check_close(name, params, batch(), rtol_of_max=ROWS[name].bf16_rtol)


NAN_CASES = {
    'loss': lambda: (PARAMS, batch(offset=np.nan)),  # a finite gradient
    'example': lambda: (PARAMS, batch(y=np.where(  # in one chunk only
        np.arange(8).reshape(4, 2) == 0, np.nan, Y_FIT))),
    'params': lambda: (jax.tree.map(lambda p: p * jnp.nan, PARAMS), batch()),
}


def check_nan(name, case):
  params, kw = NAN_CASES[case]()
  out = np.asarray(compiled(name)(params, kw))
  assert np.all(np.isnan(out)), (name, case, out)


def _grad_as_loss(params, **kw):
  return jax.grad(loss_fn)(params, **kw)


BAD_INPUTS = {
    # name: (loss_fn, params, loss_kwargs, extra, error, message regex)
    'loss_not_scalar': (
        lambda p, **kw: jnp.ones(2) * loss_fn(p, **kw), PARAMS, batch(), {},
        ValueError, r'must return a scalar(.|\n)*\.mean\(\)'),
    'has_aux_but_a_scalar': (
        loss_fn, PARAMS, batch(), {'has_aux': True}, TypeError,
        r'has_aux=True, so loss_fn must return a pair(.|\n)*has_aux=False'),
    'pair_without_has_aux': (
        lambda p, **kw: (loss_fn(p, **kw), {}), PARAMS, batch(), {},
        TypeError, r'pass has_aux=True'),
    'gradient_as_loss': (
        _grad_as_loss, PARAMS, batch(), {}, TypeError,
        r"scalar loss(.|\n)*returned a dict with keys \['b', 'w'\]"
        r'(.|\n)*jax\.grad'),
    'loss_kwargs_not_a_dict': (
        loss_fn, PARAMS, [X, Y], {}, TypeError, r'loss_kwargs must be a dict'),
    'complex_params': (
        loss_fn, jax.tree.map(lambda p: p * (1 + 1j), PARAMS), batch(), {},
        TypeError, r"complex(.|\n)*'re': w\.real, 'im': w\.imag"),
}


def helper_name(row_name: str) -> str:
  """'hessian_trace[hutch++]' -> 'hessian_trace'."""
  return row_name.split('[')[0]


def check_bad_input(name, bad):
  bad_loss, params, kw, extra, error, message = BAD_INPUTS[bad]
  call = ROWS[name].call
  with pytest.raises(error, match=message) as info:
    jax.jit(lambda p, k: call(bad_loss, p, k, **extra))(params, kw)
  text = str(info.value)
  assert text.startswith(helper_name(name) + ':'), text
  assert 'Tracer' not in text and 'transformation' not in text, text


CHECKS = {
    'jit': check_jit,
    'zero_gradient': check_zero_gradient,
    'bfloat16': check_bfloat16,
    **{f'nan_{case}': functools.partial(check_nan, case=case)
       for case in NAN_CASES},
    **{f'bad_{bad}': functools.partial(check_bad_input, bad=bad)
       for bad in BAD_INPUTS},
}
# What a helper without a loss_fn (filter_normalized_direction) can be given.
WITHOUT_A_LOSS = ('jit', 'zero_gradient', 'bfloat16', 'nan_params',
                  'bad_complex_params')


# Row-major order: a row's checks run one after another (on one xdist
# worker, mostly), so its compiled function is reused.
@pytest.mark.parametrize('name,check', [
    (name, check) for name, row in ROWS.items() for check in CHECKS
    if row.takes_loss or check in WITHOUT_A_LOSS])
def test_battery(name, check):
  CHECKS[check](name)


def test_every_public_helper_has_a_row():
  public = {n for n in sharpness.__all__ if n[0].islower()}
  rows = {helper_name(name) for name in ROWS}
  assert public - NOT_IN_THE_BATTERY == rows, (
      sorted(public - NOT_IN_THE_BATTERY - rows))


def test_the_references_match_autodiff():
  # The hand-written formulas agree with jax.grad / jax.hessian.
  kw = batch()
  z, unravel = flatten_util.ravel_pytree(PARAMS)
  f = lambda z, kw: loss_fn(unravel(z), **kw)
  grad, hessian = jax.jit(lambda z, kw: (jax.grad(f)(z, kw),
                                         jax.hessian(f)(z, kw)))(z, kw)
  np.testing.assert_allclose(np_grad(flat(PARAMS), kw), grad, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np_hessian(kw), hessian, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np_loss(flat(PARAMS), kw), f(z, kw), rtol=1e-6)
