"""Hessian helpers against the dense Hessian (jax.hessian + numpy.linalg)."""

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import sharpness


def mlp_loss(params, x, y):
  h = jnp.tanh(x @ params['w1'] + params['b1'])
  out = h @ params['w2'] + params['b2']
  return jnp.mean((out[:, 0] - y) ** 2)


def make_problem(seed=0, n=24):
  k = jax.random.split(jax.random.key(seed), 5)
  params = {
      'w1': jax.random.normal(k[0], (3, 4)),
      'b1': 0.1 * jax.random.normal(k[1], (4,)),
      'w2': jax.random.normal(k[2], (4, 1)),
      'b2': jnp.zeros((1,)),
  }
  x = jax.random.normal(k[3], (n, 3))
  y = jnp.sin(x[:, 0]) + 0.5 * jax.random.normal(k[4], (n,))
  return params, {'x': x, 'y': y}


PARAMS, BATCH = make_problem()
N = sum(p.size for p in jax.tree.leaves(PARAMS))  # 21


def dense_hessian(loss_fn, params, kwargs_list):
  flat, unravel = flatten_util.ravel_pytree(params)
  f = lambda z: jnp.mean(jnp.stack(
      [loss_fn(unravel(z), **kw) for kw in kwargs_list]))
  return np.asarray(jax.jit(jax.hessian(f))(flat), np.float64)


H = dense_hessian(mlp_loss, PARAMS, [BATCH])
EIGS = np.linalg.eigvalsh(H)  # ascending


def flat(tree):
  return np.asarray(flatten_util.ravel_pytree(tree)[0], np.float64)


def test_top_eigenvalue_and_eigenvector():
  top = sharpness.hessian_top_eigenvalue(
      mlp_loss, PARAMS, num_iterations=1000, tolerance=1e-7,
      loss_kwargs=BATCH)
  dominant = EIGS[np.argmax(np.abs(EIGS))]
  assert dominant > 0  # near-minimum-like problem: the top one dominates
  np.testing.assert_allclose(float(top.eigenvalue), dominant, rtol=1e-4)
  vec = flat(top.eigenvector)
  np.testing.assert_allclose(np.linalg.norm(vec), 1.0, rtol=1e-5)
  true_vec = np.linalg.eigh(H)[1][:, np.argmax(np.abs(EIGS))]
  assert abs(vec @ true_vec) > 0.999
  assert 1 < int(top.num_iterations) < 1000  # stopped on the tolerance


def test_top_eigenvalue_stops_early_with_loose_tolerance():
  loose = sharpness.hessian_top_eigenvalue(
      mlp_loss, PARAMS, num_iterations=1000, tolerance=1e-2,
      loss_kwargs=BATCH)
  tight = sharpness.hessian_top_eigenvalue(
      mlp_loss, PARAMS, num_iterations=1000, tolerance=1e-7,
      loss_kwargs=BATCH)
  assert int(loose.num_iterations) < int(tight.num_iterations)


def test_zero_hessian_gives_zero_not_nan():
  linear = lambda w: jnp.sum(w['a'] * 3.0)
  params = {'a': jnp.ones(5)}
  top = sharpness.hessian_top_eigenvalue(linear, params)
  assert float(top.eigenvalue) == 0.0
  assert np.all(np.isfinite(flat(top.eigenvector)))
  trace = sharpness.hessian_trace(linear, params, num_samples=4)
  assert float(trace.trace) == 0.0 and float(trace.standard_error) == 0.0


def test_lanczos_top_k_exact_with_full_basis():
  out = sharpness.hessian_eigenvalues(mlp_loss, PARAMS, k=5,
                                      num_iterations=N, loss_kwargs=BATCH)
  np.testing.assert_allclose(np.asarray(out.eigenvalues), EIGS[::-1][:5],
                             rtol=1e-3, atol=1e-4)
  # Ritz vectors are eigenvectors: H v = lambda v, unit norm.
  vectors = np.stack([flat(jax.tree.map(lambda x, i=i: x[i], out.eigenvectors))
                      for i in range(5)])
  for lam, v in zip(np.asarray(out.eigenvalues), vectors):
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-4)
    np.testing.assert_allclose(H @ v, lam * v, atol=2e-3 * abs(EIGS).max())


def test_lanczos_smallest_and_magnitude():
  small = sharpness.hessian_eigenvalues(
      mlp_loss, PARAMS, k=3, which='smallest', num_iterations=N,
      loss_kwargs=BATCH)
  np.testing.assert_allclose(np.asarray(small.eigenvalues), EIGS[:3],
                             atol=2e-4 * abs(EIGS).max())


