"""curvature= on the spectral helpers: GGN and empirical Fisher vs dense.

The dense references are built independently: J by jax.jacfwd, H_out by
jax.hessian, per-example gradients by jax.jacrev, then numpy eigh / trace.
"""

from __future__ import annotations

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import sharpness

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(6, 3)), jnp.float32)
LABELS = jnp.asarray([0, 1, 2, 1, 0, 2])
PARAMS = {'w1': jnp.asarray(RNG.normal(size=(3, 3)), jnp.float32),
          'w2': jnp.asarray(RNG.normal(size=(3, 3)), jnp.float32)}
FLAT, UNRAVEL = flatten_util.ravel_pytree(PARAMS)
N = FLAT.shape[0]  # 18


def apply_fn(params, x, **_):
  return jnp.tanh(x @ params['w1']) @ params['w2']


def output_loss(logits, labels, offset=0.0, **_):
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)) + offset


def per_example_loss(params, x, labels, offset=0.0):
  logp = jax.nn.log_softmax(apply_fn(params, x))
  return -jnp.take_along_axis(logp, labels[:, None], 1)[:, 0] + offset


def loss_fn(params, x, labels, offset=0.0):
  return output_loss(apply_fn(params, x), labels, offset)


# offset is always passed (0 here, NaN in one test): one compiled `measured`.
KW = {'x': X, 'labels': LABELS, 'offset': jnp.float32(0.0)}
CURVATURES = {
    'ggn': sharpness.GGN(apply_fn, output_loss),
    'fisher': sharpness.EmpiricalFisher(per_example_loss),
}


def dense(name):
  """The dense matrix, float64."""
  if name == 'ggn':
    z = apply_fn(PARAMS, X)
    jac = jax.jacfwd(lambda f: apply_fn(UNRAVEL(f), X))(FLAT).reshape(-1, N)
    h_out = jax.hessian(lambda z: output_loss(z, LABELS))(z)
    h_out = np.asarray(h_out, np.float64).reshape(z.size, z.size)
    jac = np.asarray(jac, np.float64)
    return jac.T @ h_out @ jac
  grads = np.asarray(jax.jacrev(
      lambda f: per_example_loss(UNRAVEL(f), X, LABELS))(FLAT), np.float64)
  return grads.T @ grads / grads.shape[0]


@jax.jit
def measured(params, kw):
  out = {}
  for name, c in CURVATURES.items():
    out[name] = (
        sharpness.hessian_top_eigenvalue(loss_fn, params, loss_kwargs=kw,
                                         curvature=c, num_iterations=300,
                                         tolerance=1e-6).eigenvalue,
        sharpness.hessian_eigenvalues(loss_fn, params, k=N, loss_kwargs=kw,
                                      curvature=c).eigenvalues,
        sharpness.hessian_trace(loss_fn, params, num_samples=3 * N,
                                method='hutch++', loss_kwargs=kw,
                                curvature=c).trace,
        sharpness.hessian_spectral_density(
            loss_fn, params, num_lanczos=N, num_probes=1, grid_size=8,
            loss_kwargs=kw, curvature=c).nodes[0],
    )
  return out


@pytest.mark.parametrize('name', sorted(CURVATURES))
def test_against_the_dense_matrix(name):
  matrix = dense(name)
  assert np.allclose(matrix, matrix.T)
  eigs = np.linalg.eigvalsh(matrix)
  assert eigs.min() > -1e-6 * eigs.max()  # PSD
  top, all_eigs, trace, nodes = measured(PARAMS, KW)[name]
  scale = eigs.max()
  np.testing.assert_allclose(top, eigs.max(), rtol=1e-3)
  np.testing.assert_allclose(all_eigs, eigs[::-1], atol=2e-4 * scale)
  np.testing.assert_allclose(trace, np.trace(matrix), rtol=1e-3)
  np.testing.assert_allclose(np.sort(nodes), eigs, atol=2e-4 * scale)
  # And it is not the Hessian (the model is nonlinear).
  hessian = np.asarray(jax.hessian(
      lambda f: loss_fn(UNRAVEL(f), X, LABELS))(FLAT), np.float64)
  assert np.abs(hessian - matrix).max() > 1e-3 * scale


def test_nan_loss_and_zero_gradient():
  out = measured(PARAMS, {**KW, 'offset': jnp.float32(jnp.nan)})
  for name in CURVATURES:
    assert all(np.all(np.isnan(np.asarray(v))) for v in out[name]), name
  zero = jax.tree.map(jnp.zeros_like, PARAMS)  # symmetric point: g = 0
  out = measured(zero, KW)
  for name in CURVATURES:
    assert all(np.all(np.isfinite(np.asarray(v))) for v in out[name]), name


def test_bad_curvature_is_a_clear_error():
  with pytest.raises(ValueError, match=r"hessian_trace: curvature must be"
                     r" 'hessian', sharpness\.GGN"):
    sharpness.hessian_trace(loss_fn, PARAMS, loss_kwargs=KW, curvature='ggn')
  with pytest.raises(TypeError, match=r'GGN output_loss must be a function'):
    sharpness.hessian_top_eigenvalue(
        loss_fn, PARAMS, loss_kwargs=KW,
        curvature=sharpness.GGN(apply_fn, None))
  with pytest.raises(ValueError, match=r'per_example_loss must return a'
                     r' vector'):
    sharpness.hessian_trace(
        loss_fn, PARAMS, loss_kwargs=KW,
        curvature=sharpness.EmpiricalFisher(loss_fn))
