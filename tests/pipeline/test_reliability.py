"""Silent failures made loud, in the transformations (the reliability issue).

Each test here failed on sam_optax 0.1: a wrong result, a silent fall-back,
or a crash that explained nothing. The checks every variant runs (state
dtypes, complex params, bad traced hyperparameters, derivatives at a zero
gradient) are rows of the battery, variants/test_battery.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

_rng = np.random.default_rng(3)
X = jnp.asarray(_rng.normal(size=(16, 3)), jnp.float32)
Y = jnp.asarray(_rng.normal(size=(16,)), jnp.float32)
PARAMS = {'w': jnp.asarray([0.5, -1.0, 0.25]), 'b': jnp.float32(0.1)}


def loss_fn(params, x, y):
  return jnp.mean((jnp.tanh(x @ params['w']) + params['b'] - y) ** 2)


def test_xsam_probe_with_nan_losses_skips_the_step_and_keeps_alpha():
  def loss(params, x, y, poison):
    return loss_fn(params, x, y) + poison

  tx = sam_optax.xsam(loss, rho=0.1, rho_max=0.1, probe_every=1, alpha=1.3)
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  state = tx.init(PARAMS)
  _, state = tx.update(grads, state, PARAMS, x=X, y=Y, poison=0.0)
  out, after = tx.update(grads, state, PARAMS, x=X, y=Y, poison=jnp.nan)
  # The failed probe is a skipped step: the update is non-finite (for
  # optax.apply_if_finite) and the whole state is kept, alpha and the last
  # good probe's losses included -- never alpha = 0.
  assert not bool(jnp.all(jnp.isfinite(out['w'])))
  chex.assert_trees_all_equal(after, state)


def test_other_extra_args_in_the_chain_are_not_forwarded():
  plateau = optax.chain(sam_optax.sam(loss_fn, rho=0.05), optax.sgd(0.1),
                        optax.contrib.reduce_on_plateau())
  plain = optax.chain(sam_optax.sam(loss_fn, rho=0.05), optax.sgd(0.1))
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  value = loss_fn(PARAMS, X, Y)
  got, _ = plateau.update(grads, plateau.init(PARAMS), PARAMS, x=X, y=Y,
                          value=value)
  want, _ = plain.update(grads, plain.init(PARAMS), PARAMS, x=X, y=Y)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # A loss that takes **kwargs gets everything, value included.
  seen = {}

  def greedy(params, **kwargs):
    seen.update(kwargs)
    return loss_fn(params, kwargs['x'], kwargs['y'])

  tx = sam_optax.sam(greedy, rho=0.05)
  tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y, value=value)
  assert set(seen) == {'x', 'y', 'value'}


def test_groups_that_do_not_cover_the_axis_are_a_clear_error():
  tx = sam_optax.sam(loss_fn, rho=0.05, layout=sam_optax.PerDevice(
      'i', sync=True, groups=[[0, 1], [2, 3]]))

  def step(x, y):
    grads = jax.grad(loss_fn)(PARAMS, x, y)
    return tx.update(grads, tx.init(PARAMS), PARAMS, x=x, y=y)[0]

  with pytest.raises(ValueError, match=r'cover 4 devices.*has 8'):
    jax.pmap(step, axis_name='i')(X.reshape(8, 2, 3), Y.reshape(8, 2))


def test_asam_mask_as_an_optax_style_function():
  only_w = lambda params: {'w': True, 'b': False}
  by_path = lambda path, leaf: path[0].key == 'w'
  tree = {'w': True, 'b': False}
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  outs = []
  for mask in (only_w, by_path, tree):
    tx = sam_optax.asam(loss_fn, rho=0.5, adaptive_mask=mask)
    outs.append(tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y)[0])
  for out in outs[1:]:
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(outs[0])):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  # Independent: b exempt means T = 1 there, T = |w| + eta on w.
  eta = 0.01
  t = {'w': jnp.abs(PARAMS['w']) + eta, 'b': jnp.ones([])}
  tg = jax.tree.map(lambda a, g: a * g, t, grads)
  norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(tg)))
  point = jax.tree.map(lambda p, a, v: p + 0.5 * a * v / norm, PARAMS, t, tg)
  want = jax.grad(loss_fn)(point, X, Y)
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_batch_argnames_keep_a_lookup_table_whole():
  table = jnp.linspace(0.5, 1.5, 16)  # as long as the batch, not per-example

  def loss(params, x, y, table):
    return loss_fn(params, x, y) * jnp.mean(table)

  tx = sam_optax.sam(loss, rho=0.1, layout=sam_optax.Chunks(
      8, batch_argnames=('x', 'y'), shared_argnames=('table',)))
  grads = jax.grad(loss)(PARAMS, X, Y, table)
  out, _ = tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y, table=table)
  # Reference: each chunk of 8 examples with the whole table.
  single = sam_optax.sam(loss, rho=0.1)
  want = [single.update(jax.grad(loss)(PARAMS, X[i:i + 8], Y[i:i + 8], table),
                        single.init(PARAMS), PARAMS, x=X[i:i + 8],
                        y=Y[i:i + 8], table=table)[0] for i in (0, 8)]
  for a, b, c in zip(*map(jax.tree.leaves, (out, *want))):
    np.testing.assert_allclose(a, (b + c) / 2, rtol=1e-5, atol=1e-7)
  # Without names the table is split too, and the mismatch says how to fix.
  tx = sam_optax.sam(loss, rho=0.1, layout=sam_optax.Chunks(8))
  bad = jnp.ones(5)
  with pytest.raises(ValueError, match='batch_argnames'):
    tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y, table=bad)
  with pytest.raises(ValueError, match="names \\['z'\\]"):
    sam_optax.sam(loss, rho=0.1, layout=sam_optax.Chunks(
        8, batch_argnames=('z',))).update(grads, tx.init(PARAMS), PARAMS,
                                           x=X, y=Y, table=table)


def test_recommended_order_in_the_chain():
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  sam = sam_optax.sam(loss_fn, rho=0.05)
  g1, _ = sam.update(grads, sam.init(PARAMS), PARAMS, x=X, y=Y)
  norm = float(optax.global_norm(g1))
  # sam first, then clipping: the clip acts on the gradient at w + eps.
  tx = optax.chain(sam_optax.sam(loss_fn, rho=0.05),
                   optax.clip_by_global_norm(norm / 2), optax.sgd(1.0))
  out, _ = tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y)
  np.testing.assert_allclose(float(optax.global_norm(out)), norm / 2,
                             rtol=1e-5)
  # apply_if_finite around what follows sam skips a NaN of the perturbed pass.
  nan_at_eps = lambda p, x, y: loss_fn(p, x, y) + jnp.where(
      p['b'] != PARAMS['b'], jnp.nan * p['b'], 0.0)
  tx = optax.chain(sam_optax.sam(nan_at_eps, rho=0.05),
                   optax.apply_if_finite(optax.sgd(1.0), 3))
  out, state = tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(out))
  assert int(state[1].notfinite_count) == 1


def test_messages_for_common_mistakes():
  grads = jax.grad(loss_fn)(PARAMS, X, Y)
  returns_grads = jax.grad(loss_fn)  # passed by mistake: returns a dict
  tx = sam_optax.sam(returns_grads, rho=0.05)
  with pytest.raises(TypeError, match='scalar.*returned a dict'):
    tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=Y)
  # optax.inject_hyperparams hands the factory an array for loss_fn.
  with pytest.raises(TypeError, match='sam_optax.inject_hyperparams'):
    sam_optax.sam(jnp.asarray(0.0), rho=0.05)
