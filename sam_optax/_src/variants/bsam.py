"""bSAM: Bayesian sharpness-aware minimization (Moellenhoff & Khan, 2023)."""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NamedTuple, Sequence, cast

import jax
import jax.core
import jax.numpy as jnp
import optax

from sam_optax._src.core import batching
from sam_optax._src.core import collectives
from sam_optax._src.core import inject
from sam_optax._src.core import mesh as mesh_lib
from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import layouts
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import complete

PyTree = Any
ScalarOrSchedule = validation.ScalarOrSchedule
_OWNER = 'bsam'


class BSAMState(NamedTuple):
  """State of `bsam`: the step count, the posterior's moments, the noise key.

  Attributes:
    count: number of updates so far (int32); schedules are evaluated on it.
    perturbed_loss: L(w + rho g / s) at the last update, float32.
    grad_norm: ||g||, the norm of the gradient at the noisy sample, float32.
    momentum: gm, the momentum of ``g_eps + delta w`` (float32, like params).
    precision: s, the posterior's precision per parameter (float32, like
      params; ``s_init`` before the first update).
    key: the raw PRNG key data (uint32) of the next noise sample.
    skipped_steps: the number of steps refused because a gradient, a loss
      or the update was not finite, or a traced hyperparameter was out of
      bounds (int32); such a step leaves every other field as it was (the
      key too: the next step draws the noise the refused one drew).
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  momentum: PyTree
  precision: PyTree
  key: jax.Array
  skipped_steps: jax.Array


def noise_like(key: jax.Array, params: PyTree) -> PyTree:
  """Standard normal noise like ``params`` (float32): leaf i uses
  ``jax.random.normal(jax.random.fold_in(key, i), shape)``."""
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      jax.random.normal(jax.random.fold_in(key, i), jnp.shape(p), jnp.float32)
      for i, p in enumerate(leaves)])


# Every hyperparameter's interval: a number is checked when bsam is built, a
# traced or scheduled value at every step (out of it, the step is skipped).
_BOUNDS = {
    'learning_rate': variant_lib.NONNEGATIVE,
    'rho': variant_lib.NONNEGATIVE,
    'num_data': variant_lib.POSITIVE,
    'beta1': variant_lib.BELOW_ONE,
    'beta2': variant_lib.BELOW_ONE,
    'prior_prec': variant_lib.NONNEGATIVE,
    'damping': variant_lib.NONNEGATIVE,
    's_init': variant_lib.POSITIVE,
}
_SCHEDULABLE = ('learning_rate', 'rho')
# A float16 gradient that overflows is taken again on the loss times this
# (a power of two, a normal float16), then divided back in float32.
_LOSS_SCALE = 2.0 ** -14


def _value(value, count):
  return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


def _is_static(value) -> bool:
  return not (callable(value) or isinstance(value, jax.core.Tracer))


def _check_static(name, value):
  """A number out of ``name``'s interval is an error; traced values pass."""
  bound = _BOUNDS[name]
  if name == 'num_data' and _is_static(value) and (
      isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not 0 < float(value) < float('inf')):
    raise ValueError(f'{_OWNER}: num_data must be a number > 0 (the size of'
                     f' the training set), got {value!r}.')
  validation.check_number(_OWNER, name, value,
                          allow_zero=not bound.low_open,
                          allow_schedule=name in _SCHEDULABLE)
  if _is_static(value) and not bound.holds(float(value)):
    raise ValueError(f'{_OWNER}: {name} must be < {bound.high} ({bound}),'
                     f' got {float(value):g}.')


def _check(hyperparams):
  for name, value in hyperparams.items():
    _check_static(name, value)


def _in_bounds(hyperparams) -> jax.Array:
  """Whether every value at this step (float32) lies in its interval."""
  return functools.reduce(jnp.logical_and, [
      _BOUNDS[name].holds(value) for name, value in hyperparams.items()])


def _as_float32(value):
  """A number stays a Python float (the authors' constants); else float32."""
  return float(value) if _is_static(value) else jnp.asarray(
      value, jnp.float32)


def _split_betas(betas):
  if not (isinstance(betas, Sequence) and len(betas) == 2):
    raise TypeError(f'{_OWNER}: betas must be a pair (beta1, beta2), got'
                    f' {betas!r}.')
  return tuple(betas)


def _has_float16(params) -> bool:
  return any(jnp.result_type(p) == jnp.float16
             for p in jax.tree.leaves(params))