def test_lanczos_partial_basis_gets_the_extremes():
  out = sharpness.hessian_eigenvalues(mlp_loss, PARAMS, k=2,
                                      num_iterations=14, loss_kwargs=BATCH)
  np.testing.assert_allclose(np.asarray(out.eigenvalues), EIGS[::-1][:2],
                             rtol=1e-3)


def test_lanczos_rank_deficient_hessian_restarts():
  # Least squares with 3 examples and 8 weights: rank-3 Hessian 2 X^T X / 3,
  # so the Krylov space becomes invariant after 3 steps.
  x = jax.random.normal(jax.random.key(3), (3, 8))
  loss_fn = lambda w, x: jnp.mean((x @ w) ** 2)
  exact = np.linalg.eigvalsh(2 * np.asarray(x, np.float64).T
                             @ np.asarray(x, np.float64) / 3)[::-1]
  out = sharpness.hessian_eigenvalues(loss_fn, jnp.zeros(8), k=8,
                                      loss_kwargs={'x': x})
  np.testing.assert_allclose(np.asarray(out.eigenvalues), exact,
                             atol=1e-4 * exact.max())


def test_hutchinson_trace_within_its_variance():
  num = 2000
  out = sharpness.hessian_trace(mlp_loss, PARAMS, num_samples=num,
                                key=jax.random.key(7), loss_kwargs=BATCH)
  # Var(v^T H v) for Rademacher v: 2 (||H||_F^2 - sum_i H_ii^2).
  per_probe_var = 2 * (np.sum(H ** 2) - np.sum(np.diag(H) ** 2))
  sigma = np.sqrt(per_probe_var / num)
  assert abs(float(out.trace) - np.trace(H)) < 5 * sigma
  # The reported standard error estimates that same sigma.
  assert 0.8 * sigma < float(out.standard_error) < 1.2 * sigma


def test_trace_deterministic_for_a_key():
  kwargs = dict(num_samples=8, key=jax.random.key(1), loss_kwargs=BATCH)
  a = sharpness.hessian_trace(mlp_loss, PARAMS, **kwargs)
  b = sharpness.hessian_trace(mlp_loss, PARAMS, **kwargs)
  assert float(a.trace) == float(b.trace)


def test_spectral_density_moments():
  probes = 64
  out = sharpness.hessian_spectral_density(
      mlp_loss, PARAMS, num_lanczos=8, num_probes=probes, grid_size=400,
      key=jax.random.key(5), loss_kwargs=BATCH)
  nodes = np.asarray(out.nodes, np.float64)
  weights = np.asarray(out.weights, np.float64)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
  for q in range(1, 5):  # exact per probe for q < 2m; mean over probes
    hq = np.linalg.matrix_power(H, q)
    estimate = np.mean(np.sum(weights * nodes ** q, axis=1))
    # For v uniform Rademacher / sqrt(n): Var(v^T M v) = 2(|M|_F^2 - |diag M|^2)/n^2.
    var = 2 * (np.sum(hq ** 2) - np.sum(np.diag(hq) ** 2)) / N ** 2
    tol = 5 * np.sqrt(var / probes) + 1e-4 * np.abs(EIGS).max() ** q
    assert abs(estimate - np.trace(hq) / N) < tol, q
  grid = np.asarray(out.grid)
  density = np.asarray(out.density)
  assert grid[0] < EIGS.min() and grid[-1] > EIGS.max()
  np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, atol=1e-2)
  mean = np.trapezoid(grid * density, grid)
  np.testing.assert_allclose(mean, np.mean(np.sum(weights * nodes, axis=1)),
                             rtol=1e-2, atol=1e-3)


def test_spectral_density_full_lanczos_single_probe_is_exact():
  # m = n: the quadrature nodes are the eigenvalues themselves.
  out = sharpness.hessian_spectral_density(
      mlp_loss, PARAMS, num_lanczos=N, num_probes=1, loss_kwargs=BATCH)
  np.testing.assert_allclose(np.sort(np.asarray(out.nodes[0])), EIGS,
                             atol=2e-4 * abs(EIGS).max())


SECOND = make_problem(seed=1)[1]
H_DATASET = dense_hessian(mlp_loss, PARAMS, [BATCH, SECOND])


