"""Input checks of the sharpness helpers: early errors that say the fix."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp

from sam_optax._src.core import collectives
from sam_optax._src.core import loss_calls
from sam_optax._src.core import validation
from sam_optax._src.pipeline import layouts

PyTree = Any

def resolve_key(key: Optional[jax.Array]) -> jax.Array:
  """The given PRNG key, or a fixed default (results are deterministic)."""
  return jax.random.key(0) if key is None else key


def stack_batches(owner: str, batches: Iterable[Mapping[str, Any]]):
  """Stacks an iterable of batch dicts into one dict with a leading axis."""
  if isinstance(batches, Mapping):
    raise TypeError(
        f'{owner}: batches must be an iterable of dicts of loss keyword'
        ' arguments (one dict per batch), got a single dict. For one batch,'
        ' pass it as loss_kwargs=... instead.'
    )
  try:
    batch_list = list(batches)
  except TypeError as error:
    raise TypeError(
        f'{owner}: batches must be an iterable of dicts, got'
        f' {type(batches).__name__}.'
    ) from error
  if not batch_list:
    raise ValueError(
        f'{owner}: batches is empty, so there is no loss to average. Pass at'
        ' least one batch (a dict of loss keyword arguments), or use'
        ' loss_kwargs=... for a single batch.'
    )
  for i, batch in enumerate(batch_list):
    if not isinstance(batch, Mapping):
      raise TypeError(
          f'{owner}: batch {i} is a {type(batch).__name__}, not a dict of'
          ' loss keyword arguments (e.g. {"batch": {...}} or {"x": x, "y": y}).'
      )
    check_not_empty(owner, batch, f'batches[{i}]')
  first = jax.tree.structure(dict(batch_list[0]))
  first_shapes = [jnp.shape(x) for x in jax.tree.leaves(dict(batch_list[0]))]
  for i, batch in enumerate(batch_list[1:], start=1):
    if jax.tree.structure(dict(batch)) != first:
      raise ValueError(
          f'{owner}: batch {i} has a different structure from batch 0:'
          f' {jax.tree.structure(dict(batch))} vs {first}.'
      )
    shapes = [jnp.shape(x) for x in jax.tree.leaves(dict(batch))]
    if shapes != first_shapes:
      raise ValueError(
          f'{owner}: batch {i} has shapes {shapes} but batch 0 has'
          f' {first_shapes}; batches are stacked, so they must have equal'
          ' shapes. Drop the last incomplete batch (drop_last / drop_remainder)'
          ' or pad it.'
      )
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[dict(b) for b in batch_list])
  return stacked, len(batch_list)


def check_layout(owner: str, layout: Any) -> layouts.Layout:
  """A helper's ``layout=``: None, PerDevice(axis) or Chunks(m, shared=True).

  A helper measures one loss, so a layout only says where its batch lies:
  `PerDevice` -- sharded over a pmap / shard_map axis, measured on the global
  batch (``sync`` makes no difference; ``groups`` is refused);
  ``Chunks(m, shared=True)`` (alone or as ``PerDevice(..., chunks=)``) -- the
  batch accumulated over chunks of m examples, at the memory of one chunk.
  A per-chunk measurement (``Chunks(m)`` without ``shared``) is
  `m_sharpness`, and the error says so.
  """
  layout = layouts.check_layout(owner, layout)
  if isinstance(layout, layouts.PerDevice) and layout.groups is not None:
    raise ValueError(
        f'{owner}: layout={layout!r}: a helper measures the loss on the whole'
        ' (global) batch of the axis, so groups= has no meaning here. Use'
        f' PerDevice({layout.axis!r}), or call the helper inside each group'
        ' with a pmap / shard_map over the group axis.')
  chunks = layout if isinstance(layout, layouts.Chunks) else getattr(
      layout, 'chunks', None)
  if chunks is not None and not chunks.shared:
    raise ValueError(
        f'{owner}: layout={layout!r} gives every chunk of {chunks.m} examples'
        ' its own measurement, but a helper measures one loss. Use'
        f' Chunks({chunks.m}, shared=True) to accumulate the batch over chunks'
        f' (memory of one chunk), or sharpness.m_sharpness(..., m={chunks.m})'
        ' for the mean of per-chunk measurements.')
  if isinstance(layout, layouts.PerDevice):
    layouts.check_bound(owner, layout, caller='the helper')
  return layout


def check_loss_output(owner: str, out: Any, has_aux: bool) -> Any:
  """The loss from loss_fn's output; a helper's fix is ``has_aux=`` of it."""
  return loss_calls.check_loss_output(
      owner, out, has_aux, fix=f'pass has_aux={{}} to {owner}')


def check_params(owner: str, params: PyTree, name: str = 'params') -> None:
  """Every leaf real floating-point: complex or integer leaves are refused.

  Norms, dot products and Hessians here are those of real vectors; a complex
  leaf would silently lose its imaginary part (or its conjugation), so it is
  an error that says how to split it into real parts.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(leaf)
    where = f'{name}{jax.tree_util.keystr(path)}'
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise TypeError(
          f'{owner}: {where} is complex ({dtype}); the sharpness helpers'
          ' measure real parameters, and their norms and dot products would'
          ' drop the imaginary part. Split each complex leaf into real parts,'
          " e.g. params = {'re': w.real, 'im': w.imag}, and rebuild"
          " w = params['re'] + 1j * params['im'] inside loss_fn."
      )
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f'{owner}: {where} has dtype {dtype}; every leaf of {name} is'
          ' differentiated, so each must be floating-point (e.g.'
          ' jnp.float32). Pass integer or boolean arguments in loss_kwargs'
          ' (or close over them in loss_fn) instead.'
      )


