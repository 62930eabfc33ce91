"""ESAM's sharpness-sensitive data selection against its equations.

The reference is written from the paper's equations with the per-example
losses computed by hand in NumPy (float64), the top-k chosen by
``np.argsort`` and the re-gradient on the chosen rows taken by `jax.grad`
of a hand-written loss; it runs several steps of SGD with momentum behind
the transformation. The leaf draws of the weight perturbation are
specified as draws from the key in the state, so the reference redraws
them with `jax.random`. A layout only decides which examples form each
perturbation group, so the reference takes the groups as consecutive
blocks of the batch.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax

DEVICES = 8
N = 32
RHO, LR, MOMENTUM, STEPS = 0.3, 0.1, 0.9, 5
MESH = jax.make_mesh((DEVICES,), ('d',))

_keys = jax.random.split(jax.random.key(7), 5)
PARAMS = {'w1': jax.random.normal(_keys[0], (3, 5)),
          'b1': 0.1 * jax.random.normal(_keys[1], (5,)),
          'w2': jax.random.normal(_keys[2], (5, 2))}
X = jax.random.normal(_keys[3], (N, 3))
Y = jax.random.normal(_keys[4], (N, 2))


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params['w1'] + params['b1'])
  return jnp.mean((h @ params['w2'] - y) ** 2)


def aux_loss_fn(params, x, y):
  return loss_fn(params, x, y), {'n': x.shape[0]}


def hand_loss(w, x, y):
  """The same loss, written again (on the flat leaves b1, w1, w2)."""
  b1, w1, w2 = w
  h = jnp.tanh(x @ w1 + b1)
  return jnp.mean((h @ w2 - y) ** 2)


def example_losses_np(w, x, y):
  """Each example's own loss in float64 NumPy, one example at a time."""
  b1, w1, w2 = (np.asarray(v, np.float64) for v in w)
  out = []
  for xi, yi in zip(np.asarray(x, np.float64), np.asarray(y, np.float64)):
    h = np.tanh(xi @ w1 + b1)
    out.append(np.mean((h @ w2 - yi) ** 2))
  return np.array(out)


def flat(params):
  return [params['b1'], params['w1'], params['w2']]  # jax.tree.leaves order


def reference(gamma, beta=1.0, groups=1, sync=False, seed=0, steps=STEPS):
  """SGD with momentum on ESAM (SWP + SDS), per group of N // groups rows.

  ``sync``: every group perturbs along the mean clean gradient of all
  groups (``PerDevice(sync=True)``) but selects among its own rows.
  """
  w = [np.asarray(v, np.float64) for v in flat(PARAMS)]
  velocity = [np.zeros_like(v) for v in w]
  key = jax.random.PRNGKey(seed)
  grad = jax.grad(hand_loss)
  m = N // groups
  k = max(1, round(gamma * m))
  history = []
  for _ in range(steps):
    key, draw = jax.random.split(key)
    keep = np.asarray(jax.random.uniform(draw, (3,)) < beta, np.float64)
    blocks = [(X[i * m:(i + 1) * m], Y[i * m:(i + 1) * m])
              for i in range(groups)]
    w32 = [jnp.asarray(v, jnp.float32) for v in w]
    clean = [[np.asarray(g, np.float64) for g in grad(w32, x, y)]
             for x, y in blocks]
    if sync:
      clean = [[np.mean(parts, axis=0) for parts in zip(*clean)]] * groups
    total = [np.zeros_like(v) for v in w]
    for (x, y), g0 in zip(blocks, clean):
      norm = np.sqrt(sum(np.sum(g ** 2) for g in g0))
      point = [v + RHO * g / norm * (keep_l / beta)
               for v, g, keep_l in zip(w, g0, keep)]
      sharp = (example_losses_np(point, x, y)
               - example_losses_np(w, x, y))
      chosen = np.argsort(-sharp, kind='stable')[:k]
      g = grad([jnp.asarray(v, jnp.float32) for v in point], x[chosen],
               y[chosen])
      total = [t + np.asarray(gl, np.float64) / groups
               for t, gl in zip(total, g)]
    velocity = [t + MOMENTUM * v for t, v in zip(total, velocity)]
    w = [p - LR * v for p, v in zip(w, velocity)]
    history.append(w)
  return history


def momentum_run(update, steps=STEPS):
  """Runs ``update(grads, state, params) -> (u, state)`` with momentum SGD."""
  sgd = optax.sgd(LR, momentum=MOMENTUM)
  params, sgd_state, state, history = PARAMS, sgd.init(PARAMS), None, []
  for _ in range(steps):
    u, state = update(params, state)
    u, sgd_state = sgd.update(u, sgd_state, params)
    params = optax.apply_updates(params, u)
    history.append(flat(params))
  return history, state


