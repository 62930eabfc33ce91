"""The SAM family (gsam, wsam, friendly_sam, vasso) against NumPy references.

Each reference below is written from the equations of the issue on flat
float64 vectors, with a hand-written gradient of a small tanh MLP; it shares
no code with sam_optax. Every run is several steps with momentum SGD behind
the variant (or, for decoupled WSAM, as its base optimizer), on changing
minibatches, in float32 and float64, with one perturbation for the whole
batch, per chunk (`Chunks`) and per device (`PerDevice`, 8 CPU devices).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax

D, H, O, BATCH, STEPS = 3, 4, 2, 16, 4
# Hyperparameters exact in float32 (the pipeline evaluates them in float32,
# so a float64 run would otherwise see a rounded rho).
LR, MOMENTUM, RHO = 0.125, 0.875, 0.25
_rng = np.random.default_rng(7)
XS = _rng.normal(size=(STEPS, BATCH, D))
YS = _rng.normal(size=(STEPS, BATCH, O))
INIT = {'b1': 0.1 * _rng.normal(size=(H,)), 'w1': _rng.normal(size=(D, H)),
        'w2': _rng.normal(size=(H, O))}
SHAPES = [(k, INIT[k].shape) for k in sorted(INIT)]
MESH = jax.make_mesh((8,), ('d',))


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params['w1'] + params['b1'])
  return 0.5 * jnp.mean(jnp.sum((h @ params['w2'] - y) ** 2, axis=-1))


# ----------------------------------------------------------------------------
# The NumPy side: flat float64 vectors, a hand-written gradient.

def flat(tree):
  return np.concatenate([np.asarray(tree[k], np.float64).ravel()
                         for k, _ in SHAPES])


def unflat(v):
  out, start = {}, 0
  for k, shape in SHAPES:
    size = int(np.prod(shape))
    out[k] = v[start:start + size].reshape(shape)
    start += size
  return out


def np_grad(v, x, y):
  p = unflat(v)
  h = np.tanh(x @ p['w1'] + p['b1'])
  r = (h @ p['w2'] - y) / len(x)
  dz = (r @ p['w2'].T) * (1 - h ** 2)
  return flat({'b1': dz.sum(0), 'w1': x.T @ dz, 'w2': h.T @ r})


def unit(v):
  n = np.linalg.norm(v)
  return v / n if n > 0 else v * 0


def gsam_rule(g0, g1, alpha=0.4, minimize_fp=True):
  if minimize_fp:  # g1 - alpha * (g0 - (g0 . u1) u1)
    u1 = unit(g1)
    return g1 - alpha * (g0 - (g0 @ u1) * u1)
  u0 = unit(g0)  # g0 + alpha * (g1 - (g1 . u0) u0)
  return g0 + alpha * (g1 - (g1 @ u0) * u0)


class Reference:
  """One variant, its state, momentum SGD; ``groups`` perturbations."""

  def __init__(self, name, groups, **hp):
    self.name, self.groups, self.hp = name, groups, hp
    self.w = flat(INIT)
    self.trace = np.zeros_like(self.w)
    self.m = None  # friendly_sam's momentum / vasso's average

  def ascent(self, g0):
    """The direction d of each group and the new state, from g0."""
    hp, m = self.hp, self.m
    if self.name == 'friendly_sam':
      if m is None:
        return g0, g0
      return g0 - hp['sigma'] * m, hp['lmbda'] * m + (1 - hp['lmbda']) * g0
    if self.name == 'vasso':
      if m is None:
        return g0, g0
      d = (1 - hp['theta']) * m + hp['theta'] * g0
      return d, d
    return g0, None

  def step(self, x, y):
    xs, ys = np.split(x, self.groups), np.split(y, self.groups)
    handed, news, sharp = [], [], []
    for xg, yg in zip(xs, ys):
      g0 = np_grad(self.w, xg, yg)
      d, new = self.ascent(g0)
      g1 = np_grad(self.w + RHO * unit(d), xg, yg)
      alpha = self.hp.get('gamma', 0.0) / (1 - self.hp.get('gamma', 0.0))
      if self.name == 'gsam':
        handed.append(gsam_rule(g0, g1, **self.hp))
      elif self.name == 'wsam':
        handed.append(alpha * g1 + (1 - alpha) * g0)
      elif self.name == 'wsam_decoupled':
        handed.append(g0)
        sharp.append(alpha * (g1 - g0))
      else:
        handed.append(g1)
      news.append(new)
    if news[0] is not None:
      self.m = np.mean(news, axis=0)
    self.trace = np.mean(handed, axis=0) + MOMENTUM * self.trace
    self.w = self.w - LR * self.trace
    if sharp:
      self.w = self.w - LR * np.mean(sharp, axis=0)
    return self.w


CASES = {
    'gsam': (sam_optax.gsam, 'gsam', {'alpha': 0.375}),
    'gsam_fp_false': (sam_optax.gsam, 'gsam',
                      {'alpha': 0.625, 'minimize_fp': False}),
    'wsam': (sam_optax.wsam, 'wsam', {'gamma': 0.75}),
    'wsam_decoupled': (sam_optax.decoupled_wsam, 'wsam_decoupled',
                       {'gamma': 0.75}),
    'friendly_sam': (sam_optax.friendly_sam, 'friendly_sam',
                     {'sigma': 0.75, 'lmbda': 0.625}),
    'vasso': (sam_optax.vasso, 'vasso', {'theta': 0.375}),
}


def reference(case, groups):
  _, name, hp = CASES[case]
  ref = Reference(name, groups, **hp)
  return np.stack([ref.step(XS[t], YS[t]) for t in range(STEPS)])


# ----------------------------------------------------------------------------
# The sam_optax side: all steps in one lax.scan (one compile per case).

def make_tx(case, layout=None):
  factory, name, hp = CASES[case]
  if name == 'wsam_decoupled':
    return factory(loss_fn, optax.sgd(LR, MOMENTUM), rho=RHO,
                   learning_rate=LR, layout=layout, **hp)
  return optax.chain(factory(loss_fn, rho=RHO, layout=layout, **hp),
                     optax.sgd(LR, MOMENTUM))


def scan_steps(tx, params, xs, ys, local=lambda p: p):
  def step(carry, batch):
    params, state = carry
    x, y = batch
    grads = jax.grad(loss_fn)(local(params), x, y)
    updates, state = tx.update(grads, state, params, x=x, y=y)
    params = optax.apply_updates(params, updates)
    return (params, state), jax.tree.map(lambda a: a.ravel(), params)

  _, trajectory = jax.lax.scan(step, (params, tx.init(params)), (xs, ys))
  return jnp.concatenate([trajectory[k] for k, _ in SHAPES], axis=1)


def run(case, dtype, layout_name):
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), INIT)
  xs, ys = jnp.asarray(XS, dtype), jnp.asarray(YS, dtype)
  if layout_name == 'per_device':
    tx = make_tx(case, sam_optax.PerDevice('d'))
    local = lambda p: jax.lax.pcast(p, 'd', to='varying')
    fn = jax.shard_map(functools.partial(scan_steps, tx, local=local),
                       mesh=MESH, in_specs=(P(), P(None, 'd'), P(None, 'd')),
                       out_specs=P())
    split = NamedSharding(MESH, P(None, 'd'))
    params = jax.device_put(params, NamedSharding(MESH, P()))
    xs, ys = jax.device_put(xs, split), jax.device_put(ys, split)
    return np.asarray(jax.jit(fn)(params, xs, ys))
  layout = sam_optax.Chunks(4) if layout_name == 'chunks' else None
  return np.asarray(jax.jit(functools.partial(scan_steps, make_tx(
      case, layout)))(params, xs, ys))


GROUPS = {'whole': 1, 'chunks': BATCH // 4, 'per_device': 8}
# float32 runs under the layouts (the layout battery, pipeline/test_layouts.py, checks
# one step of these variants under the layouts; these check several).
RUNS = ([(c, 'float64', 'whole') for c in CASES]
        + [(c, 'float32', 'chunks') for c in CASES]
        + [(c, 'float32', 'per_device') for c in
           ('friendly_sam', 'vasso', 'wsam_decoupled')])


@pytest.mark.parametrize('case,dtype,layout_name', RUNS,
                         ids=['-'.join(r) for r in RUNS])
def test_matches_the_numpy_reference_over_steps(case, dtype, layout_name):
  want = reference(case, GROUPS[layout_name])
  with jax.enable_x64(dtype == 'float64'):
    got = run(case, dtype, layout_name)
  assert got.dtype == dtype
  # float64 runs to float32 precision where a state vector is float32.
  stateful = case in ('friendly_sam', 'vasso', 'wsam_decoupled')
  tol = 2e-5 if dtype == 'float32' else (1e-7 if stateful else 1e-11)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
  # The variant differs from SAM on this problem.
  sam = Reference('sam', GROUPS[layout_name])
  plain = np.stack([sam.step(XS[t], YS[t]) for t in range(STEPS)])
  assert np.max(np.abs(want - plain)) > 1e-3


# ----------------------------------------------------------------------------
# Decoupled WSAM: the wrapper around the base optimizer.

GRADS = None


def _one_batch():
  params = jax.tree.map(jnp.asarray, jax.tree.map(np.float32, INIT))
  x, y = jnp.asarray(XS[0], jnp.float32), jnp.asarray(YS[0], jnp.float32)
  return params, x, y, jax.grad(loss_fn)(params, x, y)


def _steps(tx, params, steps=3):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    x, y = jnp.asarray(XS[t], jnp.float32), jnp.asarray(YS[t], jnp.float32)
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = update(grads, state, params, x=x, y=y)
    params = optax.apply_updates(params, updates)
  return params, state


def test_decoupled_wsam_reads_the_learning_rate_of_an_injected_base():
  params = _one_batch()[0]
  schedule = optax.linear_schedule(LR, LR / 4, 3)
  given = sam_optax.decoupled_wsam(loss_fn, optax.sgd(schedule, MOMENTUM),
                                   rho=RHO, learning_rate=schedule)
  read = sam_optax.decoupled_wsam(
      loss_fn, optax.inject_hyperparams(optax.sgd)(schedule, MOMENTUM),
      rho=RHO)
  (a, state), (b, _) = _steps(given, params), _steps(read, params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert isinstance(state, sam_optax.DecoupledWSAMState)
  # The sharpness part is a float32 tree like the parameters.
  assert jax.tree.structure(state.wsam.sharpness) == jax.tree.structure(INIT)
  for leaf, like in zip(jax.tree.leaves(state.wsam.sharpness),
                        jax.tree.leaves(INIT)):
    assert leaf.dtype == jnp.float32 and leaf.shape == np.shape(like)


def test_decoupled_wsam_bad_traced_gamma_is_skipped_and_inject_works():
  params, x, y, grads = _one_batch()
  injected = sam_optax.inject_hyperparams(sam_optax.decoupled_wsam)(
      loss_fn, optax.sgd(LR), rho=RHO, gamma=0.75, learning_rate=LR)
  state = injected.init(params)
  assert set(state.hyperparams) == {'rho', 'gamma', 'learning_rate'}
  good, _ = injected.update(grads, state, params, x=x, y=y)
  want, _ = sam_optax.decoupled_wsam(
      loss_fn, optax.sgd(LR), rho=RHO, gamma=0.75, learning_rate=LR).update(
          grads, injected.init(params).inner_state, params, x=x, y=y)
  for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # A complete optimizer refuses the step: zero update, counted.
  state.hyperparams['gamma'] = jnp.asarray(1.5)
  bad, new = jax.jit(injected.update)(grads, state, params, x=x, y=y)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(bad))
  assert int(new.inner_state.skipped_steps) == 1
  assert int(new.inner_state.wsam.count) == 0


# ----------------------------------------------------------------------------
# Friendly SAM and VaSSO with their defaults: a rho schedule is evaluated on
# the transformation's own count (the battery's check, for a stateful
# variant: against rho set step by step through inject_hyperparams).

@pytest.mark.parametrize('factory', [sam_optax.friendly_sam, sam_optax.vasso],
                         ids=['friendly_sam', 'vasso'])
def test_stateful_variant_follows_its_rho_schedule(factory):
  params = _one_batch()[0]
  schedule = optax.linear_schedule(0.05, 0.25, 3)
  scheduled = optax.chain(factory(loss_fn, rho=schedule),
                          optax.sgd(LR, MOMENTUM))
  injected = sam_optax.inject_hyperparams(factory)(loss_fn, rho=0.0)
  stepped = optax.chain(injected, optax.sgd(LR, MOMENTUM))
  state_a, state_b = scheduled.init(params), stepped.init(params)
  p_a = p_b = params
  for t in range(3):
    x, y = jnp.asarray(XS[t], jnp.float32), jnp.asarray(YS[t], jnp.float32)
    state_b[0].hyperparams['rho'] = jnp.asarray(schedule(t))
    u_a, state_a = scheduled.update(jax.grad(loss_fn)(p_a, x, y), state_a,
                                    p_a, x=x, y=y)
    u_b, state_b = stepped.update(jax.grad(loss_fn)(p_b, x, y), state_b,
                                  p_b, x=x, y=y)
    p_a, p_b = optax.apply_updates(p_a, u_a), optax.apply_updates(p_b, u_b)
  for a, b in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_gsam_with_alpha_zero_is_sam():
  params, x, y, grads = _one_batch()
  got, _ = sam_optax.gsam(loss_fn, rho=RHO, alpha=0.0).update(
      grads, sam_optax.gsam(loss_fn).init(params), params, x=x, y=y)
  want, _ = sam_optax.sam(loss_fn, rho=RHO).update(
      grads, sam_optax.sam(loss_fn).init(params), params, x=x, y=y)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# rho tied to the learning rate.

def test_rho_proportional_to_lr_follows_the_rate_and_is_clipped():
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100, 0.01)
  rho = sam_optax.rho_proportional_to_lr(lr, rho_max=0.04, rho_min=0.02,
                                         lr_max=0.1, lr_min=0.01)
  counts = np.arange(101)
  got = np.asarray(jax.vmap(rho)(counts))
  rate = np.asarray(jax.vmap(lr)(counts))
  want = 0.02 + 0.02 * (rate - 0.01) / 0.09
  # During the warm-up lr < lr_min, where the formula falls below rho_min
  # (big_vision's negative rho); the schedule stays at rho_min there.
  assert np.min(want) < 0.02 and np.min(got) >= 0.02 - 1e-9
  np.testing.assert_allclose(got, np.maximum(want, 0.02), rtol=1e-5)
  np.testing.assert_allclose(got[10], 0.04, rtol=1e-6)
  constant = sam_optax.rho_proportional_to_lr(0.1, 0.05, 0.01, 0.1, 0.1)
  assert float(constant(3)) == pytest.approx(0.05)
  with pytest.raises(ValueError, match='rho_min .* must not exceed rho_max'):
    sam_optax.rho_proportional_to_lr(lr, 0.01, 0.02, 0.1, 0.0)
  with pytest.raises(ValueError, match='lr_min .* must not exceed lr_max'):
    sam_optax.rho_proportional_to_lr(lr, 0.02, 0.01, 0.1, 0.2)


def test_rho_proportional_to_lr_drives_every_step_of_gsam():
  params, x, y, grads = _one_batch()
  lr = optax.linear_schedule(0.0, 0.1, 4)
  rho = sam_optax.rho_proportional_to_lr(lr, 0.2, 0.05, 0.1, 0.025)
  tx = sam_optax.gsam(loss_fn, rho=rho)
  state = tx.init(params)
  for t in range(3):
    got, state = tx.update(grads, state, params, x=x, y=y)
    fixed = sam_optax.gsam(loss_fn, rho=float(rho(t)))
    want, _ = fixed.update(grads, fixed.init(params), params, x=x, y=y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# SAM-ON: the normalization layers' parameters, by path.

def _linen_params():
  from flax import linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))
      x = nn.LayerNorm()(x)
      return nn.RMSNorm(name='ln_f')(nn.Dense(2, name='head')(x))

  return Net().init(jax.random.key(0), jnp.ones((1, 3)))['params']


def test_normalization_mask_selects_linen_and_nnx_norm_layers():
  from flax import nnx
  mask = sam_optax.normalization_mask(_linen_params())
  assert mask['BatchNorm_0'] == {'scale': True, 'bias': True}
  assert mask['LayerNorm_0'] == {'scale': True, 'bias': True}
  assert mask['ln_f'] == {'scale': True}
  assert not any(jax.tree.leaves((mask['Dense_0'], mask['head'])))

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.bn1 = nnx.BatchNorm(4, rngs=rngs)
      self.final = nnx.LayerNorm(4, rngs=rngs)  # a name without 'norm'

  model = Block(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  by_name = sam_optax.normalization_mask(state)
  by_type = sam_optax.normalization_mask(state, model=model)
  chosen = lambda m: sorted(
      jax.tree_util.keystr(p) for p, keep in
      jax.tree_util.tree_flatten_with_path(m)[0] if keep)
  assert chosen(by_name) == ["['bn1']['bias'].value",
                             "['bn1']['scale'].value"]
  assert chosen(by_type) == chosen(by_name) + [
      "['final']['bias'].value", "['final']['scale'].value"]


@pytest.mark.parametrize('factory', [sam_optax.sam, sam_optax.friendly_sam,
                                     sam_optax.vasso],
                         ids=['sam', 'friendly_sam', 'vasso'])
def test_sam_on_perturbs_only_the_selected_leaves(factory):
  # L(w) = <c, w> + |w|^2 / 2 has grad c + w, so grad L(w + eps) - g0 = eps.
  params = _linen_params()
  c = jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size).reshape(
      p.shape), params)
  quadratic = lambda w: sum(jnp.sum(a * b + 0.5 * b ** 2) for a, b in zip(
      jax.tree.leaves(c), jax.tree.leaves(w)))
  tx = factory(quadratic, rho=0.1,
               perturbation_mask=sam_optax.normalization_mask)
  grads = jax.grad(quadratic)(params)
  out, _ = tx.update(grads, tx.init(params), params)
  mask = sam_optax.normalization_mask(params)
  eps = jax.tree.map(lambda a, b: a - b, out, grads)
  selected = [e for e, keep in zip(jax.tree.leaves(eps),
                                   jax.tree.leaves(mask)) if keep]
  others = [e for e, keep in zip(jax.tree.leaves(eps),
                                 jax.tree.leaves(mask)) if not keep]
  assert all(bool(jnp.all(e == 0)) for e in others)  # stay exactly at w
  g_selected = [g for g, keep in zip(jax.tree.leaves(grads),
                                     jax.tree.leaves(mask)) if keep]
  norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in g_selected))
  for e, g in zip(selected, g_selected):  # rho g_S / ||g_S||
    np.testing.assert_allclose(e, 0.1 * g / norm, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# bSAM: the authors' update, step by step, in NumPy.

BSAM = dict(learning_rate=0.125, num_data=40, rho=0.25, betas=(0.875, 0.75),
            prior_prec=2.0, damping=0.125, s_init=2.0, seed=3)


def bsam_reference(steps=STEPS):
  hp = BSAM
  delta = hp['prior_prec'] / hp['num_data']
  b1, b2 = hp['betas']
  w, m = flat(INIT), np.zeros(flat(INIT).shape)
  s = np.full(w.shape, hp['s_init'])
  key = jax.random.key(hp['seed'])
  out = []
  for t in range(steps):
    key, sub = jax.random.split(key)  # the documented noise
    xi = np.concatenate([np.asarray(jax.random.normal(
        jax.random.fold_in(sub, i), shape), np.float64).ravel()
                         for i, (_, shape) in enumerate(SHAPES)])
    g = np_grad(w + xi / np.sqrt(hp['num_data'] * s), XS[t], YS[t])
    g_eps = np_grad(w + hp['rho'] * g / s, XS[t], YS[t])
    m = b1 * m + (1 - b1) * (g_eps + delta * w)
    w = w - hp['learning_rate'] * m / s
    s = b2 * s + (1 - b2) * (np.sqrt(s * g ** 2) + hp['damping'] + delta)
    out.append(w)
  return np.stack(out), s


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_bsam_matches_the_authors_update(dtype):
  want, precision = bsam_reference()
  with jax.enable_x64(dtype == 'float64'):
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), INIT)
    tx = sam_optax.bsam(loss_fn, **BSAM)
    state, update = tx.init(params), jax.jit(tx.update)
    got = []
    for t in range(STEPS):
      x, y = jnp.asarray(XS[t], dtype), jnp.asarray(YS[t], dtype)
      updates, state = update(params, state, params, x=x, y=y)
      params = optax.apply_updates(params, updates)
      got.append(flat(params))
    assert all(p.dtype == dtype for p in jax.tree.leaves(params))
    for leaf in jax.tree.leaves((state.momentum, state.precision)):
      assert leaf.dtype == jnp.float32
    assert state.count.dtype == jnp.int32
  np.testing.assert_allclose(np.stack(got), want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(flat(state.precision), precision, rtol=2e-5)


def test_bsam_options_and_bad_values():
  with pytest.raises(ValueError, match='num_data must be a number > 0'):
    sam_optax.bsam(loss_fn, 0.1, num_data=0)
  with pytest.raises(ValueError, match='beta2 must be < 1.0'):
    sam_optax.bsam(loss_fn, 0.1, num_data=10, betas=(0.9, 1.0))
  with pytest.raises(ValueError, match='s_init must be a finite number > 0'):
    sam_optax.bsam(loss_fn, 0.1, num_data=10, s_init=0.0)
  params, x, y, grads = _one_batch()
  # A NaN learning rate: the step is refused (a zero update, counted).
  tx = sam_optax.bsam(loss_fn, lambda count: jnp.nan, num_data=10)
  out, state = tx.update(grads, tx.init(params), params, x=x, y=y)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(out))
  assert int(state.skipped_steps) == 1 and int(state.count) == 0