def test_batches_average_the_dataset_hessian():
  v = jax.tree.map(jnp.ones_like, PARAMS)
  hv = sharpness.hessian_vector_product(mlp_loss, PARAMS, v,
                                        batches=[BATCH, SECOND])
  np.testing.assert_allclose(flat(hv), H_DATASET @ flat(v), rtol=1e-4,
                             atol=1e-5)
  eig = sharpness.hessian_eigenvalues(mlp_loss, PARAMS, k=2,
                                      num_iterations=N,
                                      batches=iter([BATCH, SECOND]))
  np.testing.assert_allclose(np.asarray(eig.eigenvalues),
                             np.linalg.eigvalsh(H_DATASET)[::-1][:2],
                             rtol=1e-3)


def test_shared_loss_kwargs_with_batches():
  def loss_fn(params, x, y, scale):
    return scale * mlp_loss(params, x, y)

  hv = sharpness.hessian_vector_product(
      loss_fn, PARAMS, jax.tree.map(jnp.ones_like, PARAMS),
      loss_kwargs={'scale': 2.0}, batches=[BATCH, SECOND])
  np.testing.assert_allclose(
      flat(hv), 2 * H_DATASET @ flat(jax.tree.map(jnp.ones_like, PARAMS)),
      rtol=1e-4, atol=1e-5)


def test_has_aux():
  loss_aux = lambda p, x, y: (mlp_loss(p, x, y), {'n': x.shape[0]})
  v = jax.tree.map(jnp.ones_like, PARAMS)
  hv = sharpness.hessian_vector_product(loss_aux, PARAMS, v,
                                        loss_kwargs=BATCH, has_aux=True)
  np.testing.assert_allclose(flat(hv), H @ flat(v), rtol=1e-4, atol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match='larger than the number of parameters'):
    sharpness.hessian_eigenvalues(mlp_loss, PARAMS, k=N + 1,
                                  loss_kwargs=BATCH)
  with pytest.raises(ValueError, match='k must be an int >= 1'):
    sharpness.hessian_eigenvalues(mlp_loss, PARAMS, k=0, loss_kwargs=BATCH)
  with pytest.raises(ValueError, match='exceeds the number of parameters'):
    sharpness.hessian_eigenvalues(mlp_loss, PARAMS, k=2,
                                  num_iterations=N + 5, loss_kwargs=BATCH)
  with pytest.raises(ValueError, match='which must be'):
    sharpness.hessian_eigenvalues(mlp_loss, PARAMS, k=2, which='top',
                                  loss_kwargs=BATCH)
  with pytest.raises(ValueError, match='batches is empty'):
    sharpness.hessian_trace(mlp_loss, PARAMS, batches=[])
  with pytest.raises(ValueError, match='must have equal shapes'):
    short = jax.tree.map(lambda x: x[:5], SECOND)
    sharpness.hessian_trace(mlp_loss, PARAMS, batches=[BATCH, short])
  with pytest.raises(TypeError, match='single dict'):
    sharpness.hessian_trace(mlp_loss, PARAMS, batches=BATCH)
  with pytest.raises(ValueError, match='must return a scalar'):
    sharpness.hessian_trace(lambda p, x, y: (x @ p['w1']).sum(0), PARAMS,
                            loss_kwargs=BATCH)
  with pytest.raises(TypeError, match='has_aux=True'):
    sharpness.hessian_trace(lambda p, x, y: mlp_loss(p, x, y), PARAMS,
                            loss_kwargs=BATCH, has_aux=True)
  with pytest.raises(ValueError, match='bandwidth must be a finite number > 0'):
    sharpness.hessian_spectral_density(mlp_loss, PARAMS, bandwidth=0.0,
                                       loss_kwargs=BATCH)


# --- opposite dominant eigenvalues, residuals, NaN ---------------------------

PLUS_MINUS = np.array([2.0, -2.0, 1.0, 0.5, -0.25])


def plus_minus_loss(w):
  """L = w^T diag(2, -2, 1, 0.5, -0.25) w / 2: eigenvalues +2 and -2 tie."""
  return 0.5 * jnp.sum(jnp.asarray(PLUS_MINUS, jnp.float32) * w ** 2)


H_PM = np.asarray(jax.hessian(plus_minus_loss)(jnp.zeros(5)), np.float64)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_power_iteration_with_opposite_dominant_eigenvalues(seed):
  # The Rayleigh quotient of the swinging iterate is stable but wrong; the
  # result must be +-2 with a true eigenvector, or say converged=False.
  top = sharpness.hessian_top_eigenvalue(plus_minus_loss, jnp.zeros(5),
                                         key=jax.random.key(seed))
  assert bool(top.converged)
  largest = np.abs(np.linalg.eigvalsh(H_PM)).max()
  np.testing.assert_allclose(abs(float(top.eigenvalue)), largest, rtol=1e-3)
  v = flat(top.eigenvector)
  np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-5)
  np.testing.assert_allclose(H_PM @ v, float(top.eigenvalue) * v, atol=2e-2)


