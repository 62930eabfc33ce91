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
    'wsam': (sam_optax.wsam, 'wsam', {'gamma': 0.75, 'decouple': False}),
    'wsam_decoupled': (sam_optax.wsam, 'wsam_decoupled', {'gamma': 0.75}),
    'friendly_sam': (sam_optax.friendly_sam, 'friendly_sam',
                     {'sigma': 0.75, 'lmbda': 0.625}),
    'vasso': (sam_optax.vasso, 'vasso', {'theta': 0.375}),
}


def reference(case, groups):
  _, name, hp = CASES[case]
  hp = {k: v for k, v in hp.items() if k != 'decouple'}
  ref = Reference(name, groups, **hp)
  return np.stack([ref.step(XS[t], YS[t]) for t in range(STEPS)])


# ----------------------------------------------------------------------------
# The sam_optax side: all steps in one lax.scan (one compile per case).

def make_tx(case, layout=None):
  factory, name, hp = CASES[case]
  if name == 'wsam_decoupled':
    return factory(loss_fn, rho=RHO, base_optimizer=optax.sgd(LR, MOMENTUM),
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
# float32 runs under the layouts (the layout battery, test_layouts.py, checks
# one step of every variant under every layout; these check several).
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
