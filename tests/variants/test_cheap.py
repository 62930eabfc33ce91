"""The cheap family against references written from their equations.

Each reference is plain NumPy (float64) on a linear least-squares problem
whose gradient is written by hand, run for several steps so that SAM steps
and the steps between (reuse / plain) both occur. The random choices
(random_sam's coin, esam's leaf draws) are specified as draws from the key
in the state, so the references redraw them with `jax.random`. The shared
checks (jit, inject_hyperparams, bad input, ...) run on every cheap variant,
msam included, in test_battery.py.
"""

import re
from typing import NamedTuple, Unpack
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._src.core import tree_math
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import cheap

_rng = np.random.default_rng(3)
X = _rng.normal(size=(16, 4))
Y = X @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.7 + 0.3 * _rng.normal(size=16)
BATCH = {'x': jnp.asarray(X, jnp.float32), 'y': jnp.asarray(Y, jnp.float32)}
LR, STEPS = 0.05, 8


def loss_fn(params, batch):
  pred = batch['x'] @ params['w'] + params['b']
  return 0.5 * jnp.mean((pred - batch['y']) ** 2)


def grad_np(w):
  """The hand-written gradient of loss_fn at w = [w (4), b]."""
  r = X @ w[:4] + w[4] - Y
  return np.concatenate([X.T @ r / len(Y), [np.mean(r)]])


def unit(v):
  n = np.linalg.norm(v)
  return v / n if n > 0 else 0 * v


def run(tx, steps=STEPS):
  """The transformation chained with SGD: flat params and sam_step flags."""
  tx = optax.chain(tx, optax.sgd(LR))
  params = {'w': jnp.zeros(4), 'b': jnp.zeros([])}
  state, flags = tx.init(params), []
  update = jax.jit(tx.update)
  for _ in range(steps):
    grads = jax.grad(loss_fn)(params, BATCH)
    updates, state = update(grads, state, params, batch=BATCH)
    params = optax.apply_updates(params, updates)
    flags.append(bool(getattr(state[0], 'sam_step', True)))
  return np.concatenate([params['w'], [params['b']]]), flags


def sam_grad(w, rho):
  return grad_np(w + rho * unit(grad_np(w)))


def reference(handed_on, steps=STEPS):
  """SGD on ``handed_on(t, w, g0) -> (g, sam_step)``."""
  w, flags = np.zeros(5), []
  for t in range(steps):
    g, flag = handed_on(t, w, grad_np(w))
    w, flags = w - LR * g, flags + [flag]
  return w, flags


def check(tx, handed_on):
  got, flags = run(tx)
  want, want_flags = reference(handed_on)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  assert flags == want_flags
  assert any(want_flags) and not all(want_flags), want_flags
  return flags


def looksam_reference(rho, k, alpha, per_tensor, start=0):
  parts = [slice(0, 4), slice(4, 5)] if per_tensor else [slice(0, 5)]
  stored = {'g_v': np.zeros(5)}

  def handed_on(t, w, g0):
    if t >= start and (t - start) % k == 0:  # SAM at start, start + k, ...
      g1 = sam_grad(w, rho)
      for s in parts:  # g_v = g1 - |g1| cos(g0, g1) g0 / |g0|
        cos = unit(g0[s]) @ unit(g1[s])
        stored['g_v'][s] = g1[s] - np.linalg.norm(g1[s]) * cos * unit(g0[s])
      return g1, True
    g = g0.copy()
    for s in parts:
      v = stored['g_v'][s]
      g[s] += alpha * np.linalg.norm(g0[s]) * unit(v)
    return g, False

  return handed_on


@pytest.mark.parametrize('per_tensor', [False, True])
def test_looksam_matches_its_equations(per_tensor):
  check(sam_optax.looksam(loss_fn, rho=0.3, k=3, alpha=0.7,
                          per_tensor=per_tensor),
        looksam_reference(0.3, 3, 0.7, per_tensor))


def test_looksam_start_is_sgd_then_looksam():
  # Steps 0-2: g_v = 0, so g0 exactly; SAM at 3, 5, 7; reuse at 4, 6.
  flags = check(sam_optax.looksam(loss_fn, rho=0.3, k=2, alpha=0.7, start=3),
                looksam_reference(0.3, 2, 0.7, False, start=3))
  assert flags == [False] * 3 + [True, False] * 2 + [True]


def test_looksam_deprecated_total_steps_still_starts_at_a_fifth():
  # total_steps=15: start = floor(0.2 * 15) = 3; default k = 8 (one SAM step
  # in 8 steps), so steps 4-7 reuse the g_v stored at step 3, with the
  # default alpha = 0.1.
  with pytest.warns(DeprecationWarning, match=r'total_steps is deprecated'
                    r'.*start=3.*pass start='):
    tx = sam_optax.looksam(loss_fn, rho=0.3, total_steps=15)
  flags = check(tx, looksam_reference(0.3, 8, 0.1, False, start=3))
  assert flags == [False] * 3 + [True] + [False] * 4
  # The default start is 0, given total_steps or not, once start is named.
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    flags = check(sam_optax.looksam(loss_fn, rho=0.3, total_steps=15, start=0),
                  looksam_reference(0.3, 8, 0.1, False, start=0))
  assert flags == [True] + [False] * 7


def test_random_sam_coin_and_interval():
  keys = {'key': jax.random.PRNGKey(5)}

  def coin(t, w, g0):
    keys['key'], draw = jax.random.split(keys['key'])
    take = bool(jax.random.uniform(draw) < 0.5)
    return (sam_grad(w, 0.3) if take else g0), take

  check(sam_optax.random_sam(loss_fn, rho=0.3, p=0.5, seed=5), coin)
  every = lambda t, w, g0: ((sam_grad(w, 0.6), True) if t % 2 == 0
                            else (g0, False))
  check(sam_optax.random_sam(loss_fn, rho=0.3, interval=2, scale_rho=True),
        every)


