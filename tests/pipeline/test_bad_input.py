"""Bad input gets an early error that names the fix, or is carried through.

Each test failed on sam_optax 0.2: a silent wrong result (an empty SAM-ON
mask, a restored state of other shapes broadcast, a per-example argument
left out of ``batch_argnames``) or a crash that advised nothing useful.
Most errors are raised while ``update`` is traced, before any compute, so
the tests cover every variant of the battery at little cost.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from variants import VARIANTS

ids = [v.name for v in VARIANTS]
each_variant = pytest.mark.parametrize('variant', VARIANTS, ids=ids)

_rng = np.random.default_rng(7)
X = jnp.asarray(_rng.normal(size=(4, 3)), jnp.float32)
Y = jnp.asarray(_rng.normal(size=(4,)), jnp.float32)
PARAMS = {'w': jnp.asarray([0.5, -1.0, 0.25]), 'b': jnp.float32(0.1)}
OTHER_MODEL = {'w': jnp.asarray([0.5]), 'b': jnp.float32(0.1)}


def loss_fn(params, x, y):
  return jnp.mean((jnp.tanh(x @ params['w']) + params['b'] - y) ** 2)


def batch_loss(params, batch):
  return loss_fn(params, batch['x'], batch['y'])


@functools.cache
def grads():
  return jax.grad(loss_fn)(PARAMS, X, Y)


def complete_optimizers():
  """The complete optimizers, outside the battery's table."""
  return {
      'bsam': lambda loss: sam_optax.bsam(loss, 0.1, num_data=16),
      'decoupled_wsam': lambda loss: sam_optax.decoupled_wsam(
          loss, optax.sgd(0.1), learning_rate=0.1),
  }


ALL = {v.name: functools.partial(v.make, rho=0.05) for v in VARIANTS}
ALL.update({'msam': lambda loss: sam_optax.msam(loss, rho=0.05)})
ALL.update(complete_optimizers())


# --- SAM-ON's mask ----------------------------------------------------------


def test_normalization_mask_that_selects_nothing_is_an_error():
  with pytest.raises(ValueError, match=r"no parameter is a normalization.*"
                     r"looked at the leaves \['b'\], \['w'\]"):
    sam_optax.normalization_mask(PARAMS)
  tx = sam_optax.sam(loss_fn, perturbation_mask=sam_optax.normalization_mask)
  with pytest.raises(ValueError, match='SAM-ON would perturb nothing'):
    tx.update(grads(), tx.init(PARAMS), PARAMS, x=X, y=Y)


class _ListModel(eqx.Module):
  layers: list
  head: tuple

  def __init__(self, key):
    one, two = jax.random.split(key)
    self.layers = [eqx.nn.Linear(3, 3, key=one), eqx.nn.LayerNorm(3)]
    self.head = (eqx.nn.RMSNorm(3), eqx.nn.Linear(3, 1, key=two))


def test_equinox_norm_layers_in_lists_and_tuples_are_selected():
  model = eqx.filter(_ListModel(jax.random.key(0)), eqx.is_array)
  mask = sam_optax.normalization_mask(model)
  assert jax.tree.leaves(mask.layers[0]) == [False, False]
  assert jax.tree.leaves(mask.layers[1]) == [True, True]  # weight, bias
  assert jax.tree.leaves(mask.head[0]) == [True] * len(
      jax.tree.leaves(model.head[0]))  # RMSNorm's weight (and bias)
  assert jax.tree.leaves(mask.head[1]) == [False, False]


# --- restored states --------------------------------------------------------

# The variants whose state holds a field like the params.
PARAMS_LIKE_STATE = {'friendly_sam': 'momentum', 'vasso': 'direction',
                     'looksam': 'g_v', 'msam': 'momentum',
                     'bsam': 'momentum', 'decoupled_wsam': 'wsam.sharpness'}