def check_sharded(owner: str, layout: Any, params: PyTree,
                   data: PyTree) -> None:
  """Data sharded over shard_map axes that the layout does not name: error.

  Autodiff with respect to replicated weights would sum the derivatives
  over those axes (not average them), a silently wrong curvature.
  """
  named = set(layout.axes) if isinstance(layout, layouts.PerDevice) else set()
  data_axes = collectives.tree_varying_axes(data)
  param_axes = [collectives.varying_axes(x) for x in jax.tree.leaves(params)]
  unnamed = sorted(
      (a for a in data_axes - named
       if not all(a in axes for axes in param_axes)), key=str)
  if unnamed:
    axis = unnamed[0] if len(unnamed) == 1 else tuple(unnamed)
    raise ValueError(
        f'{owner}: the batch is sharded over shard_map axis {axis!r} but'
        f' layout={layout!r} does not name it, so the derivatives would be'
        ' summed over the devices. Pass'
        f' layout=sam_optax.PerDevice({axis!r}) to measure the global batch,'
        ' or give each device its own measurement with'
        f" params=jax.lax.pcast(params, {axis!r}, to='varying').")


def check_inputs(owner: str, loss_fn: Any, params: PyTree, loss_kwargs: Any,
                 has_aux: Any) -> None:
  """The checks every helper runs on its common arguments, before tracing."""
  validation.check_loss_fn(owner, loss_fn)
  check_params(owner, params)
  if not isinstance(has_aux, bool):
    raise TypeError(
        f'{owner}: has_aux must be True or False, got {has_aux!r}.')
  if loss_kwargs is not None and not isinstance(loss_kwargs, Mapping):
    raise TypeError(
        f'{owner}: loss_kwargs must be a dict of keyword arguments for'
        f' loss_fn (e.g. loss_kwargs={{"batch": batch}}), got'
        f' {type(loss_kwargs).__name__}.'
    )
  if loss_kwargs is not None:
    check_not_empty(owner, loss_kwargs, 'loss_kwargs')


def check_not_empty(owner: str, kwargs: Mapping[str, Any], name: str) -> None:
  """No array of the loss's keyword arguments with a leading dimension of 0.

  The mean loss of an empty batch is 0 / 0: every helper would measure NaN.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(kwargs))[0]:
    shape = getattr(leaf, 'shape', None)
    if shape is not None and len(shape) > 0 and shape[0] == 0:
      raise ValueError(
          f'{owner}: {name}{jax.tree_util.keystr(path)} has shape'
          f' {tuple(shape)}: an empty batch (leading dimension 0) has no loss'
          ' to measure (its mean is 0 / 0). Pass a batch with at least one'
          ' example, and drop empty batches (e.g. a last batch of a'
          ' drop_remainder=False loader) before the call.')