def _value_and_grad(scalar_loss, float16: bool):
  """``(w, kw) -> (L, grad)``; float16 params: a float32 gradient.

  With float16 parameters the gradient at the ascent's point can exceed
  float16's range while the loss is finite: then it is taken again on the
  loss times 2^-14 and divided back in float32 (one more pass, only then).
  """
  plain = jax.value_and_grad(scalar_loss)
  if not float16:
    return plain

  def widened(w, kw):
    loss, grad = plain(w, kw)

    def rescaled():
      _, small = jax.value_and_grad(
          lambda p: scalar_loss(p, kw) * _LOSS_SCALE)(w)
      return jax.tree.map(
          lambda g: g.astype(jnp.float32) / _LOSS_SCALE, small)

    wide = jax.tree.map(lambda g: g.astype(jnp.float32), grad)
    overflowed = jnp.isfinite(jnp.asarray(loss, jnp.float32)) & (
        ~tree_math.all_finite(wide))
    return loss, jax.lax.cond(overflowed, rescaled, lambda: wide)

  return widened


class _Examples(NamedTuple):
  """What one perturbation sees: the gradient on its examples at a point."""

  grad: Callable[[PyTree], PyTree]
  value_and_grad: Callable[[PyTree], tuple[jax.Array, PyTree]]


def _on(value_and_grad, loss_kwargs, local) -> _Examples:
  """The loss on ``loss_kwargs``, differentiated at ``local(w)``."""
  return _Examples(
      grad=lambda w: value_and_grad(local(w), loss_kwargs)[1],
      value_and_grad=lambda w: value_and_grad(local(w), loss_kwargs))


def _accumulated(value_and_grad, loss_kwargs, chunks, local) -> _Examples:
  """``Chunks(m, shared=True)``: the mean over the chunks, one at a time."""
  split, mask, n = batching.split_into_chunks(
      _OWNER, loss_kwargs, chunks.m, chunks.batch_argnames,
      chunks.shared_argnames)

  def mean(f):
    return batching.over_chunks(lambda kw: (f(kw), None), split, mask, n,
                                chunks.mode)[0]

  return _Examples(
      grad=lambda w: mean(lambda kw: value_and_grad(local(w), kw)[1]),
      value_and_grad=lambda w: mean(lambda kw: value_and_grad(local(w), kw)))


def _group_step(params, precision, num_data, rho, sync, key, examples):
  """One perturbation: its noise, g, the ascent and g_eps.

  Returns ``(L(w + rho g / s), g_eps, sqrt(s g^2), ||g||)``: what the
  weights' and the precision's updates consume, averaged over groups.
  """
  noise = noise_like(key, params)
  noisy = jax.tree.map(
      lambda w, n, s: (w + jnp.sqrt(1.0 / (num_data * s)) * n).astype(
          w.dtype), params, noise, precision)
  grad = sync(examples.grad(noisy))
  perturbed = jax.tree.map(lambda w, g, s: (w + rho * g / s).astype(w.dtype),
                           params, grad, precision)
  loss, grad_eps = examples.value_and_grad(perturbed)
  scaled = jax.tree.map(
      lambda s, g: jnp.sqrt(s * jnp.square(g.astype(jnp.float32))),
      precision, grad)
  return loss, grad_eps, scaled, jnp.asarray(tree_math.tree_norm(grad),
                                             jnp.float32)


def _device_key(key, layout: layouts.PerDevice):
  """The key of this device's perturbation: its own, or its sync group's."""
  layouts.check_bound(_OWNER, layout)
  index = jax.lax.axis_index(layout.axis)
  if not layout.sync:
    return jax.random.fold_in(key, index)
  if layout.groups is None:
    return key  # one perturbation for the whole axis
  group_of = [0] * sum(len(g) for g in layout.groups)
  for number, group in enumerate(layout.groups):
    for device in group:
      group_of[device] = number
  return jax.random.fold_in(key, jnp.asarray(group_of, jnp.int32)[index])