@pytest.mark.parametrize('name', sorted(PARAMS_LIKE_STATE))
def test_restored_state_of_another_model_is_an_error(name):
  tx = ALL[name](loss_fn)
  field = PARAMS_LIKE_STATE[name].replace('.', r'\.')
  with pytest.raises(ValueError, match=rf"state\.{field}\['w'\] has shape"
                     r' \(1,\), but init\(params\) gives \(3,\)'):
    tx.update(grads(), tx.init(OTHER_MODEL), PARAMS, x=X, y=Y)


@pytest.mark.parametrize('name', sorted(ALL))
def test_restored_state_of_another_optimizer_is_an_error(name):
  tx = ALL[name](loss_fn)
  other = 'msam' if name != 'msam' else 'friendly_sam'
  state = ALL[other](loss_fn).init(PARAMS)
  with pytest.raises(ValueError, match=r'the state is a \w+State, but this'
                     r" optimizer's state is a \w+State.*tx\.init\(params\)"):
    tx.update(grads(), state, PARAMS, x=X, y=Y)


def test_state_of_another_tree_structure_names_the_field():
  tx = sam_optax.msam(loss_fn)
  state = tx.init(PARAMS)
  state = state._replace(momentum={'w': state.momentum['w']})
  with pytest.raises(ValueError, match="field 'momentum' of the state"):
    tx.update(grads(), state, PARAMS, x=X, y=Y)


# --- Chunks: per-example and shared arguments --------------------------------


def table_loss(params, x, y, table):
  return loss_fn(params, x, y) + 0.1 * jnp.mean(table @ params['w'])


TABLE = jnp.asarray(_rng.normal(size=(4, 3)), jnp.float32)  # 4 rows = batch


def test_an_unnamed_argument_with_the_batch_size_is_an_error():
  tx = sam_optax.sam(table_loss, layout=sam_optax.Chunks(
      2, batch_argnames=('x',)))
  with pytest.raises(ValueError, match=r"'y' is not in batch_argnames=\('x',"
                     r"\).*batch size 4.*batch_argnames=\('x', 'y'\)"):
    tx.update(grads(), tx.init(PARAMS), PARAMS, x=X, y=Y, table=TABLE)
  tx = sam_optax.sam(table_loss, layout=sam_optax.Chunks(
      2, batch_argnames=('x', 'y')))
  with pytest.raises(ValueError, match=r"'table'.*shared_argnames=\('table',"):
    tx.update(grads(), tx.init(PARAMS), PARAMS, x=X, y=Y, table=TABLE)


@pytest.mark.parametrize('names', [('x', 'y'), None])
def test_shared_argnames_go_whole_to_every_chunk(names):
  layout = sam_optax.Chunks(2, batch_argnames=names,
                            shared_argnames=('table',))
  tx = sam_optax.sam(table_loss, layout=layout)
  out, _ = tx.update(grads(), tx.init(PARAMS), PARAMS, x=X, y=Y, table=TABLE)
  # Reference: the table closed over in the loss, never seen by the layout.
  closed = lambda p, x, y: table_loss(p, x, y, TABLE)
  ref = sam_optax.sam(closed, layout=sam_optax.Chunks(2))
  want, _ = ref.update(grads(), ref.init(PARAMS), PARAMS, x=X, y=Y)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert repr(layout).endswith("shared_argnames=('table',))")


def test_a_name_both_per_example_and_shared_is_an_error():
  with pytest.raises(ValueError, match=r"\['x'\] are named both"):
    sam_optax.Chunks(2, batch_argnames=('x', 'y'), shared_argnames=('x',))
  with pytest.raises(TypeError, match='shared_argnames must be a tuple'):
    sam_optax.Chunks(2, shared_argnames=(3,))


def key_loss(params, x, y, key):
  return loss_fn(params, x, y) + 0.0 * jax.random.uniform(key)


@pytest.mark.parametrize('make', [
    lambda: sam_optax.sam(key_loss, layout=sam_optax.Chunks(1)),
    lambda: sam_optax.esam(key_loss, gamma=0.5)], ids=['chunks', 'esam'])