def run(tx, layout=None, fn=loss_fn):
  init = tx.init(PARAMS)
  if not isinstance(layout, sam_optax.PerDevice):
    jitted = jax.jit(tx.update)
    batch = {'x': X, 'y': Y}
    if isinstance(getattr(layout, 'mode', None), sam_optax.MeshChunks):
      batch = sam_optax.shard_batch(batch, MESH, 'd')

    def update(params, state):
      state = init if state is None else state
      return jitted(jax.grad(loss_fn)(params, X, Y), state, params, **batch)

    if batch['x'] is X:
      return momentum_run(update)
    with jax.set_mesh(MESH):
      return momentum_run(update)

  def step(params, state, x, y):
    local = jax.lax.pcast(params, 'd', to='varying')
    return tx.update(jax.grad(loss_fn)(local, x, y), state, params, x=x, y=y)

  sharded = jax.jit(jax.shard_map(step, mesh=MESH,
                                  in_specs=(P(), P(), P('d'), P('d')),
                                  out_specs=(P(), P())))
  replicated = NamedSharding(MESH, P())
  data = jax.device_put((X, Y), NamedSharding(MESH, P('d')))

  def update(params, state):
    state = init if state is None else state
    return sharded(*jax.device_put((params, state), replicated), *data)

  return momentum_run(update)


def assert_history(got, want):
  for step, (g, w) in enumerate(zip(got, want)):
    for a, b in zip(g, w):
      np.testing.assert_allclose(np.asarray(a), b, rtol=2e-4, atol=2e-5,
                                 err_msg=f'step {step}')


@pytest.mark.parametrize('gamma,beta', [(0.5, 1.0), (0.25, 1.0), (0.5, 0.5),
                                        (0.3, 1.0)])
def test_matches_the_equations_over_steps(gamma, beta):
  got, state = run(sam_optax.esam(loss_fn, rho=RHO, beta=beta, gamma=gamma,
                                  seed=3))
  assert_history(got, reference(gamma, beta, seed=3))
  assert float(state.selected_sharpness) >= float(state.sharpness)
  assert np.isfinite(float(state.sharpness))


def test_the_selected_sharpness_is_the_mean_of_the_top_k():
  tx = sam_optax.esam(loss_fn, rho=RHO, beta=1.0, gamma=0.25)
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  _, state = tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y)
  w = [np.asarray(v, np.float64) for v in flat(PARAMS)]
  g0 = [np.asarray(g, np.float64) for g in flat(grads)]
  norm = np.sqrt(sum(np.sum(g ** 2) for g in g0))
  point = [v + RHO * g / norm for v, g in zip(w, g0)]
  after = example_losses_np(point, X, Y)
  sharp = after - example_losses_np(w, X, Y)
  np.testing.assert_allclose(float(state.sharpness), sharp.mean(),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(state.selected_sharpness),
                             np.sort(sharp)[-8:].mean(), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(float(state.perturbed_loss), after.mean(),
                             rtol=1e-5)


@pytest.mark.parametrize('beta', [1.0, 0.5])
def test_gamma_one_is_swp_alone_exactly(beta):
  tx = sam_optax.esam(loss_fn, rho=RHO, beta=beta, gamma=1.0, seed=1)
  got, state = run(tx)
  assert float(state.sharpness) == 0.0  # not measured: 0, never a NaN
  assert_history(got, reference(1.0, beta, seed=1))
  # Statically no selection machinery: no top_k, no per-example vmap.
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  text = str(jax.make_jaxpr(tx.update)(grads, tx.init(PARAMS), PARAMS,
                                       x=X, y=Y))
  assert 'top_k' not in text
  if beta == 1.0:  # and with beta = 1 it is SAM (up to rounding: two
    # programs)
    sam = sam_optax.sam(loss_fn, rho=RHO)
    a, _ = tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y)
    b, _ = sam.update(grads, sam.init(PARAMS), PARAMS, x=X, y=Y)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_every_example_selected_is_swp_up_to_rounding():
  # gamma 0.99 of 32 examples keeps round(31.68) = 32: the selection path
  # with every example, in sharpness order.
  got, _ = run(sam_optax.esam(loss_fn, rho=RHO, beta=0.5, gamma=0.99))
  want, _ = run(sam_optax.esam(loss_fn, rho=RHO, beta=0.5, gamma=1.0))
  assert_history(got, [[np.asarray(v) for v in w] for w in want])


@pytest.mark.parametrize('layout,groups,sync', [
    (sam_optax.Chunks(8), 4, False),
    (sam_optax.Chunks(8, mode='vectorized'), 4, False),
    (sam_optax.Chunks(8, shared=True), 1, False),
    (sam_optax.Chunks(4, mode=sam_optax.mesh_chunks(MESH, 'd')), 8, False),
    (sam_optax.PerDevice('d'), DEVICES, False),
    (sam_optax.PerDevice('d', chunks=sam_optax.Chunks(2)), 16, False),
    (sam_optax.PerDevice('d', sync=True), DEVICES, True),
], ids=['chunks', 'chunks_vectorized', 'chunks_shared', 'chunks_on_mesh',
        'per_device', 'per_device_chunks', 'per_device_sync'])
