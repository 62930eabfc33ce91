"""sam and asam against an independent NumPy implementation of the papers.

The reference model is softmax regression, whose gradient is written by hand
(X^T (softmax(XW + b) - Y) / n), so nothing here relies on jax.grad or on the
code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

N, D, C = 24, 5, 3
LR, MOMENTUM, STEPS = 0.5, 0.9, 5


def make_batches(seed=0):
  rng = np.random.default_rng(seed)
  return [
      {'x': rng.normal(size=(N, D)), 'y': np.eye(C)[rng.integers(0, C, N)]}
      for _ in range(STEPS)
  ]


def init_params(seed=1):
  rng = np.random.default_rng(seed)
  return {'W': rng.normal(size=(D, C)) * 0.5, 'b': rng.normal(size=C) * 0.1}


def loss_fn(params, batch):
  logits = batch['x'] @ params['W'] + params['b']
  return -jnp.mean(jnp.sum(batch['y'] * jax.nn.log_softmax(logits), -1))


# --- the independent reference -------------------------------------------


def np_grad(params, batch):
  logits = batch['x'] @ params['W'] + params['b']
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  residual = (p - batch['y']) / len(batch['x'])
  return {'W': batch['x'].T @ residual, 'b': residual.sum(0)}


def np_norm(tree):
  return np.sqrt(sum(np.sum(v**2) for v in tree.values()))


def np_sam_gradient(params, batch, rho, k, scale=None):
  """k normalized steps of rho/k (in the metric `scale`), then re-gradient."""
  scale = scale or {name: np.ones_like(v) for name, v in params.items()}
  point = dict(params)
  for _ in range(k):
    g = np_grad(point, batch)
    tg = {n: scale[n] * g[n] for n in g}
    norm = np_norm(tg)
    point = {n: point[n] + rho / k * scale[n] * tg[n] / norm for n in point}
  return np_grad(point, batch)


def np_train(batches, gradient_fn):
  params, trace = init_params(), None
  for batch in batches:
    g = gradient_fn(params, batch)
    trace = g if trace is None else {n: g[n] + MOMENTUM * trace[n] for n in g}
    params = {n: params[n] - LR * trace[n] for n in params}
  return params


# --- the code under test ---------------------------------------------------


def jax_train(batches, tx):
  tx = optax.chain(tx, optax.sgd(LR, momentum=MOMENTUM))
  params = jax.tree.map(jnp.float32, init_params())
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch=batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  for batch in batches:
    params, state = step(params, state, jax.tree.map(jnp.float32, batch))
  return params


def assert_close(got, want):
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('k', [1, 2])
def test_sam_matches_reference(k):
  batches = make_batches()
  want = np_train(batches, lambda p, b: np_sam_gradient(p, b, 0.3, k))
  got = jax_train(batches, sam_optax.sam(loss_fn, rho=0.3, ascent_steps=k))
  assert_close(got, want)
  # And it is not plain SGD: the perturbation matters at this rho.
  sgd = np_train(batches, np_grad)
  assert np.max(np.abs(sgd['W'] - want['W'])) > 1e-3


def asam_scale(params, eta, adaptive):
  return {
      n: np.abs(v) + eta if adaptive[n] else np.ones_like(v)
      for n, v in params.items()
  }


@pytest.mark.parametrize('mask', [None, {'W': True, 'b': False}],
                         ids=['all', 'weights_only'])
def test_asam_matches_reference(mask):
  adaptive = mask or {'W': True, 'b': True}
  batches = make_batches(seed=3)
  want = np_train(
      batches,
      lambda p, b: np_sam_gradient(
          p, b, 0.8, 1, scale=asam_scale(p, 0.01, adaptive)
      ),
  )
  got = jax_train(
      batches, sam_optax.asam(loss_fn, rho=0.8, eta=0.01, adaptive_mask=mask)
  )
  assert_close(got, want)


def test_asam_mask_as_path_predicate():
  batches = make_batches(seed=4)
  by_tree = jax_train(batches, sam_optax.asam(
      loss_fn, rho=0.8, adaptive_mask={'W': True, 'b': False}))
  by_path = jax_train(batches, sam_optax.asam(
      loss_fn, rho=0.8, adaptive_mask=lambda path, leaf: path[0].key == 'W'))
  assert_close(by_path, by_tree)
  everything = jax_train(batches, sam_optax.asam(loss_fn, rho=0.8))
  assert np.max(np.abs(everything['b'] - by_tree['b'])) > 1e-4


def test_asam_k2_matches_reference():
  batches = make_batches(seed=5)
  want = np_train(
      batches,
      lambda p, b: np_sam_gradient(
          p, b, 0.8, 2, scale=asam_scale(p, 0.05, {'W': True, 'b': True})
      ),
  )
  got = jax_train(
      batches, sam_optax.asam(loss_fn, rho=0.8, eta=0.05, ascent_steps=2)
  )
  assert_close(got, want)


def test_diagnostics_match_reference():
  params = jax.tree.map(jnp.float32, init_params())
  batch = jax.tree.map(jnp.float32, make_batches()[0])
  np_params, np_batch = init_params(), make_batches()[0]
  tx = sam_optax.sam(loss_fn, rho=0.3, track_cosine=True)
  grads = jax.grad(loss_fn)(params, batch=batch)
  out, state = tx.update(grads, tx.init(params), params, batch=batch)
  g0 = np_grad(np_params, np_batch)
  g = np_sam_gradient(np_params, np_batch, 0.3, 1)
  eps = {n: 0.3 * g0[n] / np_norm(g0) for n in g0}
  logits = np_batch['x'] @ (np_params['W'] + eps['W']) + np_params['b'] + eps[
      'b']
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  perturbed_loss = -np.mean(np.sum(np_batch['y'] * log_p, -1))
  cosine = sum(np.sum(g0[n] * g[n]) for n in g) / (np_norm(g0) * np_norm(g))
  np.testing.assert_allclose(state.perturbed_loss, perturbed_loss, rtol=1e-5)
  np.testing.assert_allclose(state.grad_norm, np_norm(g0), rtol=1e-5)
  np.testing.assert_allclose(state.cosine, cosine, rtol=1e-5)
  assert int(state.count) == 1