def test_a_raw_key_in_a_batch_of_two_is_not_split(make):
  tx = make()
  g = jax.grad(loss_fn)(PARAMS, X[:2], Y[:2])
  with pytest.raises(ValueError, match=r"\['key'\] looks like a raw PRNG key"
                     r'.*jax\.random\.key'):
    tx.update(g, tx.init(PARAMS), PARAMS, x=X[:2], y=Y[:2],
              key=jax.random.PRNGKey(0))


@pytest.mark.parametrize('make', [
    lambda: sam_optax.sam(loss_fn, layout=sam_optax.Chunks(1)),
    lambda: sam_optax.esam(loss_fn, gamma=0.5)], ids=['chunks', 'esam'])
def test_an_empty_batch_is_an_error(make):
  tx = make()
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  with pytest.raises(ValueError, match='the batch is empty'):
    tx.update(zeros, tx.init(PARAMS), PARAMS, x=X[:0], y=Y[:0])


# --- errors at the first update, every variant ------------------------------


@each_variant
def test_an_unbound_per_device_axis_says_where_to_call_update(variant):
  tx = variant.make(loss_fn, rho=0.05, layout=sam_optax.PerDevice('batch'))
  with pytest.raises(ValueError, match=r"axis 'batch', but no such axis is"
                     r' bound here.*inside pmap'):
    tx.update(grads(), tx.init(PARAMS), PARAMS, x=X, y=Y)


@pytest.mark.parametrize('name', sorted(ALL))
def test_a_missing_loss_keyword_says_how_to_pass_it(name):
  tx = ALL[name](batch_loss)
  with pytest.raises(TypeError, match=r"needs the keyword argument\(s\)"
                     r" \['batch'\].*tx\.update\(grads, opt_state, params,"
                     r' batch=batch\)') as info:
    tx.update(grads(), tx.init(PARAMS), PARAMS)  # a generic optax loop
  assert isinstance(info.value.__cause__, TypeError)  # the original, chained


def test_a_loss_keyword_named_state_or_positional_only_fails_at_build():
  def with_state(params, x, y, state):
    del state
    return loss_fn(params, x, y)

  def positional(params, x, y, /):
    return loss_fn(params, x, y)

  for make in ALL.values():
    with pytest.raises(TypeError, match="named 'state'.*model_state"):
      make(with_state)
    with pytest.raises(TypeError, match=r"takes \['x', 'y'\] positionally"
                       r' only.*lambda params, x, y: loss_fn\(params, x, y\)'):
      make(positional)


@each_variant
def test_a_python_float_parameter_names_the_leaf(variant):
  params = {'w': PARAMS['w'], 'b': 0.1}
  tx = variant.make(loss_fn, rho=0.05)
  message = (r"parameter \['b'\] is a Python float.*jax\.tree\.map\("
             r'jnp\.asarray, params\)')
  with pytest.raises(TypeError, match=message):
    tx.init(params)
  with pytest.raises(TypeError, match=message):
    tx.update(grads(), tx.init(PARAMS), params, x=X, y=Y)


def _value_mask(params):
  return jax.tree.map(lambda x: jnp.any(x != 0), params)


def _entry_mask(params):
  return jax.tree.map(lambda x: x > 0, params)


def test_a_mask_of_traced_values_under_jit_says_what_a_mask_is():
  tx = sam_optax.sam(loss_fn, perturbation_mask=_value_mask)
  with pytest.raises(TypeError, match=r"traced value for \['b'\].*cannot"
                     r" depend on the parameters' values"):
    jax.jit(lambda g, s, p: tx.update(g, s, p, x=X, y=Y))(
        grads(), tx.init(PARAMS), PARAMS)


def test_a_mask_per_entry_says_a_mask_is_per_leaf():
  tx = sam_optax.sam(loss_fn, perturbation_mask=_entry_mask)
  with pytest.raises(TypeError, match=r"array of shape \(3,\) for \['w'\]"
                     r'.*one bool per parameter leaf'):
    tx.update(grads(), tx.init(PARAMS), PARAMS, x=X, y=Y)


