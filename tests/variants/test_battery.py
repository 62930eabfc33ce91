"""One battery over every variant: transformations and complete optimizers.

Each row of ``variants.BATTERY`` (tests/variants.py) runs every check below
that its capabilities allow: a complete optimizer (bsam, decoupled_wsam)
produces the final update and skips a bad step itself; a variant whose step
depends on more state than the count (msam, bsam) is not compared with a
fresh transformation step by step; a noisy step (bsam) is not a zero update
at a zero gradient nor the base optimizer at rho = 0.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from variants import BATTERY


def each(applies=lambda variant: True):
  """Parametrizes a check over the rows it applies to."""

  def parametrize(check):
    rows = [v for v in BATTERY
            if applies(v) and check.__name__ not in v.not_yet]
    return pytest.mark.parametrize('variant', rows,
                                   ids=[v.name for v in rows])(check)

  return parametrize


def stateless(variant):
  return variant.stateless


def deterministic(variant):
  return not variant.noisy


def transformation(variant):
  return not variant.complete


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


def flat_loss(params, batch):
  del batch
  return jnp.sum(params['w'] ** 2) + params['b'] ** 2  # minimum at 0


PARAMS = {'w': jnp.zeros(4), 'b': jnp.zeros([])}
GRADS = jax.grad(loss_fn)(PARAMS, BATCH)


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


def is_bad_step(variant, updates, state):
  """A transformation hands on NaN; a complete optimizer skips the step."""
  if variant.complete:
    return (all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
            and int(state.skipped_steps) == 1)
  return all(bool(jnp.all(jnp.isnan(u))) for u in jax.tree.leaves(updates))


@each()
def test_converges_on_a_quadratic(variant):
  tx = variant.optimizer(loss_fn, 0.01, 0.2, 0.5)
  params, state, losses = jax.jit(functools.partial(run, tx, steps=300))(
      PARAMS
  )
  assert jnp.allclose(params['w'], W_TRUE, atol=2e-2), params
  assert jnp.allclose(params['b'], 0.7, atol=2e-2), params
  assert losses[-1] < 1e-3 * losses[0]
  diagnostics = variant.diagnostics(state)
  assert int(diagnostics.count) == 300
  # Diagnostics are logged: perturbed loss >= ~clean loss, cosine near 1
  # where the ascent starts from this step's gradient (msam's follows its
  # momentum, unrelated to g0 at the minimizer).
  if variant.common_options:
    low = 0.9 if variant.stateless else -1.0 - 1e-6
    assert low < float(diagnostics.cosine) <= 1.0 + 1e-6
  assert float(diagnostics.perturbed_loss) >= 0.0


@each()
def test_one_trace_and_stable_state(variant):
  tx = variant.optimizer(loss_fn, 0.05, 0.1, 0.9)
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
  diagnostics = variant.diagnostics(state)
  assert isinstance(diagnostics, tuple) and hasattr(diagnostics, '_fields')
  common = ('count', 'perturbed_loss', 'grad_norm')
  common += ('cosine',) if variant.common_options else ()
  for field in common:
    assert field in diagnostics._fields


@each()
def test_inject_hyperparams_sets_rho(variant):
  fixed = variant.make(loss_fn, rho=0.3)
  expected, _ = fixed.update(GRADS, fixed.init(PARAMS), PARAMS, batch=BATCH)
  injected = sam_optax.inject_hyperparams(variant.factory)(
      loss_fn, rho=0.05, **variant.kwargs
  )
  state = injected.init(PARAMS)
  assert float(state.hyperparams['rho']) == pytest.approx(0.05)
  state.hyperparams['rho'] = jnp.asarray(0.3)
  got, state = jax.jit(injected.update)(GRADS, state, PARAMS, batch=BATCH)
  chex.assert_trees_all_close(got, expected, rtol=1e-6)
  # Plain optax.inject_hyperparams works too, given the static arguments.
  static = ('loss_fn',) + tuple(variant.kwargs.keys() - {'eta'})
  plain = optax.inject_hyperparams(variant.factory, static_args=static)(
      loss_fn, rho=0.3, **variant.kwargs
  )
  got, _ = plain.update(GRADS, plain.init(PARAMS), PARAMS, batch=BATCH)
  chex.assert_trees_all_close(got, expected, rtol=1e-6)


@each(stateless)
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
    if step == 0 and transformation(variant):  # rho 0: the clean gradient
      chex.assert_trees_all_equal(got, grads)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, got)


@each()
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_params_with_large_gradients(variant, dtype):
  # Gradients around 1e4: their squares overflow float16 (max 65504).
  scale = 2e4

  def big_loss(params, batch):
    return scale * loss_fn(params, batch)

  params = jax.tree.map(lambda p: (p + 0.5).astype(dtype), PARAMS)
  tx = variant.optimizer(big_loss, 0.05, 1e-6)
  grads = jax.grad(big_loss)(params, batch=BATCH)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 300
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      batch=BATCH)
  for leaf in jax.tree.leaves((updates, state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert jnp.all(jnp.isfinite(leaf.astype(jnp.float32)))
  chex.assert_trees_all_equal_dtypes(updates, params)
  # Same answer as in float32, to the precision of the dtype.
  params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  tx32 = variant.optimizer(big_loss, 0.05, 1e-6)
  grads32 = jax.grad(big_loss)(params32, batch=BATCH)
  want, _ = tx32.update(grads32, tx32.init(params32), params32, batch=BATCH)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b), rtol=0.1, atol=1e-3
    )


@each(deterministic)
def test_zero_gradient_is_a_normal_case(variant):
  tx = variant.optimizer(flat_loss, 0.1, 0.1, 0.9)
  grads = jax.grad(flat_loss)(PARAMS, batch=BATCH)
  updates, state = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS,
                                      batch=BATCH)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
  for leaf in jax.tree.leaves(state):
    assert jnp.all(jnp.isfinite(leaf))
  diagnostics = variant.diagnostics(state)
  assert float(diagnostics.grad_norm) == 0.0
  assert float(diagnostics.cosine) == 0.0


@each(deterministic)
def test_derivative_through_update_is_finite_at_a_zero_gradient(variant):
  tx = variant.make(flat_loss, rho=0.1)

  def updated_norm(params):
    grads = jax.grad(flat_loss)(params, BATCH)
    out, _ = tx.update(grads, tx.init(params), params, batch=BATCH)
    return sum(jnp.sum(u ** 2) for u in jax.tree.leaves(out))

  value, derivative = jax.value_and_grad(updated_norm)(PARAMS)
  assert float(value) == 0.0
  for d in jax.tree.leaves(derivative):
    assert bool(jnp.all(jnp.isfinite(d))), derivative


@each(deterministic)
@pytest.mark.parametrize('rho', [0.0, optax.constant_schedule(0.0)],
                         ids=['number', 'schedule'])
def test_rho_zero_is_exactly_the_base_optimizer(variant, rho):
  base = optax.sgd(0.1, momentum=0.9)
  tx = variant.optimizer(loss_fn, rho, 0.1, 0.9)
  params_a = params_b = {'w': jnp.ones(4), 'b': jnp.float32(0.3)}
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


@each()
def test_aux_is_dropped(variant):
  tx = variant.make(aux_loss_fn, rho=0.05, has_aux=True)
  plain = variant.make(loss_fn, rho=0.05)
  got, state = tx.update(GRADS, tx.init(PARAMS), PARAMS, batch=BATCH)
  want, _ = plain.update(GRADS, plain.init(PARAMS), PARAMS, batch=BATCH)
  # Two differently traced programs: equal up to rounding, not bitwise.
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  assert 'secret' not in str(jax.tree.structure(state))


@each()
def test_bad_input_is_a_clear_error(variant):
  grads = GRADS
  with pytest.raises(ValueError, match='rho must be a finite number >= 0'):
    variant.make(loss_fn, rho=-0.1)
  with pytest.raises(TypeError, match='rho must be a number'):
    variant.make(loss_fn, rho='big')
  with pytest.raises(TypeError, match='loss_fn must be a callable'):
    variant.make('not a function', rho=0.1)
  if variant.common_options:
    with pytest.raises(ValueError, match='ascent_steps must be an int >= 1'):
      variant.make(loss_fn, rho=0.1, ascent_steps=0)
  tx = variant.make(loss_fn, rho=0.1)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match='needs the current parameters'):
    tx.update(grads, state, batch=BATCH)
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
  if variant.noisy:  # the incoming gradient is not used
    return
  with pytest.raises(ValueError, match='gradient tree does not match'):
    tx.update({'w': grads['w']}, state, PARAMS, batch=BATCH)
  with pytest.raises(ValueError, match=r'leaf \[\'w\'\] has shape \(3,\)'):
    tx.update({'w': jnp.ones(3), 'b': grads['b']}, state, PARAMS, batch=BATCH)
  if transformation(variant):
    with pytest.raises(ValueError, match='inside optax.masked'):
      optax.masked(tx, {'w': True, 'b': False}).update(
          grads, optax.masked(tx, {'w': True, 'b': False}).init(PARAMS),
          PARAMS, batch=BATCH)


@each(lambda variant: variant.common_options)
def test_cosine_is_measured_only_when_asked(variant):
  # cos(g0, g) keeps g0 alive through the second pass (one more buffer of
  # the parameters' size) and costs two passes over them: off by default,
  # and 0 ("not measured") when off: a healthy state holds no NaN, so that
  # jax_debug_nans stays usable.
  tracked = variant.make(loss_fn, rho=0.05)
  default = variant.make(loss_fn, rho=0.05, track_cosine=False)
  want, tracked_state = tracked.update(GRADS, tracked.init(PARAMS), PARAMS,
                                       batch=BATCH)
  got, state = default.update(GRADS, default.init(PARAMS), PARAMS,
                              batch=BATCH)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  state = variant.diagnostics(state)
  tracked_state = variant.diagnostics(tracked_state)
  assert float(state.cosine) == 0.0
  assert np.isfinite(float(tracked_state.cosine))
  if variant.reads_g0:
    np.testing.assert_allclose(state.grad_norm, tracked_state.grad_norm)
  np.testing.assert_allclose(state.perturbed_loss,
                             tracked_state.perturbed_loss)


@each()
@pytest.mark.parametrize('dtype', ['float64', 'bfloat16'])
def test_state_dtypes_never_follow_the_params(variant, dtype):
  tx = variant.optimizer(loss_fn, 0.05, 0.1, 0.9)
  with jax.enable_x64(dtype == 'float64'):
    params = jax.tree.map(lambda p: (p + 0.5).astype(dtype), PARAMS)
    new_params, state, _ = jax.jit(functools.partial(run, tx, steps=3))(
        params)
    diagnostics = variant.diagnostics(state)
    assert diagnostics.count.dtype == jnp.int32
    fields = ('perturbed_loss', 'grad_norm')
    fields += ('cosine',) if variant.common_options else ()
    for field in fields:
      assert getattr(diagnostics, field).dtype == jnp.float32, field
    init = tx.init(params)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(state)):
      assert a.dtype == b.dtype
    for p in jax.tree.leaves(new_params):
      assert p.dtype == dtype and bool(jnp.all(jnp.isfinite(
          p.astype(jnp.float32))))


@each()
def test_complex_parameters_are_a_clear_error(variant):
  params = {'w': jnp.ones(4, jnp.complex64), 'b': jnp.asarray(0.1)}
  loss = lambda p, batch: (jnp.mean(jnp.abs(batch['x'] @ p['w']) ** 2)
                           + p['b'] ** 2)
  tx = variant.make(loss, rho=0.05)
  grads = jax.grad(loss)(params, BATCH)
  with pytest.raises(TypeError, match=r"\['w'\] is complex.*'re'"):
    tx.update(grads, tx.init(params), params, batch=BATCH)


@each()
def test_a_bad_traced_hyperparameter_is_a_bad_step(variant):
  # A transformation hands on NaN (apply_if_finite skips it); a complete
  # optimizer skips the step itself (a zero update, counted).
  injected = sam_optax.inject_hyperparams(variant.factory)(
      loss_fn, rho=0.05, **variant.kwargs)
  update = jax.jit(injected.update)  # one program for every bad value
  for bad in (float('nan'), -0.1):
    skip = variant.unused + (variant.signed if bad < 0 else ())
    names = [n for n in injected.init(PARAMS).hyperparams if n not in skip]
    for name in names:
      state = injected.init(PARAMS)
      # NumPy values (jnp would trip debug_nans), all of them: the same
      # types whichever one is bad, so one trace.
      state.hyperparams.update(
          {n: np.asarray(v) for n, v in state.hyperparams.items()})
      state.hyperparams[name] = np.float32(bad)
      step = lambda: update(GRADS, state, PARAMS, batch=BATCH)
      assert_bad_step(variant, step, lambda new: getattr(
          new, 'inner_state', None), nan_in_state=np.isnan(bad))
    # A schedule that goes bad likewise.
    tx = variant.make(loss_fn, rho=lambda count, bad=bad: count * 0.0 + bad)
    assert_bad_step(variant, lambda: jax.jit(tx.update)(
        GRADS, tx.init(PARAMS), PARAMS, batch=BATCH))


def assert_bad_step(variant, step, variant_state=lambda state: state,
                    nan_in_state=False):
  """`step()` is a bad step. With jax_debug_nans on, a step whose outputs
  hold a NaN (a transformation's update, or a NaN put into the state) is
  first reported, which is what the flag is for: a FloatingPointError from
  JAX, or the hyperparameter's own check when JAX's op-by-op re-run meets
  the bad value as a concrete number."""
  if jax.config.jax_debug_nans and (nan_in_state or not variant.complete):
    with pytest.raises((FloatingPointError, ValueError)) as raised:
      step()
    if raised.type is ValueError:  # the check's own message, not another
      assert 'must be' in str(raised.value), raised.value
  with jax.debug_nans(False):
    out, new = step()
  assert is_bad_step(variant, out, variant_state(new)), out
