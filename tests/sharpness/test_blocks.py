"""Per-layer curvature: ``select=`` and ``per_leaf=`` on the spectral helpers.

References: the dense diagonal block of ``jax.hessian`` (or of an explicit
GGN, J^T H_out J from ``jax.jacfwd``) eigendecomposed by NumPy, and the same
helper on a hand-written model whose other leaves are closed over.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import sharpness

rng = np.random.default_rng(1)
X = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
Y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
KW = {'x': X, 'y': Y}
PARAMS = {
    'w1': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
    'b1': jnp.asarray(rng.normal(size=(4,)) * 0.3, jnp.float32),
    'w2': jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
}
KEY = jax.random.key(0)


def apply_fn(p, x, **_):
  return jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2']


def output_loss(z, y, **_):
  return 0.5 * jnp.mean(jnp.sum((z - y) ** 2, axis=-1))


def loss_fn(p, x, y):
  return output_loss(apply_fn(p, x), y)


def flat_block(names, matrix_fn):
  """The dense block over the named leaves, in params' leaf order."""
  names = [n for n in sorted(PARAMS) if n in names]  # dict leaf order
  shapes = [PARAMS[n].shape for n in names]
  sizes = [int(np.prod(s)) for s in shapes]

  def unflat(v):
    parts = jnp.split(v, np.cumsum(sizes)[:-1])
    return {**PARAMS, **{n: p.reshape(s) for n, p, s in
                         zip(names, parts, shapes)}}

  v0 = jnp.concatenate([PARAMS[n].ravel() for n in names])
  return np.asarray(matrix_fn(unflat, v0), np.float64)


def dense_hessian(unflat, v0):
  return jax.hessian(lambda v: loss_fn(unflat(v), X, Y))(v0)


def dense_ggn(unflat, v0):
  z = apply_fn(unflat(v0), X)
  jac = jax.jacfwd(lambda v: apply_fn(unflat(v), X).ravel())(v0)
  h_out = jax.hessian(lambda zz: output_loss(zz.reshape(z.shape), Y))(
      z.ravel())
  return jac.T @ h_out @ jac


@functools.cache
def per_leaf_results():
  top = jax.jit(lambda p: sharpness.hessian_top_eigenvalue(
      loss_fn, p, num_iterations=300, tolerance=1e-7, key=KEY,
      loss_kwargs=KW, per_leaf=True))(PARAMS)
  trace = jax.jit(lambda p: sharpness.hessian_trace(
      loss_fn, p, num_samples=60, method='hutch++', key=KEY,
      loss_kwargs=KW, per_leaf=True))(PARAMS)
  return top, trace


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_per_leaf_equals_the_dense_block(name):
  top, trace = per_leaf_results()
  eigs = np.linalg.eigvalsh(flat_block([name], dense_hessian))
  dominant = eigs[np.argmax(np.abs(eigs))]
  np.testing.assert_allclose(top[name].eigenvalue, dominant, rtol=1e-3)
  assert top[name].eigenvector.shape == PARAMS[name].shape
  # Hutch++ with 3k >= 3n is exact: w1 has n = 12 <= 20 = k.
  np.testing.assert_allclose(trace[name].trace, eigs.sum(), rtol=1e-3,
                             atol=1e-4)


def test_per_leaf_equals_the_frozen_model():
  top, _ = per_leaf_results()
  frozen = lambda w2, x, y: loss_fn({**PARAMS, 'w2': w2}, x, y)
  want = sharpness.hessian_top_eigenvalue(
      frozen, PARAMS['w2'], num_iterations=300, tolerance=1e-7, key=KEY,
      loss_kwargs=KW)
  np.testing.assert_allclose(top['w2'].eigenvalue, want.eigenvalue,
                             rtol=1e-5)
  np.testing.assert_allclose(np.abs(top['w2'].eigenvector),
                             np.abs(want.eigenvector), atol=1e-3)


SELECTIONS = {
    'tree': {'w1': True, 'b1': False, 'w2': True},
    'function': lambda p: {k: k != 'b1' for k in p},
    'predicate': lambda path, leaf: 'w' in jax.tree_util.keystr(path),
}


