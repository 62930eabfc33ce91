"""bsam and decoupled_wsam skip a non-finite step themselves, and wsam's forms.

A complete optimizer produces the final update, so nothing after it can
skip a bad step: a step with a NaN clean gradient, or a NaN only at the
perturbed point, must leave params and state as they were (a zero update,
counted in ``skipped_steps``), and training must then go on exactly as if
that batch had never been there. The references are the same optimizer run
on the batches without the bad one, and, for wsam's coupled form, its
formula written by hand on a quadratic.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

_rng = np.random.default_rng(11)
XS = jnp.asarray(_rng.normal(size=(4, 8, 3)), jnp.float32)
YS = jnp.asarray(_rng.normal(size=(4, 8)), jnp.float32)
PARAMS = {'w': jnp.asarray([0.5, -1.0, 2.0]), 'b': jnp.float32(0.25)}
FAR = 0.01  # bsam's noise below moves w by ~1e-4; its ascent by ~0.1


def loss_fn(params, x, y, poison, anchor):
  """Least squares; NaN (value and gradient) when ``poison`` and w is more
  than FAR from ``anchor`` -- at the perturbed point, not at w itself."""
  loss = 0.5 * jnp.mean((x @ params['w'] + params['b'] - y) ** 2)
  far = jnp.max(jnp.abs(params['w'] - anchor['w'])) > FAR
  return loss * jnp.where(poison & far, jnp.nan, 1.0)


def factories():
  return {
      'bsam': sam_optax.bsam(loss_fn, learning_rate=0.1, num_data=10 ** 8,
                             rho=0.5, s_init=1.0, seed=1),
      'decoupled_wsam': sam_optax.decoupled_wsam(
          loss_fn, optax.sgd(0.1, momentum=0.9), rho=0.5, gamma=0.75,
          learning_rate=0.1),
  }


TXS = factories()
UPDATES = {name: jax.jit(tx.update) for name, tx in TXS.items()}


def _batch(t, bad):
  x, y = XS[t], YS[t]
  if bad == 'clean':
    x = x.at[0, 0].set(jnp.nan)
  return dict(x=x, y=y, poison=jnp.asarray(bad == 'perturbed'))


def _train(name, batches):
  """Runs ``batches`` (a list of (t, bad)); returns params, state, updates."""
  params, state = PARAMS, TXS[name].init(PARAMS)
  history = []
  for t, bad in batches:
    batch = _batch(t, bad)
    grads = jax.grad(loss_fn)(params, anchor=params, **batch)
    updates, new_state = UPDATES[name](grads, state, params, anchor=params,
                                       **batch)
    history.append((updates, state, new_state))
    params, state = optax.apply_updates(params, updates), new_state
  return params, state, history


def _without_count(state):
  return state._replace(skipped_steps=jnp.zeros([], jnp.int32))


@pytest.mark.parametrize('bad', ['clean', 'perturbed'])
@pytest.mark.parametrize('name', list(TXS))
def test_a_bad_batch_is_skipped_as_if_it_had_not_been_there(name, bad):
  params, state, history = _train(name, [(0, None), (1, bad), (2, None),
                                         (3, None)])
  want_params, want_state, _ = _train(name, [(0, None), (2, None), (3, None)])
  # The bad step: a zero update for every leaf, the state exactly as it was.
  updates, before, after = history[1]
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  for a, b in zip(jax.tree.leaves(_without_count(after)),
                  jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  assert int(after.skipped_steps) == 1
  # Then training goes on as without that batch (the key and count too).
  assert int(state.skipped_steps) == 1 and int(want_state.skipped_steps) == 0
  for a, b in zip(jax.tree.leaves((params, _without_count(state))),
                  jax.tree.leaves((want_params, want_state))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The good steps moved the parameters.
  assert float(jnp.max(jnp.abs(params['w'] - PARAMS['w']))) > 1e-3


@pytest.mark.parametrize('name', list(TXS))
def test_a_healthy_state_holds_no_nan_under_debug_nans(name):
  with jax.debug_nans(True):
    params, state, _ = _train(name, [(0, None), (1, None)])
  for leaf in jax.tree.leaves((params, state)):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  assert int(state.skipped_steps) == 0


def test_a_bad_traced_hyperparameter_is_a_skipped_step():
  tx = sam_optax.bsam(loss_fn, lambda count: jnp.nan, num_data=10)
  batch = _batch(0, None)
  state = tx.init(PARAMS)
  out, new = tx.update(PARAMS, state, PARAMS, anchor=PARAMS, **batch)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(out))
  assert int(new.skipped_steps) == 1 and int(new.count) == 0


# ----------------------------------------------------------------------------
# wsam: the coupled transformation and the decoupled optimizer.

A = np.diag([1.0, 3.0, 0.5])


def quadratic(params):
  return 0.5 * params['w'] @ jnp.asarray(A, jnp.float32) @ params['w']


def test_wsam_with_its_defaults_is_the_coupled_formula():
  # rho 0.05, gamma 0.6: alpha = 1.5, g = g0 + 1.5 (g1 - g0), g1 = A (w + eps).
  w = np.array([0.5, -1.0, 2.0])
  g0 = A @ w
  g1 = A @ (w + 0.05 * g0 / np.linalg.norm(g0))
  want = g0 + 1.5 * (g1 - g0)
  tx = sam_optax.wsam(quadratic)
  params = {'w': jnp.asarray(w, jnp.float32)}
  out, state = tx.update(jax.grad(quadratic)(params), tx.init(params), params)
  np.testing.assert_allclose(out['w'], want, rtol=1e-5)
  assert isinstance(state, sam_optax.SAMState)


def _step(tx, params):
  out, state = tx.update(jax.grad(quadratic)(params), tx.init(params), params)
  return out, state


@pytest.mark.parametrize('old', [
    dict(decouple=True, base_optimizer=optax.sgd(0.1), learning_rate=0.1),
    dict(base_optimizer=optax.sgd(0.1), learning_rate=0.1),  # 0.2's default
], ids=['decouple_true', 'default'])
def test_the_old_decoupled_spelling_warns_and_is_decoupled_wsam(old):
  params = {'w': jnp.asarray([0.5, -1.0, 2.0])}
  with pytest.warns(DeprecationWarning, match='use sam_optax.decoupled_wsam'):
    tx = sam_optax.wsam(quadratic, 0.05, 0.75, **old)
  got, state = _step(tx, params)
  want, _ = _step(sam_optax.decoupled_wsam(quadratic, optax.sgd(0.1), 0.05,
                                           0.75, learning_rate=0.1), params)
  assert isinstance(state, sam_optax.DecoupledWSAMState)
  np.testing.assert_allclose(got['w'], want['w'], rtol=1e-6)


def test_the_old_coupled_spelling_warns_and_is_wsam():
  params = {'w': jnp.asarray([0.5, -1.0, 2.0])}
  with pytest.warns(DeprecationWarning, match='drop decouple=False'):
    tx = sam_optax.wsam(quadratic, gamma=0.6, decouple=False)
  got, state = _step(tx, params)
  want, _ = _step(sam_optax.wsam(quadratic, gamma=0.6), params)
  assert isinstance(state, sam_optax.SAMState)
  np.testing.assert_allclose(got['w'], want['w'], rtol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # the new spellings do not warn
    sam_optax.wsam(quadratic)
    sam_optax.decoupled_wsam(quadratic, optax.sgd(0.1), learning_rate=0.1)


def test_wsam_bad_options_are_clear_errors():
  with pytest.raises(ValueError, match='do not pass base_optimizer'):
    sam_optax.wsam(quadratic, decouple=False, base_optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match=r'gamma must be in \[0, 1\), got 1'):
    sam_optax.wsam(quadratic, gamma=1.0)
  with pytest.raises(ValueError, match=r'gamma must be in \[0, 1\), got 1'):
    sam_optax.decoupled_wsam(quadratic, optax.sgd(0.1), gamma=1.0)
  with pytest.raises(TypeError, match='base_optimizer must be an optax'):
    sam_optax.decoupled_wsam(quadratic, 0.1)
  with pytest.raises(TypeError, match='base_optimizer must be an optax'):
    with pytest.warns(DeprecationWarning):
      sam_optax.wsam(quadratic, decouple=True)
  tx = sam_optax.decoupled_wsam(quadratic, optax.sgd(0.1))
  with pytest.raises(ValueError, match='needs the learning rate'):
    tx.init({'w': jnp.zeros(3)})