def test_power_iteration_reports_no_convergence():
  # Too few steps for a gap of 2 vs 1.9: converged=False, not a wrong claim.
  loss_fn = lambda w: 0.5 * jnp.sum(jnp.asarray([2.0, 1.9, 0.1]) * w ** 2)
  top = sharpness.hessian_top_eigenvalue(loss_fn, jnp.zeros(3),
                                         num_iterations=3, tolerance=1e-6)
  assert not bool(top.converged) and int(top.num_iterations) == 3
  ok = sharpness.hessian_top_eigenvalue(mlp_loss, PARAMS, loss_kwargs=BATCH)
  assert bool(ok.converged)


def test_lanczos_opposite_eigenvalues_and_residuals():
  out = jax.jit(lambda w: sharpness.hessian_eigenvalues(
      plus_minus_loss, w, k=2, which='magnitude', num_iterations=5))(
          jnp.zeros(5))
  np.testing.assert_allclose(np.sort(np.asarray(out.eigenvalues)), [-2, 2],
                             atol=1e-4)
  assert np.all(np.asarray(out.residuals) < 1e-4)
  # A partial basis: the reported residuals are the true ||H y - theta y||.
  part = jax.jit(lambda p, b: sharpness.hessian_eigenvalues(
      mlp_loss, p, k=3, num_iterations=6, loss_kwargs=b))(PARAMS, BATCH)
  for i in range(3):
    y = flat(jax.tree.map(lambda x, i=i: x[i], part.eigenvectors))
    theta = float(part.eigenvalues[i])
    np.testing.assert_allclose(float(part.residuals[i]),
                               np.linalg.norm(H @ y - theta * y),
                               rtol=2e-2, atol=1e-4 * abs(EIGS).max())
  assert float(part.residuals.max()) > 1e-3  # not converged: visible


def offset_loss(params, x, y, offset):
  return mlp_loss(params, x, y) + offset


@jax.jit
def nan_outputs(kwargs):
  """Every Hessian helper on one batch, in one compiled function."""
  kw = {'loss_kwargs': kwargs}
  top = sharpness.hessian_top_eigenvalue(offset_loss, PARAMS, **kw)
  return {
      'hvp': sharpness.hessian_vector_product(offset_loss, PARAMS, PARAMS,
                                              **kw),
      'eigenvalue': top.eigenvalue, 'eigenvector': top.eigenvector,
      'converged': top.converged,
      'eigenvalues': sharpness.hessian_eigenvalues(
          offset_loss, PARAMS, k=2, num_iterations=6, **kw).eigenvalues,
      'trace': sharpness.hessian_trace(offset_loss, PARAMS, num_samples=2,
                                       **kw).trace,
      'density': sharpness.hessian_spectral_density(
          offset_loss, PARAMS, num_lanczos=4, num_probes=1, grid_size=8,
          **kw).density,
  }


@pytest.mark.parametrize('where', ['loss', 'one_example'])
def test_nan_loss_gives_nan(where):
  if where == 'loss':  # NaN loss, finite Hessian
    kwargs = {**BATCH, 'offset': jnp.float32(jnp.nan)}
  else:
    kwargs = {**BATCH, 'y': BATCH['y'].at[0].set(jnp.nan),
              'offset': jnp.float32(0)}
  out = nan_outputs(kwargs)
  assert not bool(out.pop('converged'))
  for name, value in out.items():
    assert np.all(np.isnan(flat(value))), name


def test_top_eigenvalue_of_a_huge_curvature_does_not_overflow():
  # H = diag(3e19, 1e19): |H v|^2 overflows float32 although |H v| fits.
  curvatures = jnp.array([3e19, 1e19], jnp.float32)
  loss_fn = lambda w: 0.5 * jnp.sum(curvatures * w ** 2)
  top = sharpness.hessian_top_eigenvalue(loss_fn, jnp.zeros(2))
  assert bool(top.converged)
  np.testing.assert_allclose(float(top.eigenvalue), 3e19, rtol=1e-4)
  np.testing.assert_allclose(np.abs(top.eigenvector), [1.0, 0.0], atol=1e-2)