def test_every_layout_selects_within_its_groups(layout, groups, sync):
  gamma = 0.5
  tx = sam_optax.esam(loss_fn, rho=RHO, beta=0.5, gamma=gamma, seed=4,
                      layout=layout)
  got, state = run(tx, layout)
  assert_history(got, reference(gamma, 0.5, groups=groups, sync=sync,
                                seed=4))
  assert float(state.selected_sharpness) >= float(state.sharpness)


def test_has_aux_and_named_batch_arguments():
  scale = jnp.asarray([1.0, 2.0])  # not per-example: goes to every example

  def scaled_loss(params, x, y, scale):
    return loss_fn(params, x, y * scale)

  def aux(params, x, y, scale):
    return scaled_loss(params, x, y, scale), {'secret': jnp.ones(3)}

  grads = jax.grad(scaled_loss)(PARAMS, X, Y, scale)
  outs = []
  for fn, has_aux in ((scaled_loss, False), (aux, True)):
    tx = sam_optax.esam(fn, rho=RHO, beta=1.0, gamma=0.5, has_aux=has_aux,
                        batch_argnames=('x', 'y'))
    outs.append(jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS, x=X, y=Y,
                                   scale=scale))
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Without the names, scale's leading dimension (2) is taken for a batch.
  tx = sam_optax.esam(scaled_loss, rho=RHO, gamma=0.5)
  with pytest.raises(ValueError, match='disagree on their leading'):
    tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y, scale=scale)


def test_a_training_loop_loss_names_esams_own_fix():
  # The benchmark study's loss shape: a batch, model statistics and a raw
  # dropout key. The automatic rule takes all three for examples; the
  # message names esam's own batch_argnames (not only Chunks').
  def loss(params, *, batch, model_state, key):
    del key
    return loss_fn(params, batch['x'], batch['y']) + 0 * jnp.sum(
        model_state['mean']), model_state

  kwargs = dict(batch={'x': X, 'y': Y}, model_state={'mean': jnp.zeros(5)},
                key=jax.random.PRNGKey(0))
  grads = jax.grad(lambda p: loss(p, **kwargs)[0])(PARAMS)
  tx = sam_optax.esam(loss, rho=RHO, gamma=0.5, has_aux=True)
  with pytest.raises(ValueError, match=r"\['key'\]\": 2.*of esam\(\.\.\.\)"):
    tx.update(grads, tx.init(PARAMS), PARAMS, **kwargs)
  tx = sam_optax.esam(loss, rho=RHO, gamma=0.5, has_aux=True,
                      batch_argnames=('batch',))
  named = tx.update(grads, tx.init(PARAMS), PARAMS, **kwargs)[0]
  plain = sam_optax.esam(lambda params, x, y: loss_fn(params, x, y), rho=RHO,
                         gamma=0.5)
  reference = plain.update(grads, plain.init(PARAMS), PARAMS, x=X, y=Y)[0]
  for a, b in zip(jax.tree.leaves(named), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('gamma', [0.0, -0.5, 1.5, 'half', True, None,
                                   optax.constant_schedule(0.5),
                                   float('nan')])
def test_bad_gamma_is_a_clear_error(gamma):
  with pytest.raises(ValueError, match=r'gamma must be a python number in'
                     r' \(0, 1\].*gamma=0.5'):
    sam_optax.esam(loss_fn, gamma=gamma)


def test_bad_batch_argnames_is_a_clear_error():
  with pytest.raises(ValueError, match='batch_argnames must be a tuple'):
    sam_optax.esam(loss_fn, gamma=0.5, batch_argnames='x')


def test_a_nan_sharpness_makes_the_update_nan():
  # Example 0's loss is finite at w but NaN at w + eps (w - rho < c_0).
  def root_loss(params, c):
    return -jnp.mean(jnp.sqrt(params['w'] - c))

  params = {'w': jnp.asarray(1.0)}
  c = jnp.asarray([0.95, 0.0, 0.1, 0.2])
  grads = jax.grad(root_loss)(params, c)
  tx = sam_optax.esam(root_loss, rho=0.1, beta=1.0, gamma=0.5)
  state = tx.init(params)
  out, after = tx.update(grads, state, params, c=c)
  assert np.isfinite(float(grads['w']))
  # A NaN update, for optax.apply_if_finite; the step is skipped: the state
  # stays as it was (no NaN written into it).
  assert np.isnan(float(out['w']))
  chex.assert_trees_all_equal(after, state)
