"""One bad batch never poisons a run; a healthy state holds no NaN.

The README's recipe is ``optax.chain(variant, optax.apply_if_finite(base))``:
a step whose clean gradient or whose perturbed pass is not finite must leave
the variant's whole state as it was and hand on a non-finite update, so that
``apply_if_finite`` skips it. Training then goes on exactly as if the batch
had not been there -- checked here against a run without that batch.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from variants import VARIANTS

_rng = np.random.default_rng(1)
X = jnp.asarray(_rng.normal(size=(5, 16, 4)), jnp.float32)
Y = jnp.asarray(_rng.normal(size=(5, 16)), jnp.float32)
PARAMS = {'w': jnp.asarray([0.3, -0.2, 0.1, 0.5]), 'b': jnp.zeros([])}


def loss_fn(params, batch, poison=False):
  """Least squares; NaN wherever ``poison`` (the perturbed pass only)."""
  pred = batch['x'] @ params['w'] + params['b']
  loss = 0.5 * jnp.mean((pred - batch['y']) ** 2)
  return jnp.where(poison, jnp.nan, loss)


# The stateful variants at their own defaults (their EMAs, momenta, running
# statistics and stored directions are what a bad batch could poison); the
# others as the battery runs them. msam is stateful from its second step.
_DEFAULTS = {'friendly_sam': {}, 'vasso': {}, 'ae_sam': {},
             'looksam': {'k': 2}, 'random_sam': {'p': 0.5}}
CASES = [(v.name, functools.partial(v.factory, **_DEFAULTS.get(v.name,
                                                               v.kwargs)))
         for v in VARIANTS] + [('msam', sam_optax.msam)]


def _runner(factory):
  tx = optax.chain(factory(loss_fn, rho=0.05, track_cosine=True),
                   optax.apply_if_finite(optax.sgd(0.05, 0.9), 3))

  @jax.jit
  def step(params, state, batch, poison):
    grads = jax.grad(loss_fn)(params, batch)  # the clean pass: never poisoned
    updates, state = tx.update(grads, state, params, batch=batch,
                               poison=poison)
    return optax.apply_updates(params, updates), state

  def run(batches):
    params, state = PARAMS, tx.init(PARAMS)
    for batch, poison in batches:
      params, state = step(params, state, batch, poison)
    return params, state

  return run


def _batch(i, nan=False):
  x = X[i].at[3, 1].set(jnp.nan) if nan else X[i]
  return {'x': x, 'y': Y[i]}, False


@pytest.mark.parametrize('name,factory', CASES, ids=[c[0] for c in CASES])
def test_a_bad_batch_is_skipped_as_if_absent(name, factory):
  run = _runner(factory)
  good = [_batch(i) for i in range(5)]
  want_params, want_state = run(good[:2] + good[3:])
  nan_clean = good[:2] + [_batch(2, nan=True)] + good[3:]
  poisoned = good[:2] + [(good[2][0], True)] + good[3:]
  for batches in (nan_clean, poisoned):
    params, state = run(batches)
    chex.assert_trees_all_close(params, want_params, rtol=1e-5, atol=1e-7)
    # The variant's whole state (count, diagnostics, its own fields) and the
    # base optimizer's, exactly as in the run without the bad batch.
    chex.assert_trees_all_close(state[0], want_state[0], rtol=1e-5,
                                atol=1e-7)
    chex.assert_trees_all_close(state[1].inner_state,
                                want_state[1].inner_state, rtol=1e-5,
                                atol=1e-7)
    assert int(state[1].total_notfinite) == 1


def test_a_bad_step_hands_on_a_non_finite_update():
  tx = sam_optax.friendly_sam(loss_fn, rho=0.05)
  state = tx.init(PARAMS)
  batch, _ = _batch(0)
  grads = jax.grad(loss_fn)(PARAMS, batch)
  updates, new_state = tx.update(grads, state, PARAMS, batch=batch,
                                 poison=True)
  assert not any(np.isfinite(u).all() for u in jax.tree.leaves(updates))
  chex.assert_trees_all_equal(new_state, state)


@pytest.mark.parametrize('name,factory', CASES, ids=[c[0] for c in CASES])
def test_no_nan_in_a_healthy_state_under_debug_nans(name, factory):
  # jax_debug_nans raises on any NaN a jitted step returns; a healthy state
  # (init and three updates, with and without the cosine diagnostic) holds
  # none.
  batch, _ = _batch(0)
  grads = jax.grad(loss_fn)(PARAMS, batch)
  with jax.debug_nans(True):
    for track_cosine in (False, True):
      tx = factory(loss_fn, rho=0.05, track_cosine=track_cosine)
      state = tx.init(PARAMS)
      update = jax.jit(lambda g, s, tx=tx: tx.update(g, s, PARAMS, batch=batch))
      for _ in range(3):
        updates, state = update(grads, state)
      for leaf in jax.tree.leaves((updates, state)):
        assert np.isfinite(np.asarray(leaf, np.float64)).all()


def test_no_nan_made_by_an_eager_step_under_debug_nans():
  # Without jit every operation is checked: the pipeline makes no NaN
  # constant on a healthy step (a bad value's NaN is made only where bad).
  batch, _ = _batch(0)
  grads = jax.grad(loss_fn)(PARAMS, batch)
  with jax.debug_nans(True):
    tx = sam_optax.sam(loss_fn, rho=0.05, track_cosine=True)
    updates, state = tx.update(grads, tx.init(PARAMS), PARAMS, batch=batch)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves((updates, state)))
