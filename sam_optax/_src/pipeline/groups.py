"""Each layout maps a one-group step over its groups: one function per layout.

A *group* is what gets one perturbation: the whole batch (``layout=None``,
``Chunks(m, shared=True)``), one chunk (``Chunks(m)``), or one device
(`PerDevice`, whose own batch may be split again by ``chunks=``). A step is
``fn(group) -> (averaged, stacked)``; a layout returns the mean of
``averaged`` over its groups on this device (float32) and ``stacked`` with a
leading group axis. `device_mean` then averages over devices.

Given a PRNG ``key``, a step is ``fn(group, key)`` with the group's own key:
``key`` folded with the device's index (`PerDevice`; its sync group's
number with ``groups=``, ``key`` itself for the whole axis with ``sync``),
then with the chunk's index (`Chunks`). A step that does not start from
the incoming gradient (bsam's noisy sample) builds its `Batch` with
``updates=None``: its groups' ``clean_grad`` is None, and no clean gradient
is computed or averaged.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax._src.core import batching
from sam_optax._src.core import collectives
from sam_optax._src.core import tree_math
from sam_optax._src.pipeline import layouts
from sam_optax._src.pipeline.variant import Group

PyTree = Any
# fn(group) -> (averaged, stacked), or fn(group, key) given a key.
GroupStep = Callable[..., tuple[PyTree, PyTree]]


class Batch(NamedTuple):
  """The step's inputs that a layout splits into groups.

  Attributes:
    owner: the transformation's name, for error messages.
    updates: the incoming clean gradient (None: the step has none).
    params: the clean weights.
    loss_kwargs: the keyword arguments forwarded to ``loss_fn``.
    value_and_grad: ``(w, loss_kwargs) -> (loss, grad)``.
    loss: ``(w, loss_kwargs) -> loss``.
  """

  owner: str
  updates: PyTree
  params: PyTree
  loss_kwargs: dict[str, Any]
  value_and_grad: Callable[[PyTree, dict], tuple[jax.Array, PyTree]]
  loss: Callable[[PyTree, dict], jax.Array]


def _call(fn: GroupStep, group: Group, key):
  return fn(group) if key is None else fn(group, key)


def _one_group(fn: GroupStep, group: Group, key=None):
  averaged, stacked = _call(fn, group, key)
  return (jax.tree.map(tree_math.wide, averaged),
          jax.tree.map(lambda x: jnp.expand_dims(x, 0), stacked))


def _same(tree):
  return tree


def per_example_losses(batch: Batch, kwargs: dict,
                       names) -> Callable[[PyTree], jax.Array]:
  """L_i(w) for each example of ``kwargs``: ``w -> (n,)`` forward passes.

  The batch is split into chunks of one example (`batching.split_into_chunks`
  with ``names`` as its ``batch_argnames``) and the loss is vmapped over
  them, so example i's loss is ``loss_fn`` on a batch of that one example.
  """

  def losses(w):
    # The whole group's loss is checked first (abstractly, no compute), so
    # a bad loss_fn's error names the group's shapes, not one example's,
    # and a keyword it lacks is named before the batch is split.
    jax.eval_shape(lambda: batch.loss(w, kwargs))
    split, mask, _ = batching.split_into_chunks(batch.owner, kwargs, 1, names)
    in_axes = jax.tree.map(lambda b: 0 if b else None, mask)
    return jax.vmap(lambda kw: batch.loss(w, kw), in_axes=(in_axes,))(split)

  return losses


def select_examples(batch: Batch, kwargs: dict, names,
                    indices: jax.Array) -> dict:
  """The rows ``indices`` of every per-example leaf of ``kwargs``."""
  mask = batching.batch_mask(batch.owner, kwargs, names)
  return jax.tree.map(
      lambda x, s: jnp.take(x, indices, axis=0) if s else x, dict(kwargs),
      mask)


def _pick(names, default):
  return default if names is None else names


def _examples(batch: Batch, kwargs: dict, default_names,
              sync) -> dict[str, Callable[..., Any]]:
  """A group's per-example pieces ``(losses_at, grad_on)`` on ``kwargs``."""

  def losses_at(w, names=None):
    return per_example_losses(batch, kwargs, _pick(names, default_names))(w)

  def grad_on(w, indices, names=None):
    picked = select_examples(batch, kwargs, _pick(names, default_names),
                             indices)
    return sync(batch.value_and_grad(w, picked))

  return dict(losses_at=losses_at, grad_on=grad_on, mean=sync)


def whole(fn: GroupStep, batch: Batch, clean=None, sync=_same, key=None):
  """``layout=None``: the whole batch is one group.

  ``sync`` averages every loss and gradient over the group's devices
  (`PerDevice` with ``sync=True``), so the pieces see global values --
  except the per-example losses, which are this device's examples (a
  selection among them is per device, and its gradient is averaged).
  """
  return _one_group(fn, Group(
      clean_grad=batch.updates if clean is None else clean,
      grad_at=lambda w: sync(batch.value_and_grad(w, batch.loss_kwargs)),
      loss_at=lambda w: sync(batch.loss(w, batch.loss_kwargs)),
      **_examples(batch, batch.loss_kwargs, None, sync)), key)


