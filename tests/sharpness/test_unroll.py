"""unroll= of the spectral helpers: unrolled loops equal the lax loops.

`sam_optax._src.sharpness.loops` unrolls the loops over curvature products
(fast convolutions on XLA:CPU); the results must not change beyond rounding,
and the automatic choice must unroll only convolutional models on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_optax
from sam_optax import sharpness
from sam_optax._src.sharpness import loops

# An artifact test: deselected by default, run by `-m slow` (and CI).
pytestmark = pytest.mark.slow


def _mlp():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {'w1': jax.random.normal(k1, (5, 6)) / 2, 'b1': jnp.zeros(6),
            'w2': jax.random.normal(k2, (6, 3)) / 2}
  batch = {'x': jax.random.normal(k3, (8, 5)), 'y': jnp.arange(8) % 3}

  def loss(p, batch):
    h = jnp.tanh(batch['x'] @ p['w1'] + p['b1'])
    logits = h @ p['w2']
    return -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(logits), batch['y'][:, None], 1))

  return loss, params, batch


def _cnn():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
  params = {'conv1': jax.random.normal(k1, (3, 1, 2)) / 2,
            'conv2': jax.random.normal(k2, (3, 2, 2)) / 2,
            'dense': jax.random.normal(k3, (12, 3)) / 3}
  batch = {'x': jax.random.normal(k4, (4, 6)), 'y': jnp.arange(4) % 3}

  def loss(p, batch):
    h = batch['x'][..., None]
    for name in ('conv1', 'conv2'):
      h = jnp.tanh(jax.lax.conv_general_dilated(
          h, p[name], (1,), 'SAME', dimension_numbers=('NWC', 'WIO', 'NWC')))
    logits = h.reshape(h.shape[0], -1) @ p['dense']
    return -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(logits), batch['y'][:, None], 1))

  return loss, params, batch


MODELS = {'mlp': _mlp, 'cnn': _cnn}


def _helpers(loss, batch):
  kw = {'loss_kwargs': {'batch': batch}}
  return {
      'top': lambda p, u: sharpness.hessian_top_eigenvalue(
          loss, p, num_iterations=6, tolerance=1e-3, unroll=u, **kw),
      'eigenvalues': lambda p, u: sharpness.hessian_eigenvalues(
          loss, p, k=2, num_iterations=4, unroll=u, **kw),
      'hutchinson': lambda p, u: sharpness.hessian_trace(
          loss, p, num_samples=4, unroll=u, **kw),
      'hutch++': lambda p, u: sharpness.hessian_trace(
          loss, p, num_samples=6, method='hutch++', unroll=u, **kw),
      'density': lambda p, u: sharpness.hessian_spectral_density(
          loss, p, num_lanczos=3, num_probes=2, grid_size=16, unroll=u, **kw),
  }


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-4)
    else:
      np.testing.assert_array_equal(x, y)


def _in_loops(fn, *args):
  """The primitives inside a loop body (while, scan not fully unrolled)."""
  found = set()

  def walk(jaxpr, looped):
    for eqn in jaxpr.eqns:
      if looped:
        found.add(eqn.primitive.name)
      inner = looped or eqn.primitive.name == 'while' or (
          eqn.primitive.name == 'scan'
          and eqn.params['unroll'] < eqn.params['length'])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub, inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr, False)
  return found


# On the CNN only: the loops are the same code for every model, and the
# CNN is the model whose default unrolls.
@pytest.mark.parametrize('model', ['cnn'])
def test_unrolled_equals_loops(model):
  loss, params, batch = MODELS[model]()
  for name, helper in _helpers(loss, batch).items():
    looped = jax.jit(lambda p, h=helper: h(p, False))(params)
    unrolled = jax.jit(lambda p, h=helper: h(p, True))(params)
    try:
      _close(looped, unrolled)
    except AssertionError as e:
      raise AssertionError(f'{model} {name}') from e


@pytest.mark.parametrize('model', sorted(MODELS))
def test_unrolled_power_iteration_reports_the_stop(model):
  base, params, batch = MODELS[model]()
  # A dominant rank-one term, so power iteration stops within a few steps.
  leaf = sorted(params)[0]
  loss = lambda p, batch: base(p, batch) + 5.0 * jnp.sum(p[leaf]) ** 2
  kw = dict(loss_kwargs={'batch': batch}, num_iterations=15, tolerance=1e-3)
  looped = sharpness.hessian_top_eigenvalue(loss, params, unroll=False, **kw)
  unrolled = sharpness.hessian_top_eigenvalue(loss, params, unroll=True, **kw)
  assert bool(looped.converged) and bool(unrolled.converged)
  assert 1 < int(looped.num_iterations) < 15
  assert int(unrolled.num_iterations) == int(looped.num_iterations)
  np.testing.assert_allclose(unrolled.eigenvalue, looped.eigenvalue,
                             rtol=1e-4)
  # Unconverged (tolerance 0): every step runs, then the +-mu split.
  kw['tolerance'] = 0.0
  kw['num_iterations'] = 4
  looped = sharpness.hessian_top_eigenvalue(base, params, unroll=False, **kw)
  unrolled = sharpness.hessian_top_eigenvalue(base, params, unroll=True, **kw)
  assert int(looped.num_iterations) == int(unrolled.num_iterations) == 4
  assert bool(looped.converged) == bool(unrolled.converged)
  _close(looped, unrolled)


def test_automatic_choice():
  on_cpu = jax.default_backend() == 'cpu'
  for model, want in (('cnn', on_cpu), ('mlp', False)):
    loss, params, batch = MODELS[model]()
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    matvec = lambda x: jax.flatten_util.ravel_pytree(
        sharpness.hessian_vector_product(
            loss, params, unravel(x), loss_kwargs={'batch': batch}))[0]
    assert loops.resolve(None, matvec, flat.size) is want, model
    assert loops.resolve(True, matvec, flat.size) is True
    assert loops.resolve(False, matvec, flat.size) is False
    assert loops.has_convolution(matvec, flat) is (model == 'cnn')


def test_default_unrolls_the_cnn_only():
  """The default's choice, seen in the traced program (also under jit)."""
  on_cpu = jax.default_backend() == 'cpu'
  for model in ('cnn', 'mlp'):
    loss, params, batch = MODELS[model]()
    helper = lambda p: sharpness.hessian_trace(
        loss, p, num_samples=3, loss_kwargs={'batch': batch})
    unrolled = model == 'cnn' and on_cpu
    product = 'conv_general_dilated' if model == 'cnn' else 'dot_general'
    assert (product not in _in_loops(helper, params)) is unrolled, model
    # batches=: the convolution sits inside the objective's scan; unrolled,
    # that scan is unrolled too.
    helper = jax.jit(lambda p: sharpness.hessian_top_eigenvalue(
        loss, p, num_iterations=3,
        batches=[{'batch': batch}, {'batch': batch}]))
    assert (product not in _in_loops(helper, params)) is unrolled, model
    # layout=Chunks(m, shared=True): the chunk scan is unrolled too.
    helper = lambda p: sharpness.hessian_trace(
        loss, p, num_samples=3, loss_kwargs={'batch': batch},
        layout=sam_optax.Chunks(2, shared=True))
    assert (product not in _in_loops(helper, params)) is unrolled, model
    # unroll=False keeps the loops.
    helper = lambda p: sharpness.hessian_trace(
        loss, p, num_samples=3, loss_kwargs={'batch': batch}, unroll=False)
    assert product in _in_loops(helper, params), model


