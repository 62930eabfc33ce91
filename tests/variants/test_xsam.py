"""XSAM against an independent NumPy implementation of its specification.

The reference below is written from the spec in float64 on flat vectors, with
a hand-written softmax-regression gradient; it shares no code with
sam_optax. The closed-form test checks the probe on a quadratic where the loss
along the arc is a trigonometric expression in the arc angle.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._src.variants import xsam as xsam_lib

EPS = 1e-12

# ----------------------------------------------------------------------------
# Softmax regression: the JAX loss and its hand-written NumPy twin.

N, D, C = 24, 5, 3
_rng = np.random.default_rng(0)
X_ALL = _rng.normal(size=(4 * N, D)).astype(np.float32)
Y_ALL = _rng.integers(0, C, size=4 * N).astype(np.int32)
W_INIT = (0.5 * _rng.normal(size=(D, C))).astype(np.float32)
B_INIT = (0.1 * _rng.normal(size=(C,))).astype(np.float32)


def batch_at(step):
  lo = (step % 4) * N
  return {'x': X_ALL[lo:lo + N], 'y': Y_ALL[lo:lo + N]}


def loss_fn(params, batch):
  logits = batch['x'] @ params['w'] + params['b']
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['y']
  ).mean()


def np_unflatten(v):
  return v[: D * C].reshape(D, C), v[D * C:]


def np_loss(v, batch):
  w, b = np_unflatten(v)
  z = batch['x'].astype(np.float64) @ w + b
  z = z - z.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return -logp[np.arange(len(batch['y'])), batch['y']].mean()


def np_grad(v, batch):
  w, b = np_unflatten(v)
  x = batch['x'].astype(np.float64)
  z = x @ w + b
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(batch['y'])), batch['y']] -= 1.0
  p /= len(batch['y'])
  return np.concatenate([(x.T @ p).ravel(), p.sum(0)])


def flatten(params):
  return np.concatenate([np.asarray(params['w'], np.float64).ravel(),
                         np.asarray(params['b'], np.float64)])


class RefXSAM:
  """The spec, step by step, in float64 (probe on count % probe_every == 0)."""

  def __init__(self, rho, rho_max, k, probe_every, grid):
    self.rho, self.rho_max, self.k = rho, rho_max, k
    self.probe_every, self.grid = probe_every, grid
    self.count, self.alpha = 0, 1.0
    self.probe_losses = None

  def update(self, g0, w0, batch):
    norm = np.linalg.norm
    w, g = w0.copy(), g0
    for i in range(self.k):
      if i > 0:
        g = np_grad(w, batch)
      w = w + (self.rho / self.k) * g / (norm(g) + EPS)
    gk = np_grad(w, batch)
    self.perturbed_loss = np_loss(w, batch)
    v0 = (w - w0) / (norm(w - w0) + EPS)
    v1 = gk / (norm(gk) + EPS)
    theta = np.arccos(np.clip(v0 @ v1, -1.0, 1.0))

    def d(a):
      if np.sin(theta) < 1e-8:
        return (v0 + v1) / 2
      return (np.sin((1 - a) * theta) * v0 + np.sin(a * theta) * v1) / np.sin(
          theta)

    if self.count % self.probe_every == 0:
      self.probe_losses = np.array(
          [np_loss(w0 + self.rho_max * d(a), batch) for a in self.grid])
      self.alpha = self.grid[int(np.argmax(self.probe_losses))]
    self.count += 1
    out = norm(gk) * d(self.alpha)
    self.cosine = g0 @ out / (norm(g0) * norm(out))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _one_step(tx, params, opt_state, batch):
  grads = jax.grad(loss_fn)(params, batch)
  updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
  return optax.apply_updates(params, updates), opt_state


def run_steps(tx, steps):
  params = {'w': jnp.asarray(W_INIT), 'b': jnp.asarray(B_INIT)}
  opt_state = tx.init(params)
  out = []
  for t in range(steps):
    params, opt_state = _one_step(tx, params, opt_state, batch_at(t))
    out.append((params, opt_state))
  return out


@pytest.mark.parametrize('k', [1, 2])
def test_agrees_with_numpy_reference(k):
  rho, rho_max, lr, mu, steps, every = 0.3, 0.8, 0.5, 0.9, 7, 3
  tx = optax.chain(
      sam_optax.xsam(loss_fn, rho=rho, rho_max=rho_max, probe_every=every,
                     ascent_steps=k, track_cosine=True),
      optax.sgd(lr, momentum=mu),
  )
  got = run_steps(tx, steps)
  grid = np.round(np.arange(21) * 0.1, 10)
  ref = RefXSAM(rho, rho_max, k, every, grid)
  w = flatten({'w': W_INIT, 'b': B_INIT})
  trace = np.zeros_like(w)
  alphas = []
  for t in range(steps):
    batch = batch_at(t)
    g0 = np_grad(w, batch)
    out = ref.update(g0, w, batch)
    trace = out + mu * trace
    w = w - lr * trace
    params, opt_state = got[t]
    state = opt_state[0]
    alphas.append(ref.alpha)
    np.testing.assert_allclose(flatten(params), w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(state.alpha, ref.alpha, rtol=1e-6)
    np.testing.assert_allclose(state.probe_losses, ref.probe_losses,
                               rtol=2e-5)
    np.testing.assert_allclose(state.perturbed_loss, ref.perturbed_loss,
                               rtol=2e-5)
    np.testing.assert_allclose(state.grad_norm, np.linalg.norm(g0),
                               rtol=2e-5)
    np.testing.assert_allclose(state.cosine, ref.cosine, rtol=2e-5)
    assert int(state.count) == t + 1
  # The test is only meaningful if the probe moved alpha away from SAM's 1.
  assert any(a != 1.0 for a in alphas), alphas


# ----------------------------------------------------------------------------
# The probe on a quadratic, loss along the arc in closed form.

A_DIAG = np.array([1.0, 10.0])
W0 = np.array([1.0, 0.1])


def quad_loss(params):
  return 0.5 * jnp.sum(jnp.asarray(A_DIAG, jnp.float32) * params ** 2)


def test_probe_finds_maximum_along_the_arc():
  rho, rho_max = 0.1, 0.15
  tx = sam_optax.xsam(quad_loss, rho=rho, rho_max=rho_max, probe_every=1,
                      alpha_max=3.0)
  w0 = jnp.asarray(W0, jnp.float32)
  _, state = tx.update(jax.grad(quad_loss)(w0), tx.init(w0), w0)

  # By hand: g0 = A w0, w1 = w0 + rho g0/|g0|, g1 = A w1. In 2-D the slerp
  # from v0 to v1 is the unit vector at angle phi0 + alpha (phi1 - phi0).
  g0 = A_DIAG * W0
  w1 = W0 + rho * g0 / np.linalg.norm(g0)
  g1 = A_DIAG * w1
  phi0, phi1 = np.arctan2(g0[1], g0[0]), np.arctan2(g1[1], g1[0])
  alphas = np.round(np.arange(31) * 0.1, 10)
  phi = phi0 + alphas * (phi1 - phi0)
  # L(w0 + r u) = L(w0) + r <A w0, u> + r^2/2 <u, A u>, u = (cos, sin).
  along_arc = (
      0.5 * np.sum(A_DIAG * W0 ** 2)
      + rho_max * (g0[0] * np.cos(phi) + g0[1] * np.sin(phi))
      + 0.5 * rho_max ** 2 * (A_DIAG[0] * np.cos(phi) ** 2
                              + A_DIAG[1] * np.sin(phi) ** 2)
  )
  expected = alphas[np.argmax(along_arc)]
  assert 0.0 < expected < 3.0  # an interior maximum, not an end of the grid
  np.testing.assert_allclose(state.probe_losses, along_arc, rtol=1e-5)
  np.testing.assert_allclose(state.alpha, expected, rtol=1e-6)


def test_max_angle_caps_the_probe_and_the_update():
  rho, rho_max = 0.1, 0.15
  g0 = A_DIAG * W0
  g1 = A_DIAG * (W0 + rho * g0 / np.linalg.norm(g0))
  phi0, phi1 = np.arctan2(g0[1], g0[0]), np.arctan2(g1[1], g1[0])
  theta = abs(phi1 - phi0)
  alphas = np.round(np.arange(31) * 0.1, 10)
  phi = phi0 + alphas * (phi1 - phi0)
  along_arc = (rho_max * (g0[0] * np.cos(phi) + g0[1] * np.sin(phi))
               + 0.5 * rho_max ** 2 * (A_DIAG[0] * np.cos(phi) ** 2
                                       + A_DIAG[1] * np.sin(phi) ** 2))
  max_angle = 1.05 * theta  # allows alpha <= 1.05 only
  allowed = alphas * theta <= max_angle
  expected = alphas[np.argmax(np.where(allowed, along_arc, -np.inf))]
  assert expected < alphas[np.argmax(along_arc)]  # the cap matters here
  w0 = jnp.asarray(W0, jnp.float32)
  tx = sam_optax.xsam(quad_loss, rho=rho, rho_max=rho_max, probe_every=1,
                      alpha_max=3.0, max_angle=max_angle)
  _, state = tx.update(jax.grad(quad_loss)(w0), tx.init(w0), w0)
  np.testing.assert_allclose(state.alpha, expected, rtol=1e-6)
  # A fixed alpha past the cap is cut to it: the update is at max_angle from
  # the ascent direction (= g0 for one ascent step).
  tx = sam_optax.xsam(quad_loss, rho=rho, probe_every=None, alpha=1.8,
                      max_angle=0.5 * 1.8 * theta)
  updates, state = tx.update(jax.grad(quad_loss)(w0), tx.init(w0), w0)
  u = np.asarray(updates, np.float64)
  angle = np.arccos(u @ g0 / (np.linalg.norm(u) * np.linalg.norm(g0)))
  np.testing.assert_allclose(angle, 0.5 * 1.8 * theta, rtol=1e-3)
  np.testing.assert_allclose(state.alpha, 1.8)  # the state keeps alpha


def test_max_angle_of_one_step_does_not_lower_the_kept_alpha():
  def scaled_loss(w, s):
    return 0.5 * (w[0] ** 2 + s * w[1] ** 2)

  rho, max_angle = 1.0, 0.1
  w = jnp.asarray([1.0, 1.0])
  tx = sam_optax.xsam(scaled_loss, rho=rho, rho_max=rho, probe_every=1000,
                      alpha_max=3.0, max_angle=max_angle)
  state, kept, angles, thetas = tx.init(w), [], [], []
  for s in (30.0, 3.0, 30.0, 30.0):  # the second step's plane is wider
    g0 = jax.grad(scaled_loss)(w, s)
    updates, state = tx.update(g0, state, w, s=s)
    kept.append(float(state.alpha))
    u, g = np.asarray(updates, np.float64), np.asarray(g0, np.float64)
    angles.append(np.arccos(np.clip(
        u @ g / (np.linalg.norm(u) * np.linalg.norm(g)), -1, 1)))
    # theta by hand: the angle between g0 and g_k = grad L(w + rho g0/|g0|).
    eps = rho * g / np.linalg.norm(g)
    gk = np.array([1.0 + eps[0], s * (1.0 + eps[1])])
    thetas.append(np.arccos(gk @ g / (np.linalg.norm(gk) * np.linalg.norm(g))))
  alpha = kept[0]
  assert kept == [alpha] * 4
  assert alpha * thetas[1] > max_angle > alpha * thetas[0]  # step 1 capped
  np.testing.assert_allclose(
      angles, np.minimum(alpha * np.asarray(thetas), max_angle), rtol=2e-3)


@pytest.mark.parametrize('probe_batch_size', [1, 7, 21])
def test_probe_batch_size_does_not_change_the_result(probe_batch_size):
  tx = sam_optax.xsam(quad_loss, rho=0.1, rho_max=0.15, probe_every=1,
                      probe_batch_size=probe_batch_size)
  w0 = jnp.asarray(W0, jnp.float32)
  updates, state = tx.update(jax.grad(quad_loss)(w0), tx.init(w0), w0)
  ref_tx = sam_optax.xsam(quad_loss, rho=0.1, rho_max=0.15, probe_every=1)
  ref_updates, ref_state = ref_tx.update(
      jax.grad(quad_loss)(w0), ref_tx.init(w0), w0)
  np.testing.assert_allclose(state.probe_losses, ref_state.probe_losses,
                             rtol=1e-6)
  assert state.alpha == ref_state.alpha
  np.testing.assert_allclose(updates, ref_updates, rtol=1e-6)


# ----------------------------------------------------------------------------
# alpha = 1 without a probe is SAM.


@pytest.mark.parametrize('k', [1, 2])
def test_alpha_one_is_exactly_sam(k):
  make = lambda t: optax.chain(t, optax.sgd(0.5, momentum=0.9))
  got = run_steps(make(sam_optax.xsam(loss_fn, rho=0.3, probe_every=None,
                                      track_cosine=True,
                                      alpha=1.0, ascent_steps=k)), 5)
  want = run_steps(make(sam_optax.sam(loss_fn, rho=0.3, ascent_steps=k,
                                      track_cosine=True)), 5)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
  for (p, s), (q, r) in zip(got, want):
    # c0 = 0 and c1 = 1 exactly, so only rounding (two compiled programs)
    # may differ.
    jax.tree.map(close, p, q)
    close(s[0].perturbed_loss, r[0].perturbed_loss)
    close(s[0].cosine, r[0].cosine)
    assert s[0].alpha == 1.0


def test_fixed_alpha_schedule_and_zero_is_ascent_direction():
  # alpha = 0 ("SGD+"): the update is ||g1|| g0 / ||g0|| for k = 1.
  tx = sam_optax.xsam(quad_loss, rho=0.1, probe_every=None, alpha=0.0)
  w0 = jnp.asarray(W0, jnp.float32)
  updates, state = tx.update(jax.grad(quad_loss)(w0), tx.init(w0), w0)
  g0 = A_DIAG * W0
  g1 = A_DIAG * (W0 + 0.1 * g0 / np.linalg.norm(g0))
  np.testing.assert_allclose(
      updates, np.linalg.norm(g1) * g0 / np.linalg.norm(g0), rtol=1e-6)
  # A schedule for alpha is evaluated on the step count.
  tx = sam_optax.xsam(quad_loss, rho=0.1, probe_every=None,
                      alpha=optax.linear_schedule(0.0, 1.0, 4))
  state = tx.init(w0)
  seen = []
  for _ in range(3):
    _, state = tx.update(jax.grad(quad_loss)(w0), state, w0)
    seen.append(float(state.alpha))
  np.testing.assert_allclose(seen, [0.0, 0.25, 0.5])


# ----------------------------------------------------------------------------
# Degenerate planes: no NaN.


def test_zero_gradient_gives_zero_update_and_smallest_alpha():
  tx = sam_optax.xsam(quad_loss, rho=0.1, probe_every=1, track_cosine=True)
  w0 = jnp.zeros(2)
  updates, state = tx.update(jnp.zeros(2), tx.init(w0), w0)
  np.testing.assert_array_equal(updates, np.zeros(2))
  # All probe losses tie (every probe point is w0): the smallest alpha wins.
  assert float(state.alpha) == 0.0
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(leaf))


@pytest.mark.parametrize('alpha', [0.0, 0.5, 1.0, 1.7])
def test_parallel_and_antiparallel_gradients_are_finite(alpha):
  c = jnp.array([1.0, -2.0])
  linear = lambda w: jnp.dot(c, w)  # g_k = g0: theta = 0
  tx = sam_optax.xsam(linear, rho=0.1, probe_every=None, alpha=alpha,
                      track_cosine=True)
  w0 = jnp.array([0.3, 0.4])
  updates, state = tx.update(c, tx.init(w0), w0)
  np.testing.assert_allclose(updates, c, rtol=1e-6)
  assert np.isfinite(state.cosine)

  concave = lambda w: -0.5 * jnp.sum(w ** 2)  # g_k = -g0 / 3: theta = pi
  tx = sam_optax.xsam(concave, rho=0.2, probe_every=None, alpha=alpha,
                      track_cosine=True)
  w0 = jnp.array([0.05, 0.0])
  updates, state = tx.update(jax.grad(concave)(w0), tx.init(w0), w0)
  g1 = np.array([0.15, 0.0])  # -(w0 + 0.2 * (-1, 0))
  # The theta -> 0 limit of the slerp, (1 - alpha) v0 + alpha v1, times
  # ||g1||; v0 = -v1 here.
  np.testing.assert_allclose(updates, (2 * alpha - 1) * g1, atol=1e-7)
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(leaf))
  # With the probe on, the degenerate plane is probed without NaN too.
  tx = sam_optax.xsam(concave, rho=0.2, rho_max=0.3, probe_every=1)
  updates, state = tx.update(jax.grad(concave)(w0), tx.init(w0), w0)
  assert np.all(np.isfinite(updates)) and np.all(
      np.isfinite(state.probe_losses))


# ----------------------------------------------------------------------------
# The probe agrees across devices.


def test_probe_agrees_across_devices():
  n = jax.local_device_count()
  scales = np.linspace(6.0, 30.0, n).astype(np.float32)
  loss = lambda w, scale: 0.5 * (w[0] ** 2 + scale * w[1] ** 2)
  w0 = jnp.array([1.0, 0.1])
  kwargs = dict(rho=0.1, rho_max=0.15, probe_every=1, alpha_max=3.0,
                alpha_step=0.25)
  tx = sam_optax.xsam(loss, layout=sam_optax.PerDevice('devices'), **kwargs)

  def step(scale):
    grads = jax.grad(loss)(w0, scale=scale)
    return tx.update(grads, tx.init(w0), w0, scale=scale)

  updates, state = jax.pmap(step, axis_name='devices')(scales)
  # Each device alone would probe its own loss ...
  alone = sam_optax.xsam(loss, **kwargs)
  own = np.stack([
      alone.update(jax.grad(loss)(w0, scale=s), alone.init(w0), w0,
                   scale=s)[1].probe_losses for s in scales])
  assert len(set(np.argmax(own, axis=1).tolist())) > 1  # ... and disagree.
  # Together they choose from the device-averaged losses, all the same alpha.
  grid = xsam_lib.alpha_grid(3.0, 0.25)
  np.testing.assert_allclose(state.probe_losses,
                             np.broadcast_to(own.mean(0), own.shape),
                             rtol=1e-5)
  np.testing.assert_array_equal(
      state.alpha, np.full(n, grid[np.argmax(own.mean(0))]))
  np.testing.assert_allclose(updates, np.broadcast_to(updates[0],
                                                      updates.shape))


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('kwargs, error, match', [
    ({'rho_max': 0.0}, ValueError, 'rho_max must be a finite number > 0'),
    ({'rho_max': -1.0}, ValueError, 'rho_max'),
    ({'rho': -0.1}, ValueError, 'rho must be a finite number >= 0'),
    ({'alpha': -1.0}, ValueError, 'alpha must be a finite number >= 0'),
    ({'alpha_max': 0.0}, ValueError, 'alpha_max must be a finite number > 0'),
    ({'alpha_max': lambda c: 2.0}, TypeError, 'alpha_max must be a static'),
    ({'alpha_max': '2'}, TypeError, 'alpha_max'),
    ({'alpha_step': 0.0}, ValueError, 'alpha_step must be a finite'),
    ({'alpha_step': float('nan')}, ValueError, 'alpha_step'),
    ({'alpha_step': 3.0}, ValueError, 'must not exceed alpha_max'),
    ({'alpha_step': 1e-6}, ValueError, 'coarser alpha_step'),
    ({'probe_every': 0}, ValueError, 'probe_every must be an int >= 1'),
    ({'probe_every': 2.5}, TypeError, 'probe_every'),
    ({'probe_every': True}, TypeError, 'probe_every'),
    ({'probe_batch_size': 0}, ValueError, 'probe_batch_size'),
    ({'ascent_steps': 0}, ValueError, 'ascent_steps'),
    ({'max_angle': 4.0}, ValueError, 'at most pi'),
    ({'max_angle': 0.0}, ValueError, 'max_angle must be a finite'),
])
def test_bad_input_is_a_clear_error(kwargs, error, match):
  with pytest.raises(error, match=match):
    sam_optax.xsam(quad_loss, **kwargs)


def test_state_is_stable_and_checkpointable():
  tx = sam_optax.xsam(loss_fn, probe_every=2)
  params = {'w': jnp.asarray(W_INIT), 'b': jnp.asarray(B_INIT)}
  init = tx.init(params)
  assert isinstance(init, sam_optax.XSAMState)
  assert init.probe_losses.shape == (21,)
  state = init
  for t in range(3):
    _, state = jax.jit(tx.update)(
        jax.grad(loss_fn)(params, batch_at(t)), state, params,
        batch=batch_at(t))
  for a, b in zip(init, state):
    assert a.shape == b.shape and a.dtype == b.dtype


def test_inject_hyperparams():
  tx = sam_optax.inject_hyperparams(sam_optax.xsam)(
      quad_loss, rho=0.1, rho_max=0.15, probe_every=1, alpha_max=3.0)
  w0 = jnp.asarray(W0, jnp.float32)
  state = tx.init(w0)
  _, state = jax.jit(tx.update)(jax.grad(quad_loss)(w0), state, w0)
  direct = sam_optax.xsam(quad_loss, rho=0.1, rho_max=0.15, probe_every=1,
                          alpha_max=3.0)
  _, want = direct.update(jax.grad(quad_loss)(w0), direct.init(w0), w0)
  assert state.inner_state.alpha == want.alpha