def _over_groups(value_and_grad, layout, loss_kwargs, params, precision,
                 num_data, rho, key):
  """The group step over ``layout``'s groups, averaged over every group.

  The groups are those of the SAM pipeline (`groups.map_groups`): the batch,
  each chunk, each device (or each chunk of each device); only their noise
  keys are bSAM's own. Chunk i's key is ``fold_in(key, i)``, device d's
  ``fold_in(key, d)`` (its chunks fold again).
  """
  sync = local = lambda tree: tree  # one device: nothing to mark or sync
  chunks = layout
  if isinstance(layout, layouts.PerDevice):
    axes, chunks = layout.axes, layout.chunks
    key = _device_key(key, layout)
    # shard_map with check_vma: a gradient at replicated weights is summed
    # over the devices; take every gradient at weights marked varying.
    tracked = collectives.tracks_variance(loss_kwargs, axes)
    local = lambda w: collectives.make_local(w, axes, tracked)
    if layout.sync:
      if layout.groups is not None:
        collectives.check_groups(_OWNER, layout.axis, layout.groups)
      sync = lambda tree: collectives.mean(tree, axes, layout.groups)
  if chunks is not None and isinstance(chunks.mode, mesh_lib.MeshChunks):
    params, precision = chunks.mode.replicate((params, precision))
  step = lambda k, examples: _group_step(params, precision, num_data, rho,
                                         sync, k, examples)
  if chunks is None:
    result = step(key, _on(value_and_grad, loss_kwargs, local))
  elif chunks.shared:
    result = step(key, _accumulated(value_and_grad, loss_kwargs, chunks,
                                        local))
  else:
    split, mask, n = batching.split_into_chunks(
        _OWNER, loss_kwargs, chunks.m, chunks.batch_argnames,
        chunks.shared_argnames)
    keys = jax.random.key_data(jax.vmap(
        lambda i: jax.random.fold_in(key, i))(jnp.arange(n)))

    def one_chunk(chunk):
      examples = _on(value_and_grad, chunk['kwargs'], local)
      return step(jax.random.wrap_key_data(chunk['key']), examples), None

    result, _ = batching.over_chunks(
        one_chunk, {'kwargs': split, 'key': keys},
        {'kwargs': mask, 'key': True}, n, chunks.mode)
  if not isinstance(layout, layouts.PerDevice):
    return result
  loss, grad_eps, scaled, grad_norm = result
  if layout.sync and layout.groups is None:
    # g is the axis' own already: so are sqrt(s g^2) and ||g||.
    loss, grad_eps = collectives.mean((loss, grad_eps), layout.axes)
    return loss, grad_eps, scaled, grad_norm
  return collectives.mean(result, layout.axes)  # one all-reduce