def test_bad_unroll():
  loss, params, batch = _mlp()
  kw = {'loss_kwargs': {'batch': batch}}
  for bad in (1, 'yes', 0.0):
    with pytest.raises(TypeError, match='unroll'):
      sharpness.hessian_top_eigenvalue(loss, params, unroll=bad, **kw)
    with pytest.raises(TypeError, match='unroll'):
      sharpness.hessian_eigenvalues(loss, params, 1, num_iterations=2,
                                    unroll=bad, **kw)
    with pytest.raises(TypeError, match='unroll'):
      sharpness.hessian_trace(loss, params, unroll=bad, **kw)
    with pytest.raises(TypeError, match='unroll'):
      sharpness.hessian_spectral_density(loss, params, unroll=bad, **kw)
  with pytest.raises(TypeError, match='unroll'):
    loops.check_unroll('f', 1)


def test_unroll_with_select():
  """blocks.selectable passes unroll through to the helper."""
  loss, params, batch = _cnn()
  kw = dict(loss_kwargs={'batch': batch}, num_samples=3,
            select=lambda path, leaf: 'conv' in jax.tree_util.keystr(path))
  a = sharpness.hessian_trace(loss, params, unroll=False, **kw)
  b = sharpness.hessian_trace(loss, params, unroll=True, **kw)
  _close(a, b)
