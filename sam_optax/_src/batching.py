"""Splitting a batch of keyword arguments into chunks of m examples.

Used by m-sharpness (in the transformations and in the sharpness helpers):
every array in the loss's keyword arguments that has a leading batch dimension
is reshaped from ``(n * m, ...)`` to ``(n, m, ...)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def batch_size(owner: str, loss_kwargs: Mapping[str, Any]) -> int:
  """The common leading dimension of every array in ``loss_kwargs``."""
  sizes = {
      jax.tree_util.keystr(path): np.shape(leaf)[0]
      for path, leaf in jax.tree_util.tree_flatten_with_path(dict(loss_kwargs))[0]
      if np.ndim(leaf) > 0
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
        f' dimension: {sizes}. Every array of the loss keyword arguments with'
        ' a dimension is split into chunks, so each must hold the same number'
        ' of examples. Pass what is not per-example as a scalar (a typed key'
        ' from jax.random.key(...) rather than a raw PRNGKey of shape (2,)),'
        ' or close over it in loss_fn (e.g. BatchNorm statistics).'
    )
  return next(iter(sizes.values()))


def split_into_chunks(
    owner: str, loss_kwargs: Mapping[str, Any], chunk_size: int
) -> dict[str, Any]:
  """Reshapes every batched leaf from (n * m, ...) to (n, m, ...).

  Scalars (ndim 0), e.g. a typed dropout key from ``jax.random.key``, are
  not split; they are broadcast to every chunk by the caller
  (``in_axes=None``). Every other array is taken as per-example data: a raw
  ``PRNGKey`` (shape (2,)) or model state such as BatchNorm statistics must be
  closed over in the loss instead.
  Raises a clear error when the batch does not split evenly.
  """
  if isinstance(chunk_size, bool) or not isinstance(
      chunk_size, (int, np.integer)
  ) or chunk_size < 1:
    raise ValueError(
        f'{owner}: the chunk size m must be an int >= 1, got {chunk_size!r}.'
    )
  n = batch_size(owner, loss_kwargs)
  if n % chunk_size:
    raise ValueError(
        f'{owner}: a batch of {n} examples does not split into chunks of'
        f' m={chunk_size} ({n} % {chunk_size} = {n % chunk_size}). Choose m'
        f' dividing {n}, or a batch size that is a multiple of {chunk_size}.'
    )
  chunks = n // chunk_size
  try:
    return jax.tree.map(
        lambda x: jnp.reshape(x, (chunks, chunk_size) + jnp.shape(x)[1:])
        if jnp.ndim(x) > 0
        else x,
        dict(loss_kwargs),
    )
  except Exception as error:  # JAX's ShardingTypeError is not public.
    if type(error).__name__ != 'ShardingTypeError':
      raise
    raise ValueError(
        f'{owner}: the batch of {n} examples is sharded over an explicit mesh'
        f' axis, and its {chunks} chunks of m={chunk_size} do not lay evenly'
        ' over that axis. Use a number of chunks that is a multiple of the'
        ' axis size (with chunk_mode=sam_optax.mesh_chunks(mesh, axis) to'
        ' keep each chunk on its device), or pass the batch unsharded.'
    ) from error


def chunk_axes(split_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """in_axes for vmap / lax.map over chunks: 0 for split leaves, None else."""
  return jax.tree.map(lambda x: 0 if jnp.ndim(x) > 0 else None,
                      dict(split_kwargs))
