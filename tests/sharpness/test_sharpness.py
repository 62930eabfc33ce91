"""Perturbation sharpness helpers against closed forms on quadratics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import sharpness


def quadratic(w, a, c):
  """L(w) = w^T A w / 2 + c^T w (gradient A w + c, Hessian A)."""
  return 0.5 * w @ a @ w + c @ w


RNG = np.random.default_rng(0)
DIM = 6
_M = RNG.normal(size=(DIM, DIM))
A = _M @ _M.T / DIM + 0.2 * np.eye(DIM)  # positive definite
C = RNG.normal(size=DIM)
W = RNG.normal(size=DIM)
G = A @ W + C  # the gradient at W
QUAD = {'a': jnp.asarray(A, jnp.float32), 'c': jnp.asarray(C, jnp.float32)}
W32 = jnp.asarray(W, jnp.float32)


def gain(d, a=A, g=G):
  """L(w + d) - L(w) on the quadratic."""
  return g @ d + 0.5 * d @ a @ d


def trust_region_max(a, g, rho):
  """max g.d + d^T A d / 2 over ||d||_2 <= rho, A PSD (secular equation)."""
  lam, q = np.linalg.eigh(a)
  gq = q.T @ g
  lo, hi = lam[-1], lam[-1] + np.linalg.norm(g) / rho
  for _ in range(200):
    mu = 0.5 * (lo + hi)
    if np.linalg.norm(gq / (mu - lam)) > rho:
      lo = mu
    else:
      hi = mu
  d = q @ (gq / (hi - lam))
  return gain(d, a, g), d


# --- first-order and SAM sharpness ---------------------------------------


def test_first_order_is_rho_times_grad_norm():
  s = sharpness.first_order_sharpness(quadratic, W32, rho=0.1,
                                      loss_kwargs=QUAD)
  np.testing.assert_allclose(float(s), 0.1 * np.linalg.norm(G), rtol=1e-5)
  s = sharpness.first_order_sharpness(quadratic, W32, rho=0.1,
                                      adaptive=True, eta=0.01,
                                      loss_kwargs=QUAD)
  t = np.abs(W) + 0.01
  np.testing.assert_allclose(float(s), 0.1 * np.linalg.norm(t * G),
                             rtol=1e-5)


def test_adaptive_sam_sharpness_closed_form():
  rho, eta = 0.3, 0.05
  s = sharpness.sam_sharpness(quadratic, W32, rho=rho, adaptive=True,
                              eta=eta, loss_kwargs=QUAD)
  t = np.abs(W) + eta
  eps = rho * t ** 2 * G / np.linalg.norm(t * G)
  np.testing.assert_allclose(float(s), gain(eps), rtol=1e-4)


def test_zero_gradient_gives_zero_sharpness_not_nan():
  loss_fn = lambda w: jnp.sum(w ** 2)
  zero = jnp.zeros(3)
  for adaptive in (False, True):
    assert float(sharpness.first_order_sharpness(
        loss_fn, zero, adaptive=adaptive)) == 0.0
    assert float(sharpness.sam_sharpness(
        loss_fn, zero, adaptive=adaptive)) == 0.0
  out = sharpness.worst_case_sharpness(loss_fn, zero, num_steps=3)
  assert float(out.sharpness) == 0.0 and float(out.perturbation_norm) == 0.0


# --- worst-case sharpness -------------------------------------------------


def test_worst_case_l2_matches_trust_region_solution():
  rho = 0.5
  out = sharpness.worst_case_sharpness(quadratic, W32, rho=rho,
                                       num_steps=100, loss_kwargs=QUAD)
  expected, d = trust_region_max(A, G, rho)
  np.testing.assert_allclose(float(out.sharpness), expected, rtol=1e-3)
  np.testing.assert_allclose(float(out.perturbation_norm), rho, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(out.perturbation), d, atol=2e-2)
  # Beats (or ties) SAM's one step, which is a feasible point.
  sam = sharpness.sam_sharpness(quadratic, W32, rho=rho, loss_kwargs=QUAD)
  assert float(out.sharpness) >= float(sam) - 1e-5


def test_worst_case_at_a_minimum_finds_the_top_eigendirection():
  # At w* = -A^{-1} c the gradient vanishes: max = rho^2 lambda_max / 2,
  # found only from a random start.
  w_star = jnp.asarray(-np.linalg.solve(A, C), jnp.float32)
  rho = 0.2
  out = sharpness.worst_case_sharpness(
      quadratic, w_star, rho=rho, num_steps=60, random_init=True,
      key=jax.random.key(0), loss_kwargs=QUAD)
  np.testing.assert_allclose(float(out.sharpness),
                             0.5 * rho ** 2 * np.linalg.eigvalsh(A)[-1],
                             rtol=1e-2)


def test_worst_case_linf_diagonal_closed_form():
  # Separable convex quadratic: each coordinate goes to a corner,
  # gain_i = rho |g_i| + a_i rho^2 / 2 at the corner sign(g_i) (from w; a
  # random start may end in the other, local, corner).
  a = np.array([1.0, 2.0, 0.5, 3.0])
  w = np.array([0.3, -0.2, 0.0, 0.1])
  c = np.array([0.1, 0.0, -0.4, 0.0])
  g = a * w + c
  kwargs = {'a': jnp.asarray(np.diag(a), jnp.float32),
            'c': jnp.asarray(c, jnp.float32)}
  rho = 0.25
  out = sharpness.worst_case_sharpness(
      quadratic, jnp.asarray(w, jnp.float32), rho=rho, norm='linf',
      num_steps=30, loss_kwargs=kwargs)
  np.testing.assert_allclose(
      float(out.sharpness), np.sum(rho * np.abs(g) + 0.5 * a * rho ** 2),
      rtol=1e-4)
  np.testing.assert_allclose(float(out.perturbation_norm), rho, rtol=1e-5)
  # Adaptive: delta = T gamma with |gamma_i| <= rho, T = |w| + eta.
  eta = 0.1
  t = np.abs(w) + eta
  out = sharpness.worst_case_sharpness(
      quadratic, jnp.asarray(w, jnp.float32), rho=rho, norm='linf',
      adaptive=True, eta=eta, num_steps=30, loss_kwargs=kwargs)
  np.testing.assert_allclose(
      float(out.sharpness),
      np.sum(rho * t * np.abs(g) + 0.5 * a * (rho * t) ** 2), rtol=1e-4)
  np.testing.assert_allclose(np.abs(np.asarray(out.perturbation)), rho * t,
                             rtol=1e-4)


def test_worst_case_adaptive_l2_matches_scaled_trust_region():
  # gamma-space problem: max (T g).gamma + gamma^T (T A T) gamma / 2.
  rho, eta = 0.3, 0.0
  t = np.abs(W) + eta
  out = sharpness.worst_case_sharpness(
      quadratic, W32, rho=rho, adaptive=True, eta=eta, num_steps=100,
      loss_kwargs=QUAD)
  expected, _ = trust_region_max(t[:, None] * A * t[None], t * G, rho)
  np.testing.assert_allclose(float(out.sharpness), expected, rtol=1e-3)


@functools.partial(jax.jit, static_argnames=('norm',))
def jitted_worst_case(w, kwargs, rho, norm):
  return sharpness.worst_case_sharpness(quadratic, w, rho=rho, norm=norm,
                                        num_steps=100, loss_kwargs=kwargs)


def test_worst_case_under_jit_with_traced_rho():
  out = jitted_worst_case(W32, QUAD, 0.5, 'l2')
  np.testing.assert_allclose(float(out.sharpness),
                             trust_region_max(A, G, 0.5)[0], rtol=1e-3)


def test_apgd_checkpoints():
  # Croce & Hein: p = 0, 0.22, 0.41, 0.57, 0.7, 0.8, 0.87, 0.93, 0.99, ...
  mask = sharpness_checkpoints(100)
  assert list(np.flatnonzero(mask)) == [22, 41, 57, 70, 80, 87, 93, 99]


def sharpness_checkpoints(n):
  from sam_optax._src.sharpness import apgd  # pylint: disable=g-import-not-at-top
  return apgd.apgd_checkpoints(n)


# --- average-case sharpness -----------------------------------------------


@pytest.mark.parametrize('adaptive', [False, True])
def test_average_case_within_its_variance(adaptive):
  sigma, num, eta = 0.3, 400, 0.05
  t = np.abs(W) + eta if adaptive else np.ones(DIM)
  out = sharpness.average_case_sharpness(
      quadratic, W32, sigma=sigma, num_samples=num, adaptive=adaptive,
      eta=eta, key=jax.random.key(3), loss_kwargs=QUAD)
  # sigma (Tg).z + sigma^2 z^T (TAT) z / 2 with z ~ N(0, I):
  ata = t[:, None] * A * t[None]
  mean = 0.5 * sigma ** 2 * np.trace(ata)
  var = sigma ** 2 * np.sum((t * G) ** 2) + 0.5 * sigma ** 4 * np.sum(ata ** 2)
  std = np.sqrt(var / num)
  assert abs(float(out.sharpness) - mean) < 5 * std
  assert 0.7 * std < float(out.standard_error) < 1.3 * std


# --- m-sharpness ------------------------------------------------------------


def per_example_loss(w, x):
  return 0.5 * jnp.mean((x @ w) ** 2)


X = jnp.asarray(RNG.normal(size=(12, 3)), jnp.float32)
WX = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)


def closed_form_sam(x, w, rho):
  """SAM sharpness of mean_i (x_i.w)^2/2 over the rows of x (numpy)."""
  x = np.asarray(x, np.float64)
  a = x.T @ x / len(x)
  g = a @ np.asarray(w, np.float64)
  eps = rho * g / np.linalg.norm(g)
  return g @ eps + 0.5 * eps @ a @ eps


def test_m_sharpness_is_the_mean_over_chunks():
  rho = 0.2
  for m in (1, 3, 12):
    s = sharpness.m_sharpness(per_example_loss, WX, m, rho=rho,
                              loss_kwargs={'x': X})
    expected = np.mean([closed_form_sam(X[i:i + m], WX, rho)
                        for i in range(0, 12, m)])
    np.testing.assert_allclose(float(s), expected, rtol=1e-4)


def test_m_sharpness_over_batches_and_with_worst_case():
  rho = 0.2
  s = sharpness.m_sharpness(per_example_loss, WX, 3, rho=rho,
                            batches=[{'x': X[:6]}, {'x': X[6:]}])
  expected = np.mean([closed_form_sam(X[i:i + 3], WX, rho)
                      for i in range(0, 12, 3)])
  np.testing.assert_allclose(float(s), expected, rtol=1e-4)
  worst = sharpness.m_sharpness(
      per_example_loss, WX, 4, measure=sharpness.worst_case_sharpness,
      rho=rho, num_steps=40, loss_kwargs={'x': X})
  reference = []
  for i in range(0, 12, 4):
    x = np.asarray(X[i:i + 4], np.float64)
    a = x.T @ x / 4
    reference.append(trust_region_max(a, a @ np.asarray(WX), rho)[0])
  np.testing.assert_allclose(float(worst), np.mean(reference), rtol=2e-3)


def test_m_sharpness_under_jit_is_deterministic_for_a_key():
  fn = jax.jit(lambda w, x, key: sharpness.m_sharpness(
      per_example_loss, w, 4, measure=sharpness.average_case_sharpness,
      sigma=0.1, num_samples=4, key=key, loss_kwargs={'x': x}))
  a = fn(WX, X, jax.random.key(1))
  b = fn(WX, X, jax.random.key(1))
  assert float(a) == float(b) and np.isfinite(float(a))


def test_m_sharpness_errors():
  with pytest.raises(ValueError, match='does not split into chunks'):
    sharpness.m_sharpness(per_example_loss, WX, 5, loss_kwargs={'x': X})
  with pytest.raises(ValueError, match='needs the batch'):
    sharpness.m_sharpness(per_example_loss, WX, 2)
  with pytest.raises(ValueError, match='batches is empty'):
    sharpness.m_sharpness(per_example_loss, WX, 2, batches=[])
  with pytest.raises(ValueError, match='m_sharpness: m must be an int >= 1'):
    sharpness.m_sharpness(per_example_loss, WX, 0, loss_kwargs={'x': X})


@pytest.mark.parametrize('call', [
    lambda kw: sharpness.m_sharpness(per_example_loss, WX, 1, loss_kwargs=kw),
    lambda kw: sharpness.sam_sharpness(per_example_loss, WX, loss_kwargs=kw),
    lambda kw: sharpness.hessian_top_eigenvalue(
        per_example_loss, WX, batches=[{'x': X}, kw]),
])
def test_an_empty_batch_is_a_clear_error(call):
  empty = {'x': X[:0]}  # the mean loss of no examples would be NaN
  with pytest.raises(ValueError, match=r"empty batch(.|\n)*at least one"):
    call(empty)


# --- batches, dtypes, bad input ---------------------------------------------


def test_batches_measure_the_mean_loss():
  # Two quadratic batches: the dataset loss has A = mean A_b, c = mean c_b.
  a2 = np.eye(DIM) * 2.0
  c2 = -C
  batches = [QUAD, {'a': jnp.asarray(a2, jnp.float32),
                    'c': jnp.asarray(c2, jnp.float32)}]
  a_mean, c_mean = (A + a2) / 2, (C + c2) / 2
  g = a_mean @ W + c_mean
  rho = 0.3
  s = sharpness.sam_sharpness(quadratic, W32, rho=rho, batches=batches)
  eps = rho * g / np.linalg.norm(g)
  np.testing.assert_allclose(float(s), gain(eps, a_mean, g), rtol=1e-4)
  f = sharpness.first_order_sharpness(quadratic, W32, rho=rho,
                                      batches=iter(batches))
  np.testing.assert_allclose(float(f), rho * np.linalg.norm(g), rtol=1e-5)


def test_bfloat16_params_give_float32_results():
  loss_fn = lambda w, x: jnp.mean((x @ w.astype(jnp.float32)) ** 2)
  w = jnp.asarray([0.5, -1.0, 2.0], jnp.bfloat16)
  s = sharpness.sam_sharpness(loss_fn, w, rho=0.1, loss_kwargs={'x': X})
  assert s.dtype == jnp.float32 and np.isfinite(float(s))
  out = sharpness.average_case_sharpness(loss_fn, w, sigma=0.1,
                                         num_samples=2, loss_kwargs={'x': X})
  assert out.sharpness.dtype == jnp.float32


@pytest.mark.parametrize('bad', [0.0, -0.1, float('nan'), float('inf')])
def test_radius_must_be_positive(bad):
  with pytest.raises(ValueError, match='rho must be a finite number > 0'):
    sharpness.sam_sharpness(quadratic, W32, rho=bad, loss_kwargs=QUAD)
  with pytest.raises(ValueError, match='rho must be a finite number > 0'):
    sharpness.worst_case_sharpness(quadratic, W32, rho=bad,
                                   loss_kwargs=QUAD)
  with pytest.raises(ValueError, match='sigma must be a finite number > 0'):
    sharpness.average_case_sharpness(quadratic, W32, sigma=bad,
                                     loss_kwargs=QUAD)


def test_bad_input_errors():
  with pytest.raises(ValueError, match="norm must be 'l2' or 'linf'"):
    sharpness.worst_case_sharpness(quadratic, W32, norm='l1',
                                   loss_kwargs=QUAD)
  with pytest.raises(ValueError, match='batches is empty'):
    sharpness.first_order_sharpness(quadratic, W32, batches=iter([]))
  with pytest.raises(ValueError, match='must return a scalar'):
    sharpness.sam_sharpness(lambda w: w * 2.0, W32)
  with pytest.raises(TypeError, match='loss_fn must be a callable'):
    sharpness.sam_sharpness('loss', W32)
  with pytest.raises(TypeError, match='rho must be a number'):
    sharpness.sam_sharpness(quadratic, W32, rho='0.1', loss_kwargs=QUAD)
  with pytest.raises(ValueError, match='eta must be a finite number >= 0'):
    sharpness.sam_sharpness(quadratic, W32, adaptive=True, eta=-1.0,
                            loss_kwargs=QUAD)
  with pytest.raises(ValueError, match='given both in loss_kwargs'):
    sharpness.sam_sharpness(quadratic, W32, loss_kwargs={'a': QUAD['a']},
                            batches=[QUAD])


# --- NaN losses, m-sharpness measures -----------------------------------------


def offset_loss(w, x, offset):
  return per_example_loss(w, x) + offset


NAN_INPUTS = {
    # The loss is NaN but its gradient is finite (a NaN constant term).
    'loss': {'x': X, 'offset': jnp.float32(jnp.nan)},
    # One example is NaN: NaN loss and gradient, in one chunk only.
    'one_example': {'x': X.at[0, 0].set(jnp.nan), 'offset': jnp.float32(0)},
}


@jax.jit
def nan_outputs(kwargs):
  """Every perturbation helper on one batch, in one compiled function."""
  kw = {'loss_kwargs': kwargs}
  worst = sharpness.worst_case_sharpness(offset_loss, WX, num_steps=3, **kw)
  return {
      'first_order': sharpness.first_order_sharpness(offset_loss, WX, **kw),
      'sam': sharpness.sam_sharpness(offset_loss, WX, **kw),
      'worst_case': worst.sharpness,
      'worst_case.perturbation_norm': worst.perturbation_norm,
      'worst_case.perturbation': worst.perturbation,
      'average_case': sharpness.average_case_sharpness(
          offset_loss, WX, num_samples=2, **kw).sharpness,
      'm_sharpness': sharpness.m_sharpness(offset_loss, WX, 4, **kw),
      'm_sharpness(worst_case)': sharpness.m_sharpness(
          offset_loss, WX, 4, measure=sharpness.worst_case_sharpness,
          num_steps=3, **kw),
  }


@pytest.mark.parametrize('where', NAN_INPUTS)
def test_nan_loss_gives_nan_never_a_plausible_number(where):
  for name, value in nan_outputs(NAN_INPUTS[where]).items():
    assert np.all(np.isnan(np.asarray(value))), (name, value)


# m-sharpness with each measure, against a Python loop over the chunks with
# references from jax.hessian / jax.grad and numpy (diagonal Hessians, so
# Hutchinson's estimate and the power iteration are exact).
X_DIAG = X * jnp.asarray([2.0, 1.0, 0.5])


def diagonal_loss(w, x):
  """mean_i sum_j (x_ij w_j)^2 / 2: Hessian diag(mean_i x_ij^2)."""
  return 0.5 * jnp.mean(jnp.sum((x * w) ** 2, axis=1))


def chunk_references(m, rho=0.2, sigma=0.1, num_samples=64):
  """Per-chunk (gradient, Hessian) -> the reference of each measure."""
  refs = {name: [] for name in MEASURES}
  variance = 0.0
  for i in range(0, X_DIAG.shape[0], m):
    x = X_DIAG[i:i + m]
    g = np.asarray(jax.grad(diagonal_loss)(WX, x), np.float64)
    h = np.asarray(jax.hessian(diagonal_loss)(WX, x), np.float64)
    eigs = np.linalg.eigvalsh(h)
    eps = rho * g / np.linalg.norm(g)
    refs['first_order'].append(rho * np.linalg.norm(g))
    refs['sam'].append(gain(eps, h, g))
    refs['worst_case'].append(trust_region_max(h, g, rho)[0])
    refs['average_case'].append(0.5 * sigma ** 2 * np.trace(h))
    refs['top_eigenvalue'].append(eigs[np.argmax(np.abs(eigs))])
    refs['eigenvalues'].append(eigs[::-1][:2])
    refs['trace'].append(np.trace(h))
    variance += (sigma ** 2 * g @ g + 0.5 * sigma ** 4 * np.sum(h ** 2)) / (
        num_samples)
  chunks = X_DIAG.shape[0] // m
  means = {name: np.mean(values, axis=0) for name, values in refs.items()}
  return means, np.sqrt(variance) / chunks


MEASURES = {
    'first_order': (sharpness.first_order_sharpness, {'rho': 0.2}),
    'sam': (sharpness.sam_sharpness, {'rho': 0.2}),
    'worst_case': (sharpness.worst_case_sharpness,
                   {'rho': 0.2, 'num_steps': 40}),
    'average_case': (sharpness.average_case_sharpness,
                     {'sigma': 0.1, 'num_samples': 64}),
    'top_eigenvalue': (sharpness.hessian_top_eigenvalue,
                       {'tolerance': 1e-6, 'num_iterations': 200}),
    'eigenvalues': (sharpness.hessian_eigenvalues, {'k': 2}),
    'trace': (sharpness.hessian_trace, {'num_samples': 4}),
}


@pytest.mark.parametrize('name', MEASURES)
def test_m_sharpness_with_each_measure_is_the_mean_over_chunks(name):
  measure, options = MEASURES[name]
  out = sharpness.m_sharpness(diagonal_loss, WX, 4, measure=measure,
                              loss_kwargs={'x': X_DIAG}, **options)
  references, average_case_std = chunk_references(4)
  assert out.dtype == jnp.float32
  if name == 'average_case':
    assert abs(float(out) - references[name]) < 5 * average_case_std
  else:
    np.testing.assert_allclose(np.asarray(out), references[name], rtol=2e-3)


def test_m_sharpness_refuses_a_measure_without_a_main_value():
  with pytest.raises(TypeError, match='SpectralDensity'):
    sharpness.m_sharpness(diagonal_loss, WX, 4,
                          measure=sharpness.hessian_spectral_density,
                          num_lanczos=2, loss_kwargs={'x': X_DIAG})


# --- zero gradient: values and derivatives finite -----------------------------


def test_zero_gradient_derivatives_are_finite():
  # At the minimum w = 0 of a convex quadratic: the helpers as functions of
  # w (e.g. a sharpness penalty) have finite derivatives there.
  loss_fn = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 4.0) * w ** 2)
  helpers = (
      lambda w: sharpness.first_order_sharpness(loss_fn, w),
      lambda w: sharpness.first_order_sharpness(loss_fn, w, adaptive=True),
      lambda w: sharpness.sam_sharpness(loss_fn, w),
      lambda w: sharpness.worst_case_sharpness(loss_fn, w,
                                               num_steps=2).sharpness,
      lambda w: sharpness.average_case_sharpness(loss_fn, w,
                                                 num_samples=2).sharpness,
  )
  pairs = jax.jit(lambda w: [jax.value_and_grad(f)(w)
                             for f in helpers])(jnp.zeros(3))
  for i, (value, grad) in enumerate(pairs):
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), i
