"""sam_optax inside the tools people use: Flax NNX and Linen, optax wrappers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sam_optax

RHO, LR = 0.2, 0.1
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(16, 3)), jnp.float32)
Y = jnp.asarray(_rng.normal(size=(16, 2)), jnp.float32)


def tree_allclose(a, b, **kw):
  return all(
      np.allclose(x, y, **kw) for x, y in zip(jax.tree.leaves(a),
                                               jax.tree.leaves(b))
  )


# --- hand-written linear least squares, gradient by hand -------------------


def lsq_loss(params, x, y):
  return 0.5 * jnp.mean(jnp.sum((x @ params['kernel'] + params['bias'] - y)**2,
                                -1))


def lsq_grad(params, x, y):
  r = (x @ params['kernel'] + params['bias'] - y) / len(x)
  return {'kernel': x.T @ r, 'bias': r.sum(0)}


def sam_reference(params, x, y, g0=None):
  g0 = lsq_grad(params, x, y) if g0 is None else g0
  norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g0)))
  point = jax.tree.map(lambda p, g: p + RHO * g / norm, params, g0)
  return lsq_grad(point, x, y)


def test_flax_nnx_optimizer_forwards_kwargs():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

  def loss_fn(params, x, y):
    return lsq_loss({'kernel': params['kernel'], 'bias': params['bias']}, x, y)

  start = {k: v[...] for k, v in nnx.state(model, nnx.Param).items()}
  tx = optax.chain(sam_optax.sam(loss_fn, rho=RHO), optax.sgd(LR))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: lsq_loss(
        {'kernel': m.kernel[...], 'bias': m.bias[...]}, x, y))(model)
    optimizer.update(model, grads, x=x, y=y)

  step(model, optimizer, X, Y)
  want = jax.tree.map(lambda p, g: p - LR * g, start,
                      sam_reference(start, X, Y))
  assert np.allclose(model.kernel[...], want['kernel'], atol=1e-6)
  assert np.allclose(model.bias[...], want['bias'], atol=1e-6)


class BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(2)(nn.relu(x))


def test_linen_batchnorm_statistics_come_from_the_clean_pass():
  model = BNNet()
  variables = model.init(jax.random.key(0), X, train=False)
  params, stats = variables['params'], variables['batch_stats']

  def loss_fn(params, batch_stats, x, y):
    out, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True,
        mutable=['batch_stats'])
    return jnp.mean((out - y) ** 2), updates['batch_stats']

  tx = optax.chain(sam_optax.sam(loss_fn, rho=RHO, has_aux=True),
                   optax.sgd(LR))
  state = tx.init(params)

  @jax.jit
  def train_step(params, stats, state, x, y):
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, x, y)
    updates, state = tx.update(grads, state, params, batch_stats=stats, x=x,
                               y=y)
    return optax.apply_updates(params, updates), new_stats, state

  new_params, new_stats, state = train_step(params, stats, state, X, Y)
  # Running statistics: those of the clean pass at w. The jitted step and the
  # eager apply are two compiled programs, so they agree to rounding (1e-5);
  # the perturbed pass's statistics, checked next, differ by ~1e-2.
  _, clean = model.apply({'params': params, 'batch_stats': stats}, X,
                         train=True, mutable=['batch_stats'])
  assert tree_allclose(new_stats, clean['batch_stats'], atol=1e-7, rtol=1e-5)
  # ... and not those of the perturbed pass at w + eps.
  g0 = jax.grad(lambda p: loss_fn(p, stats, X, Y)[0])(params)
  norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(g0)))
  perturbed = jax.tree.map(lambda p, g: p + RHO * g / norm, params, g0)
  _, dirty = model.apply({'params': perturbed, 'batch_stats': stats}, X,
                         train=True, mutable=['batch_stats'])
  assert not tree_allclose(new_stats, dirty['batch_stats'], atol=1e-4,
                          rtol=1e-4)
  # The update is the gradient at w + eps (with the same batch statistics).
  g = jax.grad(lambda p: loss_fn(p, stats, X, Y)[0])(perturbed)
  assert tree_allclose(new_params,
                       jax.tree.map(lambda p, g: p - LR * g, params, g),
                       atol=1e-6)


def test_weight_decay_in_the_chain_acts_on_clean_weights():
  params = {'kernel': jnp.ones((3, 2)), 'bias': jnp.full(2, 2.0)}
  decay = optax.masked(optax.add_decayed_weights(0.1),
                       {'kernel': True, 'bias': False})
  tx = optax.chain(sam_optax.sam(lsq_loss, rho=RHO), decay, optax.sgd(LR))
  g0 = lsq_grad(params, X, Y)
  updates, _ = tx.update(g0, tx.init(params), params, x=X, y=Y)
  g = sam_reference(params, X, Y)
  want = {'kernel': -LR * (g['kernel'] + 0.1 * params['kernel']),
          'bias': -LR * g['bias']}
  assert tree_allclose(updates, want, atol=1e-6)


def test_multisteps_runs_sam_on_the_mean_gradient_and_last_microbatch():
  """Documents exactly what SAM inside optax.MultiSteps computes.

  It is NOT SAM with gradient accumulation: the perturbation uses the mean of
  the micro-batch gradients, but the re-gradient at w + eps is evaluated only
  on the extra args of the last micro-batch (those of the update call that
  triggers the inner step).
  """
  params = {'kernel': jnp.ones((3, 2)) * 0.3, 'bias': jnp.zeros(2)}
  tx = optax.MultiSteps(
      optax.chain(sam_optax.sam(lsq_loss, rho=RHO), optax.sgd(LR)),
      every_k_schedule=2)
  state = tx.init(params)
  (x1, x2), (y1, y2) = jnp.split(X, 2), jnp.split(Y, 2)
  g1, g2 = lsq_grad(params, x1, y1), lsq_grad(params, x2, y2)
  update_1, state = tx.update(g1, state, params, x=x1, y=y1)
  assert all(np.all(u == 0) for u in jax.tree.leaves(update_1))
  update_2, state = tx.update(g2, state, params, x=x2, y=y2)
  g_mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want = jax.tree.map(lambda g: -LR * g,
                      sam_reference(params, x2, y2, g0=g_mean))
  assert tree_allclose(update_2, want, atol=1e-6)
  # Exact SAM on the accumulated batch would be different:
  full = jax.tree.map(lambda g: -LR * g, sam_reference(params, X, Y))
  assert not tree_allclose(update_2, full, atol=1e-4)