def test_a_mask_of_jnp_bools_says_to_return_python_bools_under_jit():
  mask = lambda p: jax.tree.map(lambda x: jnp.asarray(jnp.ndim(x) > 0), p)
  tx = sam_optax.sam(loss_fn, perturbation_mask=mask)
  with pytest.raises(TypeError, match=r'traced \(even jnp\.asarray\(True\)\)'
                     r'.*Return Python bools'):
    jax.jit(lambda g, s, p: tx.update(g, s, p, x=X, y=Y))(
        grads(), tx.init(PARAMS), PARAMS)
  # Outside jit the same jnp bools are concrete: the mask {w: on, b: off}.
  out, _ = tx.update(grads(), tx.init(PARAMS), PARAMS, x=X, y=Y)
  ref = sam_optax.sam(loss_fn, perturbation_mask={'w': True, 'b': False})
  want, _ = ref.update(grads(), ref.init(PARAMS), PARAMS, x=X, y=Y)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# --- integer and bool leaves: carried through, as optax does -----------------

# 'z_step' sorts last, so the float leaves keep their leaf indices (a
# variant that draws per leaf draws the same numbers with and without it).
WITH_COUNTER = dict(PARAMS, z_step=jnp.asarray(7, jnp.int32),
                    z_flag=jnp.asarray(True))


def counter_loss(params, x, y):
  return loss_fn(params, x, y) + 0.0 * params['z_step']


def test_optax_carries_an_integer_gradient_through():
  """What we copy: optax.sgd leaves an int leaf with an int gradient as is."""
  tx = optax.sgd(0.1, momentum=0.9)
  g = dict(grads(), z_step=jnp.asarray(0, jnp.int32),
           z_flag=jnp.asarray(False))
  out, _ = tx.update(g, tx.init(WITH_COUNTER), WITH_COUNTER)
  new = optax.apply_updates(WITH_COUNTER, out)
  assert int(new['z_step']) == 7 and bool(new['z_flag'])


@pytest.mark.parametrize('name', sorted(n for n in ALL if n != 'bsam'))
def test_integer_leaves_are_carried_through_untouched(name):
  g = dict(grads(), z_step=jnp.asarray(0, jnp.int32),
           z_flag=jnp.asarray(False))
  tx = ALL[name](counter_loss)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, x=X, y=Y))
  out, state = step(g, tx.init(WITH_COUNTER), WITH_COUNTER)
  out, _ = step(g, state, WITH_COUNTER)  # second step: states in use
  new = optax.apply_updates(WITH_COUNTER, out)
  assert new['z_step'].dtype == jnp.int32 and int(new['z_step']) == 7
  assert new['z_flag'].dtype == jnp.bool_ and bool(new['z_flag'])
  if name != 'decoupled_wsam':  # a transformation hands the gradient on
    assert out['z_step'].dtype == jnp.int32 and int(out['z_step']) == 0
  # Reference: the same variant on the float leaves alone (no counter).
  ref = ALL[name](loss_fn)
  ref_step = jax.jit(lambda g, s, p: ref.update(g, s, p, x=X, y=Y))
  want, ref_state = ref_step(grads(), ref.init(PARAMS), PARAMS)
  want, _ = ref_step(grads(), ref_state, PARAMS)
  for leaf in PARAMS:
    np.testing.assert_allclose(out[leaf], want[leaf], rtol=1e-5, atol=1e-7)


def test_a_float0_gradient_says_how_to_make_it_an_integer_zero():
  g = jax.grad(counter_loss, allow_int=True)(WITH_COUNTER, X, Y)
  tx = sam_optax.sam(counter_loss)
  with pytest.raises(TypeError, match=r"gradient of parameter \['z_flag'\]"
                     r' has dtype float0.*jnp\.zeros_like\(p\)'):
    tx.update(g, tx.init(WITH_COUNTER), WITH_COUNTER, x=X, y=Y)