def _largest_divisor(k: int, m: int) -> int:
  return max(d for d in range(1, min(k, m) + 1) if k % d == 0)


def replicated(layout: layouts.Layout, tree: PyTree) -> PyTree:
  """``tree`` (weights) replicated over the mesh of `mesh_chunks` chunks."""
  chunks = layout if isinstance(layout, layouts.Chunks) else getattr(
      layout, 'chunks', None)
  if chunks is not None and isinstance(chunks.mode,
                                       layouts.mesh_lib.MeshChunks):
    return chunks.mode.replicate(tree)
  return tree


def chunked(fn: GroupStep, batch: Batch, chunks: layouts.Chunks, clean=None,
            sync=_same, key=None):
  """`Chunks`: one group per chunk, or (``shared``) one for all chunks."""
  split, mask, n = batching.split_into_chunks(
      batch.owner, batch.loss_kwargs, chunks.m, chunks.batch_argnames,
      chunks.shared_argnames)
  batch = batch._replace(params=replicated(chunks, batch.params))
  mapped = lambda one: batching.over_chunks(one, split, mask, n, chunks.mode)
  if chunks.shared:
    def grad_at(w):
      dtypes = []  # each chunk's gradient's (the params' for jax.grad)

      def one(kw):
        loss, grad = batch.value_and_grad(w, kw)
        dtypes.append(jax.tree.map(lambda g: g.dtype, grad))
        return (loss, grad), None

      (loss, grad), _ = mapped(one)  # summed in float32
      return sync((loss, jax.tree.map(lambda g, d: g.astype(d), grad,
                                      dtypes[-1])))

    def losses_at(w, names=None):
      names = _pick(names, chunks.batch_argnames)
      _, stacked = mapped(lambda kw: ((), per_example_losses(
          batch, kw, names)(w)))
      return jnp.reshape(stacked, (-1,))  # chunk i holds rows i*m .. i*m+m-1

    def grad_on(w, indices, names=None):
      # The selected rows, accumulated in chunks of at most m examples.
      names = _pick(names, chunks.batch_argnames)
      picked = select_examples(batch, batch.loss_kwargs, names, indices)
      size = _largest_divisor(int(indices.shape[0]), chunks.m)
      part, part_mask, parts = batching.split_into_chunks(
          batch.owner, picked, size, names)
      mode = chunks.mode if isinstance(chunks.mode, str) else (
          batching.VECTORIZED)
      (loss, grad), _ = batching.over_chunks(
          lambda kw: (batch.value_and_grad(w, kw), None), part, part_mask,
          parts, mode)
      return sync((loss, tree_math.tree_cast_like(grad, batch.params)))

    return _one_group(fn, Group(
        clean_grad=batch.updates if clean is None else clean,
        grad_at=grad_at,
        loss_at=lambda w: sync(mapped(lambda kw: (batch.loss(w, kw),
                                                  None))[0]),
        losses_at=losses_at, grad_on=grad_on, mean=sync), key)

  def one_chunk(kw, chunk_key=None):
    grad_at = lambda w: batch.value_and_grad(w, kw)
    clean_grad = None if batch.updates is None else grad_at(batch.params)[1]
    return _call(fn, Group(
        clean_grad=clean_grad, grad_at=grad_at,
        loss_at=lambda w: batch.loss(w, kw),
        **_examples(batch, kw, chunks.batch_argnames, _same)), chunk_key)

  if key is None:
    return mapped(one_chunk)
  # Chunk i's index rides along as one more split argument.
  return batching.over_chunks(
      lambda c: one_chunk(c['kwargs'], jax.random.fold_in(key, c['index'])),
      {'kwargs': split, 'index': jnp.arange(n)},
      {'kwargs': mask, 'index': True}, n, chunks.mode)


def per_device(fn: GroupStep, batch: Batch, layout: layouts.PerDevice,
               key=None):
  """`PerDevice`: one group per device (or per chunk of each device).

  With ``sync=True`` the group is the whole axis (or each of ``groups``):
  the clean gradient and every later loss and gradient are averaged over
  it, one all-reduce each, so a variant's pieces see the global values.
  """
  layouts.check_bound(batch.owner, layout)
  tracked = _check_local(batch, layout)
  value_and_grad = batch.value_and_grad
  batch = batch._replace(value_and_grad=lambda w, kw: value_and_grad(
      collectives.make_local(w, layout.axes, tracked), kw))
  sync = (lambda tree: sync_mean(tree, layout)) if layout.sync else _same
  clean = None if batch.updates is None else sync(batch.updates)
  key = None if key is None else _device_key(layout, key)
  if layout.chunks is None:
    return whole(fn, batch, clean, sync, key)
  return chunked(fn, batch, layout.chunks, clean, sync, key)


