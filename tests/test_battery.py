"""One battery that every sharpness-aware transformation runs through."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from variants import VARIANTS

ids = [v.name for v in VARIANTS]
each_variant = pytest.mark.parametrize('variant', VARIANTS, ids=ids)

# A least-squares problem with a known minimizer w* = (X^T X)^-1 X^T y.
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(32, 4)), jnp.float32)
W_TRUE = jnp.asarray([1.0, -2.0, 0.5, 3.0], jnp.float32)
Y = X @ W_TRUE + 0.7
BATCH = {'x': X, 'y': Y}


def loss_fn(params, batch):
  pred = batch['x'] @ params['w'] + params['b']
  return 0.5 * jnp.mean((pred - batch['y']) ** 2)


def aux_loss_fn(params, batch):
  return loss_fn(params, batch), {'secret': jnp.ones(3)}


PARAMS = {'w': jnp.zeros(4), 'b': jnp.zeros([])}


def run(tx, params, steps, batch=BATCH, fn=loss_fn):
  """Runs `steps` updates in one lax.scan; returns params, state, losses."""

  def step(carry, _):
    params, state = carry
    loss, grads = jax.value_and_grad(fn)(params, batch=batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return (optax.apply_updates(params, updates), state), loss

  (params, state), losses = jax.lax.scan(
      step, (params, tx.init(params)), length=steps
  )
  return params, state, losses


@each_variant
def test_converges_on_a_quadratic(variant):
  tx = optax.chain(variant.make(loss_fn, rho=0.01), optax.sgd(0.2, 0.5))
  params, state, losses = jax.jit(functools.partial(run, tx, steps=300))(
      PARAMS
  )
  assert jnp.allclose(params['w'], W_TRUE, atol=2e-2), params
  assert jnp.allclose(params['b'], 0.7, atol=2e-2), params
  assert losses[-1] < 1e-3 * losses[0]
  sam_state = state[0]
  assert int(sam_state.count) == 300
  # Diagnostics are logged: perturbed loss >= ~clean loss, cosine near 1.
  assert 0.9 < float(sam_state.cosine) <= 1.0 + 1e-6
  assert float(sam_state.perturbed_loss) >= 0.0


@each_variant
def test_one_trace_and_stable_state(variant):
  tx = optax.chain(variant.make(loss_fn, rho=0.05), optax.sgd(0.1, 0.9))
  traces = []

  @jax.jit
  def train_step(params, state):
    traces.append(1)
    grads = jax.grad(loss_fn)(params, batch=BATCH)
    updates, new_state = tx.update(grads, state, params, batch=BATCH)
    return optax.apply_updates(params, updates), new_state

  params, state = PARAMS, tx.init(PARAMS)
  initial_state = state
  for _ in range(5):
    params, new_state = train_step(params, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    state = new_state
  assert len(traces) == 1
  chex.assert_trees_all_equal_shapes_and_dtypes(initial_state, state)
  # The state is a NamedTuple of arrays only: checkpointable, shardable.
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  assert isinstance(state[0], tuple) and hasattr(state[0], '_fields')
  for field in ('count', 'perturbed_loss', 'grad_norm', 'cosine'):
    assert field in state[0]._fields


@each_variant
def test_inject_hyperparams_sets_rho(variant):
  grads = jax.grad(loss_fn)(PARAMS, batch=BATCH)
  expected, _ = variant.make(loss_fn, rho=0.3).update(
      grads, variant.make(loss_fn, rho=0.3).init(PARAMS), PARAMS, batch=BATCH
  )
  injected = sam_optax.inject_hyperparams(variant.factory)(
      loss_fn, rho=0.05, **variant.kwargs
  )
  state = injected.init(PARAMS)
  assert float(state.hyperparams['rho']) == pytest.approx(0.05)
  state.hyperparams['rho'] = jnp.asarray(0.3)
  got, state = jax.jit(injected.update)(grads, state, PARAMS, batch=BATCH)
  chex.assert_trees_all_close(got, expected, rtol=1e-6)
  # Plain optax.inject_hyperparams works too, given the static arguments.
  static = ('loss_fn',) + tuple(variant.kwargs.keys() - {'eta'})
  plain = optax.inject_hyperparams(variant.factory, static_args=static)(
      loss_fn, rho=0.3, **variant.kwargs
  )
  got, _ = plain.update(grads, plain.init(PARAMS), PARAMS, batch=BATCH)
  chex.assert_trees_all_close(got, expected, rtol=1e-6)


@each_variant
def test_rho_schedule_is_evaluated_on_own_count(variant):
  schedule = optax.linear_schedule(0.0, 0.2, transition_steps=4)
  tx = variant.make(loss_fn, rho=schedule)
  state = tx.init(PARAMS)
  params = PARAMS
  for step in range(3):
    grads = jax.grad(loss_fn)(params, batch=BATCH)
    got, state = tx.update(grads, state, params, batch=BATCH)
    fixed = variant.make(loss_fn, rho=float(schedule(step)))
    want, _ = fixed.update(grads, fixed.init(params), params, batch=BATCH)
    chex.assert_trees_all_close(got, want, rtol=1e-6)
    if step == 0:  # the schedule starts at 0: exactly the clean gradient
      chex.assert_trees_all_equal(got, grads)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, got)


@each_variant
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_params_with_large_gradients(variant, dtype):
  # Gradients around 1e4: their squares overflow float16 (max 65504).
  scale = 2e4

  def big_loss(params, batch):
    return scale * loss_fn(params, batch)

  params = jax.tree.map(lambda p: (p + 0.5).astype(dtype), PARAMS)
  tx = optax.chain(variant.make(big_loss, rho=0.05), optax.sgd(1e-6))
  grads = jax.grad(big_loss)(params, batch=BATCH)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 300
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      batch=BATCH)
  for leaf in jax.tree.leaves((updates, state)):
    assert jnp.all(jnp.isfinite(leaf.astype(jnp.float32)))
  chex.assert_trees_all_equal_dtypes(updates, params)
  # Same answer as in float32, to the precision of the dtype.
  params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  tx32 = optax.chain(variant.make(big_loss, rho=0.05), optax.sgd(1e-6))
  grads32 = jax.grad(big_loss)(params32, batch=BATCH)
  want, _ = tx32.update(grads32, tx32.init(params32), params32, batch=BATCH)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b), rtol=0.1, atol=1e-3
    )


@each_variant
def test_zero_gradient_is_a_normal_case(variant):
  def flat(params, batch):
    del batch
    return jnp.sum(params['w'] ** 2) + params['b'] ** 2

  tx = optax.chain(variant.make(flat, rho=0.1), optax.sgd(0.1, 0.9))
  grads = jax.grad(flat)(PARAMS, batch=BATCH)
  updates, state = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS,
                                      batch=BATCH)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
  for leaf in jax.tree.leaves(state):
    assert jnp.all(jnp.isfinite(leaf))
  assert float(state[0].cosine) == 0.0 and float(state[0].grad_norm) == 0.0


@each_variant
@pytest.mark.parametrize('rho', [0.0, optax.constant_schedule(0.0)],
                         ids=['number', 'schedule'])
def test_rho_zero_is_exactly_the_base_optimizer(variant, rho):
  base = optax.sgd(0.1, momentum=0.9)
  tx = optax.chain(variant.make(loss_fn, rho=rho), base)
  params_a = params_b = {'w': jnp.ones(4), 'b': jnp.asarray(0.3)}
  state_a, state_b = tx.init(params_a), base.init(params_b)
  update_a, update_b = jax.jit(tx.update), jax.jit(base.update)
  for _ in range(4):
    grads_a = jax.grad(loss_fn)(params_a, batch=BATCH)
    grads_b = jax.grad(loss_fn)(params_b, batch=BATCH)
    u_a, state_a = update_a(grads_a, state_a, params_a, batch=BATCH)
    u_b, state_b = update_b(grads_b, state_b, params_b)
    params_a = optax.apply_updates(params_a, u_a)
    params_b = optax.apply_updates(params_b, u_b)
  chex.assert_trees_all_equal(params_a, params_b)


@each_variant
def test_aux_is_dropped(variant):
  tx = variant.make(aux_loss_fn, rho=0.05, has_aux=True)
  plain = variant.make(loss_fn, rho=0.05)
  grads = jax.grad(loss_fn)(PARAMS, batch=BATCH)
  got, state = tx.update(grads, tx.init(PARAMS), PARAMS, batch=BATCH)
  want, _ = plain.update(grads, plain.init(PARAMS), PARAMS, batch=BATCH)
  # Two differently traced programs: equal up to rounding, not bitwise.
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  assert 'secret' not in str(jax.tree.structure(state))


@each_variant
def test_bad_input_is_a_clear_error(variant):
  grads = jax.grad(loss_fn)(PARAMS, batch=BATCH)
  with pytest.raises(ValueError, match='rho must be a finite number >= 0'):
    variant.make(loss_fn, rho=-0.1)
  with pytest.raises(TypeError, match='rho must be a number'):
    variant.make(loss_fn, rho='big')
  with pytest.raises(TypeError, match='loss_fn must be a callable'):
    variant.make('not a function', rho=0.1)
  with pytest.raises(ValueError, match='ascent_steps must be an int >= 1'):
    variant.make(loss_fn, rho=0.1, ascent_steps=0)
  tx = variant.make(loss_fn, rho=0.1)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match='needs the current parameters'):
    tx.update(grads, state, batch=BATCH)
  with pytest.raises(ValueError, match='gradient tree does not match'):
    tx.update({'w': grads['w']}, state, PARAMS, batch=BATCH)
  with pytest.raises(ValueError, match=r'leaf \[\'w\'\] has shape \(3,\)'):
    tx.update({'w': jnp.ones(3), 'b': grads['b']}, state, PARAMS, batch=BATCH)
  vector_loss = lambda p, batch: (batch['x'] @ p['w'] + p['b']) ** 2
  with pytest.raises(ValueError, match=r'scalar.*shape \(32,\)'):
    variant.make(vector_loss, rho=0.1).update(grads, state, PARAMS,
                                              batch=BATCH)
  with pytest.raises(TypeError, match='has_aux=True'):
    variant.make(aux_loss_fn, rho=0.1).update(grads, state, PARAMS,
                                              batch=BATCH)
  with pytest.raises(TypeError, match=r'must return a pair \(loss, aux\)'):
    variant.make(loss_fn, rho=0.1, has_aux=True).update(
        grads, state, PARAMS, batch=BATCH)
  with pytest.raises(ValueError, match='inside optax.masked'):
    optax.masked(tx, {'w': True, 'b': False}).update(
        grads, optax.masked(tx, {'w': True, 'b': False}).init(PARAMS),
        PARAMS, batch=BATCH)


@each_variant
def test_cosine_is_measured_only_when_asked(variant):
  # cos(g0, g) keeps g0 alive through the second pass (one more buffer of
  # the parameters' size) and costs two passes over them: off by default,
  # and 0 ("not measured") when off: a healthy state holds no NaN, so that
  # jax_debug_nans stays usable.
  grads = jax.grad(loss_fn)(PARAMS, batch=BATCH)
  tracked = variant.make(loss_fn, rho=0.05)
  default = variant.make(loss_fn, rho=0.05, track_cosine=False)
  want, tracked_state = tracked.update(grads, tracked.init(PARAMS), PARAMS,
                                       batch=BATCH)
  got, state = default.update(grads, default.init(PARAMS), PARAMS,
                              batch=BATCH)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  assert float(state.cosine) == 0.0
  assert np.isfinite(float(tracked_state.cosine))
  np.testing.assert_allclose(state.grad_norm, tracked_state.grad_norm)
  np.testing.assert_allclose(state.perturbed_loss,
                             tracked_state.perturbed_loss)
