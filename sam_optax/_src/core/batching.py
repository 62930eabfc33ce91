"""Splitting a batch of keyword arguments into chunks, and mapping over them.

Used by m-sharpness in the transformations (`Chunks`) and in the sharpness
helpers. The batch arguments are either named (``batch_argnames``) or found
by the automatic rule: every array with a leading dimension, except those
named ``shared_argnames``. Each batch leaf is reshaped from ``(n * m, ...)``
to ``(n, m, ...)``; every other argument goes to every chunk unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src.core import mesh as mesh_lib
from sam_optax._src.core import tree_math

PyTree = Any
SEQUENTIAL = 'sequential'
VECTORIZED = 'vectorized'
ChunkMode = Union[str, mesh_lib.MeshChunks]
_NAMING_HINT = (
    ' Name the per-example arguments with batch_argnames=(...) -- of'
    ' Chunks(m, ...), or of esam(...) for its per-example losses -- (the'
    ' others then go whole to every chunk or example), or the shared ones'
    ' with Chunks(m, shared_argnames=(...)), pass what is not per-example as'
    ' a scalar (a typed key from jax.random.key(...) rather than a raw'
    ' PRNGKey of shape (2,)), or close over it in loss_fn.'
)


def _looks_like_raw_key(x: Any) -> bool:
  return np.shape(x) == (2,) and getattr(x, 'dtype', None) == np.uint32


def batch_mask(owner: str, loss_kwargs: Mapping[str, Any],
               batch_argnames: Optional[Sequence[str]],
               shared_argnames: Optional[Sequence[str]] = None
               ) -> dict[str, Any]:
  """A tree like ``loss_kwargs``: True for the leaves that are split.

  Without ``batch_argnames`` every array with a leading dimension is split,
  except the arguments named in ``shared_argnames``.
  """
  loss_kwargs = dict(loss_kwargs)
  if batch_argnames is None:
    shared = set(shared_argnames or ())
    return {name: jax.tree.map(
        lambda x, split=name not in shared: split and np.ndim(x) > 0, value)
            for name, value in loss_kwargs.items()}
  missing = sorted(set(batch_argnames) - set(loss_kwargs))
  if missing:
    raise ValueError(
        f'{owner}: batch_argnames names {missing}, which update() was not'
        f' given; the loss keyword arguments are {sorted(loss_kwargs)}.'
    )
  return {
      name: jax.tree.map(lambda x, split=name in batch_argnames: split
                         and np.ndim(x) > 0, value)
      for name, value in loss_kwargs.items()
  }


def batch_size(owner: str, loss_kwargs: Mapping[str, Any],
               batch_argnames: Optional[Sequence[str]] = None,
               shared_argnames: Optional[Sequence[str]] = None) -> int:
  """The common leading dimension of every batch leaf of ``loss_kwargs``."""
  mask = batch_mask(owner, loss_kwargs, batch_argnames, shared_argnames)
  flat = jax.tree_util.tree_flatten_with_path(dict(loss_kwargs))[0]
  sizes = {
      jax.tree_util.keystr(path): np.shape(leaf)[0]
      for (path, leaf), split in zip(flat, jax.tree.leaves(mask))
      if split
  }
  if not sizes:
    raise ValueError(
        f'{owner}: splitting into chunks of m examples needs at least one'
        ' array with a leading batch dimension in the loss keyword arguments,'
        f' got {sorted(loss_kwargs)} with no such array.'
    )
  if len(set(sizes.values())) != 1:
    raise ValueError(
        f'{owner}: the batch arrays disagree on their leading (batch)'
        f' dimension: {sizes}. Every batch array is split (into chunks or'
        ' examples), so each must hold the same number of examples.'
        + _NAMING_HINT
    )
  if batch_argnames is None:
    for where, (path, leaf) in zip(jax.tree.leaves(mask), flat):
      if where and _looks_like_raw_key(leaf):
        raise ValueError(
            f'{owner}: the loss keyword argument'
            f' {jax.tree_util.keystr(path)} looks like a raw PRNG key (uint32,'
            ' shape (2,)) in a batch of 2 examples: every array with a'
            ' leading dimension is split into examples, so the key would be'
            ' split too. Pass a typed key from jax.random.key(...) (a'
            ' scalar: it goes to every chunk whole), name it in'
            ' Chunks(m, shared_argnames=(...)), or name the per-example'
            ' arguments with Chunks(m, batch_argnames=(...)).')
  return next(iter(sizes.values()))


def check_unnamed(owner: str, loss_kwargs: Mapping[str, Any],
                  batch_argnames: Sequence[str],
                  shared_argnames: Sequence[str], n: int) -> None:
  """An argument left out of ``batch_argnames`` must not look per-example.

  One whose leading dimension is the batch size ``n`` would go whole to
  every chunk, each chunk's examples meeting all n rows of it: an error
  that names it, unless ``shared_argnames`` says it is shared.
  """
  for name, value in loss_kwargs.items():
    if name in batch_argnames or name in shared_argnames:
      continue
    rows = [np.shape(x)[0] for x in jax.tree.leaves(value) if np.ndim(x)]
    if n in rows:
      raise ValueError(
          f'{owner}: the loss keyword argument {name!r} is not in'
          f' batch_argnames={tuple(batch_argnames)}, but its leading'
          f' dimension is the batch size {n}: it would go whole to every'
          ' chunk, so each chunk would see every row of it. If it holds one'
          f' row per example, add it: Chunks(m, batch_argnames='
          f'{tuple(batch_argnames) + (name,)}); if it is really shared (a'
          f' lookup table that happens to have {n} rows), say so with'
          f' Chunks(m, ..., shared_argnames=({name!r},)).')


def split_into_chunks(
    owner: str, loss_kwargs: Mapping[str, Any], chunk_size: int,
    batch_argnames: Optional[Sequence[str]] = None,
    shared_argnames: Optional[Sequence[str]] = None,
) -> tuple[dict[str, Any], dict[str, Any], int]:
  """Reshapes every batch leaf from (n * m, ...) to (n, m, ...).

  Returns the split keyword arguments, the tree of which leaves were split,
  and the number of chunks n; a batch that does not split evenly, or that
  is empty, is a clear error. ``shared_argnames`` (a `Chunks`'s) names the
  arguments that go whole to every chunk whatever their shape; given, an
  argument left out of ``batch_argnames`` with the batch's leading
  dimension is an error (`check_unnamed`).
  """
  n = batch_size(owner, loss_kwargs, batch_argnames, shared_argnames)
  if n == 0:
    raise ValueError(
        f'{owner}: the batch is empty (its per-example arrays have 0 rows),'
        ' so there is no example to split into chunks or to take a gradient'
        ' on. Skip empty batches before the step (e.g. drop the last,'
        ' partial batch of an epoch when it is empty).')
  if batch_argnames is not None and shared_argnames is not None:
    check_unnamed(owner, loss_kwargs, batch_argnames, shared_argnames, n)
  if n % chunk_size:
    raise ValueError(
        f'{owner}: a batch of {n} examples does not split into chunks of'
        f' m={chunk_size} ({n} % {chunk_size} = {n % chunk_size}). Choose m'
        f' dividing {n}, or a batch size that is a multiple of {chunk_size}.'
    )
  chunks = n // chunk_size
  mask = batch_mask(owner, loss_kwargs, batch_argnames, shared_argnames)
  try:
    split = jax.tree.map(
        lambda x, s: jnp.reshape(x, (chunks, chunk_size) + jnp.shape(x)[1:])
        if s else x, dict(loss_kwargs), mask)
  except Exception as error:  # JAX's ShardingTypeError is not public.
    if type(error).__name__ != 'ShardingTypeError':
      raise
    raise ValueError(
        f'{owner}: the batch of {n} examples is sharded over an explicit mesh'
        f' axis, and its {chunks} chunks of m={chunk_size} do not lay evenly'
        ' over that axis. Use a number of chunks that is a multiple of the'
        ' axis size (with Chunks(m, mode=sam_optax.mesh_chunks(mesh, axis))'
        ' to keep each chunk on its device), or pass the batch unsharded.'
    ) from error
  return split, mask, chunks


def check_mode(owner: str, mode: Any) -> ChunkMode:
  if isinstance(mode, mesh_lib.MeshChunks) or mode in (SEQUENTIAL, VECTORIZED):
    return mode
  raise ValueError(
      f"{owner}: mode must be 'sequential' (one chunk at a time, memory of"
      " one chunk), 'vectorized' (all chunks at once with vmap) or"
      ' sam_optax.mesh_chunks(mesh, axis) (vectorized, chunks sharded over a'
      f' mesh axis under jit); got {mode!r}.'
  )


def like_varying(x: jax.Array, like: jax.ShapeDtypeStruct) -> jax.Array:
  """x, marked device-varying over the shard_map axes that ``like`` varies on.

  A `jax.lax.scan` inside `jax.shard_map` needs its initial carry typed like
  the carry its body returns.
  """
  manual = getattr(like, 'manual_axis_type', None)  # jax >= 0.10
  axes = getattr(manual, 'varying', None) if manual is not None else getattr(
      like, 'vma', None)
  if not axes:
    return x
  return jax.lax.pcast(x, tuple(axes), to='varying')


def over_chunks(
    fn: Callable[[dict[str, Any]], tuple[PyTree, PyTree]],
    split_kwargs: dict[str, Any],
    mask: dict[str, Any],
    chunks: int,
    mode: ChunkMode,
    unroll: bool = False,
) -> tuple[PyTree, PyTree]:
  """Evaluates ``fn(chunk_kwargs) -> (averaged, stacked)`` on every chunk.

  Returns the mean over chunks of ``averaged`` (accumulated in float32;
  leaves are float32 or wider) and ``stacked`` with a leading chunk axis.
  ``'sequential'`` runs the chunks in a `jax.lax.scan` whose only carry is the
  running sum (peak memory of one chunk); ``'vectorized'`` and `MeshChunks`
  run them at once with `jax.vmap`. ``unroll=True`` unrolls the sequential
  scan (no loop body: XLA:CPU's convolutions keep their fast path, see the
  sharpness helpers' ``unroll=``).
  """
  if isinstance(mode, mesh_lib.MeshChunks):
    if chunks % mode.size:
      raise ValueError(
          f'The batch splits into {chunks} chunks, which do not lay evenly'
          f' over the {mode.size} devices of mesh axis {mode.axis!r}. Use a'
          f' batch that splits into a multiple of {mode.size} chunks, or a'
          ' smaller m.')
    split_kwargs = mode.constrain(split_kwargs)
  if mode == SEQUENTIAL:
    flat, treedef = jax.tree.flatten(split_kwargs)
    batched = jax.tree.leaves(mask)
    xs = [x for x, b in zip(flat, batched) if b]

    def rebuild(slices):
      it = iter(slices)
      return jax.tree.unflatten(
          treedef, [next(it) if b else x for x, b in zip(flat, batched)])

    shapes = jax.eval_shape(lambda: fn(rebuild([x[0] for x in xs])))
    zeros = jax.tree.map(
        lambda s: like_varying(
            jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), s),
        shapes[0],
    )

    def body(total, slices):
      averaged, stacked = fn(rebuild(slices))
      total = jax.tree.map(
          lambda t, a: t + tree_math.wide(a).astype(t.dtype), total, averaged)
      return total, stacked

    total, stacked = jax.lax.scan(body, zeros, xs, unroll=unroll)
  else:
    in_axes = jax.tree.map(lambda b: 0 if b else None, mask)
    averaged, stacked = jax.vmap(fn, in_axes=(in_axes,))(split_kwargs)
    if isinstance(mode, mesh_lib.MeshChunks):
      averaged, stacked = mode.constrain((averaged, stacked))
    total = jax.tree.map(lambda a: jnp.sum(tree_math.wide(a), axis=0),
                         averaged)
  mean = jax.tree.map(lambda t: t / chunks, total)
  return mean, stacked