def _device_key(layout: layouts.PerDevice, key):
  """``key`` folded with this device's index (its sync group's number)."""
  index = jax.lax.axis_index(layout.axis)
  if not layout.sync:
    return jax.random.fold_in(key, index)
  if layout.groups is None:
    return key  # one perturbation for the whole axis
  group_of = {d: i for i, group in enumerate(layout.groups) for d in group}
  numbers = jnp.asarray([group_of[d] for d in range(len(group_of))], jnp.int32)
  return jax.random.fold_in(key, numbers[index])


def map_groups(layout: layouts.Layout, fn: GroupStep, batch: Batch,
               key=None):
  """Runs ``fn`` on every group of ``layout`` on this device.

  With a PRNG ``key``, ``fn(group, key)`` gets each group's own key (see
  the module docstring).
  """
  if layout is None:
    return whole(fn, batch, key=key)
  if isinstance(layout, layouts.Chunks):
    return chunked(fn, batch, layout, key=key)
  return per_device(fn, batch, layout, key)


def chunk_groups(layout: layouts.Layout) -> bool:
  """Whether the groups are chunks, each with its own clean gradient."""
  chunks = layout if isinstance(layout, layouts.Chunks) else getattr(
      layout, 'chunks', None)
  return chunks is not None and not chunks.shared


def device_mean(layout: layouts.Layout, tree: PyTree) -> PyTree:
  """The mean over devices (`PerDevice`), one all-reduce; else ``tree``."""
  if isinstance(layout, layouts.PerDevice):
    return collectives.mean(tree, layout.axes)
  return tree


def sync_mean(tree: PyTree, layout: layouts.PerDevice) -> PyTree:
  """The mean over the sync groups (the whole axis without ``groups``)."""
  if layout.groups is not None:
    collectives.check_groups('PerDevice', layout.axis, layout.groups)
  return collectives.mean(tree, layout.axes, layout.groups)


def _check_local(batch: Batch, layout: layouts.PerDevice) -> bool:
  """Whether shard_map tracks device variance here (``check_vma=True``).

  Then a gradient taken at replicated weights is summed over the devices,
  so the incoming gradient must vary over the axis, and every gradient the
  pipeline takes is taken at weights marked varying (`make_local`).
  """
  axes = set(layout.axes)
  tracked = any(axes & collectives.varying_axes(x) for x in jax.tree.leaves(
      (batch.updates, batch.loss_kwargs)))
  if tracked and batch.updates is not None and not any(
      axes <= collectives.varying_axes(g)
      for g in jax.tree.leaves(batch.updates)):
    raise ValueError(
        f'{batch.owner}: with layout={layout!r} the incoming gradient must be'
        " each device's own, but it is replicated over the axis: inside"
        ' jax.shard_map, jax.grad with respect to replicated params already'
        ' sums the gradient over the devices. Differentiate with respect to'
        f" jax.lax.pcast(params, {layout.axis!r}, to='varying') instead, or"
        ' use jax.shard_map(..., check_vma=False).')
  return tracked


def check_layout_fits(owner: str, layout: layouts.Layout,
                      updates: PyTree) -> None:
  """A gradient that varies over a shard_map axis needs `PerDevice`.

  Without it each device would perturb and re-gradient on its own examples
  and hand on its own gradient, so the parameter copies would drift apart
  (JAX's own error here suggests ``check_vma=False``, which only hides it).
  """
  if isinstance(layout, layouts.PerDevice):
    return
  varying = sorted(set().union(*(collectives.varying_axes(g)
                                 for g in jax.tree.leaves(updates))))
  if varying:
    axis = varying[0] if len(varying) == 1 else tuple(varying)
    chunks = '' if layout is None else f', chunks={layout!r}'
    raise ValueError(
        f'{owner}: the incoming gradient varies over the shard_map axis'
        f' {axis!r}: each device holds its own, but layout={layout!r} treats'
        ' it as the whole batch\'s. Pass'
        f' layout=sam_optax.PerDevice({axis!r}{chunks}) so that every device'
        ' perturbs on its own examples and the update is averaged over the'
        ' axis. (Turning off check_vma instead would let the per-device'
        ' parameter copies silently drift apart.)')


def reduce_step(layout: layouts.Layout, out: PyTree, diagnostics, means):
  """Averages the step over devices: one all-reduce for `PerDevice`.

  ``diagnostics`` are each group's ``(perturbed_loss, grad_norm, cosine)``
  averaged over this device's groups. With ``sync=True`` over the whole
  axis every value is already global (replicated), so nothing is reduced;
  with ``groups`` each group's values are averaged over the axis.
  """
  if not isinstance(layout, layouts.PerDevice) or (
      layout.sync and layout.groups is None):
    return out, diagnostics, means
  return device_mean(layout, (out, diagnostics, means))