def test_random_sam_interval_is_looksam_without_reuse():
  # Both run on the same "every k" piece: SAM on steps 0, 3, 6; g0 between.
  interval, _ = run(sam_optax.random_sam(loss_fn, rho=0.3, interval=3))
  looksam, flags = run(sam_optax.looksam(loss_fn, rho=0.3, k=3, alpha=0.0))
  np.testing.assert_allclose(interval, looksam, rtol=1e-6, atol=1e-7)
  assert flags == [t % 3 == 0 for t in range(STEPS)]


class _ThresholdState(NamedTuple):
  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  sam_step: jax.Array


@transformation.transformation
def _sam_where_the_gradient_is_large(
    rho=0.05, **common: Unpack[transformation.CommonOptions]):
  """A cheap variant built from `cheap.threshold`: SAM where |g0| >= 4.3."""
  when = cheap.threshold(
      lambda ctx: (tree_math.tree_norm(ctx.clean_grad) - 4.3, {}))

  def combine(ctx):
    sam_step, _, loss, grad = when.sam_or_clean(ctx)
    return variant_lib.Step(grad, loss, ctx.state._replace(sam_step=sam_step))

  return variant_lib.Variant(
      name='threshold_sam', hyperparams={'rho': rho}, state=_ThresholdState,
      combine=combine, agree={'sam_step': 'same'},
      init=lambda params: dict(sam_step=jnp.asarray(False)))


def test_a_threshold_takes_sam_where_its_score_is_nonnegative():
  def handed_on(t, w, g0):
    take = np.linalg.norm(g0) >= 4.3  # steps 0-3 of 8 (|g0| 6.8 .. 2.7)
    return (sam_grad(w, 0.3) if take else g0), bool(take)

  check(_sam_where_the_gradient_is_large(loss_fn, rho=0.3), handed_on)


def test_ae_sam_matches_its_equations():
  delta, total, c0, c1 = 0.5, 6, -1.0, 1.0
  stats = {}

  def handed_on(t, w, g0):
    n = g0 @ g0
    if t == 0:
      stats.update(mu=n, var=0.0)
    else:
      stats['mu'] = delta * stats['mu'] + (1 - delta) * n
      stats['var'] = delta * stats['var'] + (1 - delta) * (n - stats['mu'])**2
    c = c0 + (c1 - c0) * min(t / total, 1.0)
    take = n >= stats['mu'] + c * np.sqrt(stats['var'])
    return (sam_grad(w, 0.3) if take else g0), bool(take)

  check(sam_optax.ae_sam(loss_fn, rho=0.3, delta=delta, total_steps=total,
                         c_start=c0, c_end=c1), handed_on)


def test_msam_matches_its_equations():
  state = {'v': np.zeros(5)}

  def handed_on(t, w, g0):
    del g0
    g = grad_np(w - 0.3 * unit(state['v']))
    state['v'] = 0.8 * state['v'] + 0.2 * g
    return g, t > 0

  got, _ = run(sam_optax.msam(loss_fn, rho=0.3, beta=0.8))
  want, _ = reference(handed_on)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_esam_matches_its_equations():
  keys = {'key': jax.random.PRNGKey(2)}

  def handed_on(t, w, g0):
    keys['key'], draw = jax.random.split(keys['key'])
    keep = np.asarray(jax.random.uniform(draw, (2,)) < 0.5, float)
    # leaves in jax.tree.leaves order: b, then w
    scale = np.concatenate([np.full(4, keep[1]), [keep[0]]]) / 0.5
    return grad_np(w + 0.3 * scale * unit(g0)), True

  got, _ = run(sam_optax.esam(loss_fn, rho=0.3, beta=0.5, gamma=1.0,
                                 seed=2))
  want, _ = reference(handed_on)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def _dots(front):
  tx = optax.chain(front, optax.sgd(0.1)) if front else optax.sgd(0.1)

  def step(params, state):
    grads = jax.grad(loss_fn)(params, BATCH)
    updates, state = tx.update(grads, state, params, batch=BATCH)
    return optax.apply_updates(params, updates), state

  params = {'w': jnp.zeros(4), 'b': jnp.zeros([])}
  text = jax.jit(step).lower(params, tx.init(params)).compile().as_text()
  return len(re.findall(r'= \S+ (?:dot|convolution)\(', text))


@pytest.mark.parametrize('rho', [0.3, optax.constant_schedule(0.3)],
                         ids=['number', 'schedule'])
def test_msam_step_has_one_gradients_dots(rho):
  one = _dots(None)
  assert one > 0
  assert _dots(sam_optax.msam(loss_fn, rho=rho)) == one
  assert _dots(sam_optax.sam(loss_fn, rho=0.3)) > one
  state = sam_optax.msam(loss_fn, rho=rho).init({'w': jnp.zeros(4)})
  assert np.isnan(float(state.grad_norm)) or float(state.grad_norm) == 0.0


def test_skipped_steps_do_not_compute_the_second_gradient():
  calls = []

  def counted(params, batch):
    calls.append(1)  # traced once per gradient site, never per step
    return loss_fn(params, batch)

  tx = sam_optax.random_sam(counted, rho=0.1, p=0.0)
  params = {'w': jnp.ones(4), 'b': jnp.zeros([])}
  grads = jax.grad(loss_fn)(params, BATCH)
  out, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                  batch=BATCH)
  assert not bool(state.sam_step)
  np.testing.assert_array_equal(out['w'], grads['w'])