@inject.record_annealable
def bsam(
    loss_fn: Callable[..., Any],
    learning_rate: ScalarOrSchedule,
    num_data: float,
    rho: ScalarOrSchedule = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    prior_prec: float = 1.0,
    damping: float = 0.1,
    s_init: float = 1.0,
    *,
    seed: int = 0,
    has_aux: bool = False,
    layout: layouts.Layout = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Bayesian SAM: SAM as a variational (Gaussian) posterior's optimizer.

  bSAM keeps a Gaussian posterior :math:`\mathcal N(w, \mathrm{diag}(1 /
  (N s)))` over the weights and, at every step (all operations
  elementwise, :math:`\delta` = ``prior_prec / num_data``):

  .. math::

    \begin{aligned}
    \theta &= w + \xi / \sqrt{N s}, \quad \xi \sim \mathcal N(0, I),
    \qquad g = \nabla L(\theta), \\
    g_\epsilon &= \nabla L(w + \rho\, g / s), \\
    m &\leftarrow \beta_1 m + (1 - \beta_1)(g_\epsilon + \delta w), \\
    w &\leftarrow w - \alpha\, m / s, \\
    s &\leftarrow \beta_2 s + (1 - \beta_2)(\sqrt{s\, g^2} + d + \delta),
    \end{aligned}

  with the old :math:`s` in the weight update and in the noise. The ascent
  is not normalized: :math:`\rho\, g / s` is SAM's step in the posterior's
  metric. :math:`L` is the mean loss over a minibatch, :math:`N` the size
  of the training set (the authors' ``Ndata``), :math:`d` the damping.

  It is a complete optimizer, like ``optax.adam``: use it alone (or after
  clipping), not behind another one. ``update`` evaluates both gradients
  itself (two forward-backward passes), so the incoming ``updates`` give
  only the structure: pass the clean gradient if you have it, or ``params``
  itself to save a pass. The keyword arguments of ``update`` that
  ``loss_fn`` accepts are forwarded to it. The noise comes from the state's
  key: ``key, sub = jax.random.split(key)`` each step, leaf i of
  :math:`\xi` drawn with ``jax.random.fold_in(sub, i)`` (`noise_like`).

  A step whose gradients, losses or update are not finite, or where a
  traced or scheduled hyperparameter is NaN or out of its interval (those
  of Args below), is skipped: a zero
  update, every state field as it was (the count and the key too, so
  training goes on as if the batch had not been there), and
  ``skipped_steps`` counts it.

  **As the authors' JAX code** (team-approx-bayes/bayesian-sam, ``optim.py``
  ``build_bsam_optimizer``, with their ``wdecay = priorprec / Ndata`` as
  :math:`\delta` and ``lrfactor`` as a schedule of ``learning_rate``).
  **pytorch-optimizer's ``BSAM`` differs** and is not followed: its noise
  has standard deviation, not variance, ``1 / (N s)``; it never restores the
  weights, so the perturbation and the noise stay in them; its momentum
  averages ``weight_decay * g`` instead of the gradient plus
  :math:`\delta w`; and it squares the precision's update.

  **Layouts** (``layout=``, as for every transformation of the library). A
  *group* is what gets one noise sample and one perturbation; for groups
  :math:`k = 1..K` with their own examples and noise :math:`\xi_k`, each
  takes its own :math:`g_k = \nabla L_k(\theta_k)` and
  :math:`g_{\epsilon,k} = \nabla L_k(w + \rho\, g_k / s)`, and the update
  above consumes the means

  .. math::

    g_\epsilon = \tfrac1K \textstyle\sum_k g_{\epsilon,k}, \qquad
    \sqrt{s\, g^2} \to \tfrac1K \textstyle\sum_k \sqrt{s\, g_k^2}.

  This is the authors' m-sharpness: their ``msharpness`` (``--batchsplit``,
  8 in their runs) reshapes the minibatch into that many sub-batches,
  ``jax.vmap`` gives each its own key from ``jax.random.split(rngkey,
  msharpness + 1)``, its own noisy sample, ``g``, ascent and ``g_eps``, and
  averages ``gs = sqrt(s g^2)`` (for the precision) and ``g_eps`` (for the
  momentum) over the sub-batches. They run on one device under ``jax.jit``
  (their m-sharpness "on one GPU"; ``train.py`` has no ``pmap``), so
  `PerDevice` applies the same rule with a device as a group. Here
  ``Chunks(m)`` counts examples per chunk (their batch of 200 in 8 splits
  is ``Chunks(25)``), and the keys differ: each step splits
  ``key, sub = jax.random.split(key)`` and

  * ``None``: one group, the whole batch, noise from ``sub``.
  * ``Chunks(m)``: chunk i of m examples draws its noise from
    ``fold_in(sub, i)``; ``mode='sequential'`` (``lax.scan``, memory of one
    chunk), ``'vectorized'`` (``vmap``, as the authors) or
    `sam_optax.mesh_chunks`. bSAM takes both its gradients on each chunk, so
    chunks cost no extra pass.
  * ``Chunks(m, shared=True)``: one group, noise from ``sub``; ``g``, ``g_eps``
    and the loss accumulated over the chunks (the full batch's, at the memory
    of one chunk).
  * ``PerDevice(axis)`` inside `jax.pmap` / `jax.shard_map`: device d draws
    its noise from ``fold_in(sub, d)`` (d = ``axis_index(axis)``) and takes
    its own ``g`` and ``g_eps`` on its examples; ``g_eps``,
    ``sqrt(s g^2)``, the loss and ``||g||`` are averaged over the axis in
    one all-reduce, so the state stays the same on every device.
    ``sync=True``: one noise sample (from ``sub``) on every device and ``g``
    averaged over the axis before the ascent (one more all-reduce): bSAM on
    the global batch; with ``groups=``, each group of devices draws from
    ``fold_in(sub, group number)`` and averages ``g`` inside the group.
    ``chunks=Chunks(m)`` splits each device's batch again (chunk i of device
    d: ``fold_in(fold_in(sub, d), i)``); ``chunks=Chunks(m, shared=True)``
    accumulates the device's gradients (and composes with ``sync``). Inside
    ``jax.shard_map`` every gradient is taken at weights marked varying over
    the axis; the incoming ``updates`` may be the replicated ``params``.

  ``perturbed_loss`` and ``grad_norm`` are the means over the groups of
  :math:`L_k(w + \rho g_k / s)` and :math:`\|g_k\|`. Only the noise keys and
  the averaged quantities are bSAM's own; the splitting into chunks and the
  device averaging are the library's (`sam_optax.Chunks`,
  `sam_optax.PerDevice`).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]),
    ...          'y': jnp.array([1.0, -1.0])}
    >>> tx = sam_optax.bsam(loss_fn, learning_rate=0.1, num_data=1000,
    ...                     rho=0.01)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params, batch=batch)
    >>> params = optax.apply_updates(params, updates)
    >>> print(state.precision['w'].shape, state.count)
    (3,) 1

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning the mean loss over
      the minibatch, or ``(loss, aux)`` with ``has_aux=True`` (aux dropped).
    learning_rate: the step size (the paper's alpha), a number or a schedule.
    num_data: N, the number of training examples (the posterior's scale).
    rho: the ascent's scale, a number >= 0 or a schedule.
    betas: (beta1, beta2), the momentum's and the precision's decays, in
      [0, 1).
    prior_prec: the Gaussian prior's precision; ``prior_prec / num_data``
      acts as weight decay and in the precision (the authors' default 25).
    damping: added to the precision's update (the authors' default 0.1).
    s_init: the initial precision, > 0.
    seed: the seed of the noise's PRNG key.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    layout: ``None`` (one device, the whole batch, one noise sample), a
      `sam_optax.Chunks` or a `sam_optax.PerDevice` (see Layouts above).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `BSAMState`.

  References:
    Moellenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  validation.check_loss_fn(_OWNER, loss_fn)
  beta1, beta2 = _split_betas(betas)
  hyperparams = dict(learning_rate=learning_rate, rho=rho, num_data=num_data,
                     beta1=beta1, beta2=beta2, prior_prec=prior_prec,
                     damping=damping, s_init=s_init)
  _check(hyperparams)
  validation.check_bool(_OWNER, 'has_aux', has_aux)
  layout = layouts.check_layout(_OWNER, layout)
  scalar_loss = validation.checked_scalar_loss(_OWNER, loss_fn, has_aux)
  accepted = transformation.forwarded_names(loss_fn)
  constants = {name: _as_float32(value) for name, value in hyperparams.items()
               if name not in _SCHEDULABLE}
  beta1, beta2, damp, n = (
      constants[name] for name in ('beta1', 'beta2', 'damping', 'num_data'))
  delta = constants['prior_prec'] / n

  def init_fn(params):
    f32 = lambda value: jax.tree.map(
        lambda p: jnp.full(jnp.shape(p), value, jnp.float32), params)
    zero = jnp.zeros([], jnp.float32)
    return BSAMState(count=jnp.zeros([], jnp.int32), perturbed_loss=zero,
                     grad_norm=zero, momentum=f32(0.0), precision=f32(s_init),
                     key=jax.random.key_data(jax.random.key(seed)),
                     skipped_steps=complete.no_skipped_steps())

  def update_fn(updates, state, params=None, **extra_args):
    validation.check_params_given(_OWNER, params)
    validation.check_same_tree(_OWNER, updates, params)
    validation.check_state(_OWNER, state, init_fn, params)
    validation.check_real(_OWNER, params)
    lr, r = _value(learning_rate, state.count), _value(rho, state.count)
    ok = _in_bounds({**constants, 'learning_rate': lr, 'rho': r})
    loss_kwargs = {k: v for k, v in extra_args.items()
                   if accepted is None or k in accepted}
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    loss, grad_eps, scaled, grad_norm = _over_groups(
        _value_and_grad(scalar_loss, _has_float16(params)), layout,
        loss_kwargs, params, state.precision, n, r, sub)
    s = state.precision
    momentum = jax.tree.map(
        lambda m, ge, w: beta1 * m + (1 - beta1) * (
            ge.astype(jnp.float32) + delta * w.astype(jnp.float32)),
        state.momentum, grad_eps, params)
    out = jax.tree.map(lambda m, si, u: (-lr * m / si).astype(u.dtype),
                       momentum, s, updates)
    precision = jax.tree.map(
        lambda si, gs: beta2 * si + (1 - beta2) * (gs + damp + delta),
        s, scaled)
    new_state = BSAMState(
        # optax types it as any number; an int32 array in, one out.
        count=cast(jax.Array, optax.safe_increment(state.count)),
        perturbed_loss=jnp.asarray(loss, jnp.float32), grad_norm=grad_norm,
        momentum=momentum, precision=precision,
        key=jax.random.key_data(key), skipped_steps=state.skipped_steps)
    # g is finite exactly when ||g|| is; g_eps enters the momentum.
    ok = ok & tree_math.all_finite((out, new_state))
    return complete.skip_unless_finite(ok, out, state, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