@pytest.mark.parametrize('how', list(SELECTIONS))
def test_select_measures_the_block(how):
  out = sharpness.hessian_eigenvalues(
      loss_fn, PARAMS, 3, num_iterations=20, key=KEY, loss_kwargs=KW,
      select=SELECTIONS[how])
  eigs = np.sort(np.linalg.eigvalsh(flat_block(['w1', 'w2'],
                                               dense_hessian)))[::-1]
  np.testing.assert_allclose(out.eigenvalues, eigs[:3], rtol=1e-3, atol=1e-4)
  # Eigenvectors are like params and zero outside the selection.
  assert out.eigenvectors['b1'].shape == (3, 4)
  np.testing.assert_array_equal(out.eigenvectors['b1'], 0.0)
  assert np.all(out.residuals < 1e-3)


def test_select_with_ggn_equals_the_dense_ggn_block():
  out = sharpness.hessian_eigenvalues(
      loss_fn, PARAMS, 2, num_iterations=8, key=KEY, loss_kwargs=KW,
      select={'w1': False, 'b1': False, 'w2': True},
      curvature=sharpness.GGN(apply_fn, output_loss))
  eigs = np.sort(np.linalg.eigvalsh(flat_block(['w2'], dense_ggn)))[::-1]
  np.testing.assert_allclose(out.eigenvalues, eigs[:2], rtol=1e-4)


def test_per_leaf_with_empirical_fisher():
  per_example = lambda p, x, y: 0.5 * jnp.sum((apply_fn(p, x) - y) ** 2, -1)
  out = sharpness.hessian_trace(
      loss_fn, PARAMS, num_samples=30, method='hutch++', loss_kwargs=KW,
      per_leaf=True, curvature=sharpness.EmpiricalFisher(per_example))
  grads = jax.vmap(jax.grad(lambda p, x, y: per_example(p, x[None],
                                                        y[None])[0]),
                   in_axes=(None, 0, 0))(PARAMS, X, Y)
  want = np.mean(np.sum(np.asarray(grads['b1']) ** 2, axis=1))
  np.testing.assert_allclose(out['b1'].trace, want, rtol=1e-4)


def test_spectral_density_per_leaf_is_a_tree_of_densities():
  out = sharpness.hessian_spectral_density(
      loss_fn, PARAMS, num_lanczos=4, num_probes=1, grid_size=8,
      loss_kwargs=KW, per_leaf=True, select={'w1': True, 'b1': False,
                                             'w2': True})
  assert out['b1'] is None
  assert out['w1'].density.shape == (8,)
  moment = np.sum(out['w2'].weights * out['w2'].nodes)
  eigs = np.linalg.eigvalsh(flat_block(['w2'], dense_hessian))
  np.testing.assert_allclose(moment, eigs.mean(), rtol=0.5)  # one probe


def test_nan_loss_gives_nan_per_leaf():
  bad = {'x': X.at[0, 0].set(jnp.nan), 'y': Y}
  out = sharpness.hessian_top_eigenvalue(
      loss_fn, PARAMS, num_iterations=3, loss_kwargs=bad, per_leaf=True)
  for name in PARAMS:
    assert np.isnan(out[name].eigenvalue)
    assert not out[name].converged


def test_zero_block_is_zero():
  # The loss does not depend on b2: its block is exactly zero.
  params = {**PARAMS, 'b2': jnp.zeros(2)}
  out = sharpness.hessian_top_eigenvalue(
      lambda p, x, y: loss_fn(p, x, y), params, num_iterations=3,
      loss_kwargs=KW, select={'w1': False, 'b1': False, 'w2': False,
                              'b2': True})
  assert float(out.eigenvalue) == 0.0
  assert np.all(np.isfinite(out.eigenvector['b2']))


def test_bad_selection_errors():
  with pytest.raises(ValueError, match='selects no'):
    sharpness.hessian_trace(loss_fn, PARAMS, loss_kwargs=KW,
                            select=lambda path, leaf: False)
  with pytest.raises(ValueError, match='pytree of bools'):
    sharpness.hessian_trace(loss_fn, PARAMS, loss_kwargs=KW,
                            select={'w1': True})
  with pytest.raises(TypeError, match='per_leaf'):
    sharpness.hessian_trace(loss_fn, PARAMS, loss_kwargs=KW, per_leaf='yes')
