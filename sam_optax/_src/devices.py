"""Laying sharpness-aware steps over devices and over chunks of a batch.

Three ways to run a SAM-family transformation on more than one batch slice
(DESIGN.md, "Devices and m-sharpness"):

* **per device** -- ``axis_name=`` inside `jax.pmap` / `jax.shard_map`: each
  device perturbs with its own gradient (m = the per-device batch) and the
  returned gradient is averaged over the axis, in the one all-reduce that
  data-parallel SGD needs anyway;
* **per chunk** -- ``chunk_size=m``: the batch is split into chunks of m
  examples inside the step, evaluated one after another (``'sequential'``,
  `jax.lax.scan`, memory of one chunk) or all at once (``'vectorized'``,
  `jax.vmap`);
* **per chunk, laid over a mesh** -- ``chunk_mode=mesh_chunks(mesh, 'data')``
  under plain `jax.jit` with the batch sharded over the mesh's data axis
  (`shard_batch`): the chunks are vectorized and pinned to the data axis, so
  m-sharpness scales to many devices without `pmap`, with the same result as
  the per-device path.

This module holds the mesh layout and the chunk-evaluation helpers that the
pipeline uses, and `chunked_value_and_grad`, the clean gradient accumulated
over chunks for SAM on batches that do not fit in memory
(``shared_perturbation=True``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from sam_optax._src import batching
from sam_optax._src import tree_math
from sam_optax._src import validation

PyTree = Any

SEQUENTIAL = 'sequential'
VECTORIZED = 'vectorized'


def _is_explicit(mesh: jax.sharding.Mesh, axis: Hashable) -> bool:
  axis_type = getattr(jax.sharding, 'AxisType', None)
  types = getattr(mesh, 'axis_types', None)
  if axis_type is None or types is None:
    return False
  return types[mesh.axis_names.index(axis)] == axis_type.Explicit


@dataclasses.dataclass(frozen=True)
class MeshChunks:
  """Vectorized chunks with the chunk axis sharded over a mesh axis.

  Build it with `mesh_chunks`. Used as ``chunk_mode`` of a transformation
  under `jax.jit` when the batch is sharded over ``mesh`` along ``axis``.

  Attributes:
    mesh: the `jax.sharding.Mesh`.
    axis: the name of the mesh's data axis.
  """

  mesh: jax.sharding.Mesh
  axis: Hashable

  @property
  def size(self) -> int:
    return int(self.mesh.shape[self.axis])

  def constrain(self, tree: PyTree) -> PyTree:
    """Shards the leading (chunk) dimension of every non-scalar leaf."""
    sharding = NamedSharding(self.mesh, PartitionSpec(self.axis))
    explicit = _is_explicit(self.mesh, self.axis)

    def put(x):
      if jnp.ndim(x) == 0:
        return x
      if explicit:  # jax.make_mesh's default axis type in jax >= 0.7
        return jax.sharding.reshard(x, sharding)
      return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(put, tree)


ChunkMode = Union[str, MeshChunks]


def mesh_chunks(mesh: jax.sharding.Mesh, axis: Hashable = 'data') -> MeshChunks:
  """A ``chunk_mode`` that lays the chunks over ``mesh``'s data ``axis``.

  Under `jax.jit`, with the batch sharded over ``axis`` (see `shard_batch`),
  ``sam(loss_fn, rho, chunk_size=m, chunk_mode=mesh_chunks(mesh))`` evaluates
  the chunks of m examples in parallel, each device holding
  ``chunks / mesh.shape[axis]`` of them; the number of chunks in a batch must
  be a multiple of the axis size.

  Examples:
    >>> import jax, sam_optax
    >>> mesh = jax.make_mesh((len(jax.devices()),), ('data',))
    >>> layout = sam_optax.mesh_chunks(mesh, 'data')
    >>> layout.size == len(jax.devices())
    True

  Args:
    mesh: a `jax.sharding.Mesh`.
    axis: the name of its data axis.

  Returns:
    A `MeshChunks` to pass as ``chunk_mode``.
  """
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(
        'mesh_chunks: mesh must be a jax.sharding.Mesh (e.g.'
        f" jax.make_mesh((8,), ('data',))), got {type(mesh).__name__}."
    )
  if axis not in mesh.shape:
    raise ValueError(
        f'mesh_chunks: the mesh has axes {tuple(mesh.shape)}, not {axis!r}.'
        ' Pass the name of the axis the batch is sharded over.'
    )
  return MeshChunks(mesh, axis)


def shard_batch(
    batch: PyTree, mesh: jax.sharding.Mesh, axis: Hashable = 'data'
) -> PyTree:
  """Puts every batched leaf on ``mesh``, split along its first dimension.

  Scalars are replicated. Use it to feed a jitted step whose transformation
  has ``chunk_mode=mesh_chunks(mesh, axis)``.
  """
  if axis not in mesh.shape:
    raise ValueError(
        f'shard_batch: the mesh has axes {tuple(mesh.shape)}, not {axis!r}.'
    )
  size = mesh.shape[axis]

  def put(x):
    if np.ndim(x) == 0:
      return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    if np.shape(x)[0] % size:
      raise ValueError(
          f'shard_batch: a leaf with {np.shape(x)[0]} examples does not split'
          f' over the {size} devices of mesh axis {axis!r}; use a batch size'
          f' that is a multiple of {size}.'
      )
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(axis)))

  return jax.tree.map(put, batch)


def check_chunk_mode(owner: str, mode: Any) -> ChunkMode:
  if isinstance(mode, MeshChunks) or mode in (SEQUENTIAL, VECTORIZED):
    return mode
  raise ValueError(
      f"{owner}: chunk_mode must be 'sequential' (one chunk at a time,"
      " memory of one chunk), 'vectorized' (all chunks at once with vmap) or"
      ' sam_optax.mesh_chunks(mesh, axis) (vectorized, chunks sharded over a'
      f' mesh axis under jit); got {mode!r}.'
  )


def split(owner: str, loss_kwargs: Mapping[str, Any], chunk_size: int,
          mode: ChunkMode) -> tuple[dict[str, Any], int]:
  """Splits the batch into chunks; returns (split kwargs, number of chunks)."""
  chunks = batching.batch_size(owner, loss_kwargs)
  split_kwargs = batching.split_into_chunks(owner, loss_kwargs, chunk_size)
  chunks //= chunk_size
  if isinstance(mode, MeshChunks):
    if chunks % mode.size:
      raise ValueError(
          f'{owner}: the batch splits into {chunks} chunks of m={chunk_size},'
          f' which do not lay evenly over the {mode.size} devices of mesh'
          f' axis {mode.axis!r}. Use a batch of a multiple of'
          f' {mode.size * chunk_size} examples, or a smaller m.'
      )
    split_kwargs = mode.constrain(split_kwargs)
  return split_kwargs, chunks


def _chunk(split_kwargs: dict[str, Any], index) -> dict[str, Any]:
  return jax.tree.map(
      lambda x: x[index] if jnp.ndim(x) > 0 else x, split_kwargs
  )


def _like_varying(x: jax.Array, like: jax.ShapeDtypeStruct) -> jax.Array:
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
    chunks: int,
    mode: ChunkMode,
) -> tuple[PyTree, PyTree]:
  """Evaluates ``fn(chunk_kwargs) -> (averaged, stacked)`` on every chunk.

  Returns the mean over chunks of ``averaged`` (accumulated in float32,
  leaves keep float32 or wider) and ``stacked`` with a leading chunk axis.
  ``'sequential'`` runs the chunks in a `jax.lax.scan` (the running sum is the
  only state, so peak memory is that of one chunk); ``'vectorized'`` and
  `MeshChunks` run them at once with `jax.vmap`.
  """
  if mode == SEQUENTIAL:
    flat, treedef = jax.tree.flatten(split_kwargs)
    batched = [jnp.ndim(x) > 0 for x in flat]
    xs = [x for x, b in zip(flat, batched) if b]

    def rebuild(slices):
      it = iter(slices)
      return jax.tree.unflatten(
          treedef, [next(it) if b else x for x, b in zip(flat, batched)]
      )

    shapes = jax.eval_shape(lambda: fn(_chunk(split_kwargs, 0)))
    zeros = jax.tree.map(
        lambda s: _like_varying(
            jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), s),
        shapes[0],
    )

    def body(total, slices):
      averaged, stacked = fn(rebuild(slices))
      total = jax.tree.map(
          lambda t, a: t + tree_math.wide(a).astype(t.dtype), total, averaged
      )
      return total, stacked

    total, stacked = jax.lax.scan(body, zeros, xs)
  else:
    averaged, stacked = jax.vmap(fn, in_axes=(batching.chunk_axes(
        split_kwargs),))(split_kwargs)
    if isinstance(mode, MeshChunks):
      averaged, stacked = mode.constrain((averaged, stacked))
    total = jax.tree.map(
        lambda a: jnp.sum(tree_math.wide(a), axis=0), averaged
    )
  mean = jax.tree.map(lambda t: t / chunks, total)
  return mean, stacked


def chunked_value_and_grad(
    loss_fn: Callable[..., Any],
    chunk_size: int,
    *,
    has_aux: bool = False,
    chunk_mode: ChunkMode = SEQUENTIAL,
) -> Callable[..., tuple[Any, PyTree]]:
  r"""``jax.value_and_grad`` accumulated over chunks of m examples.

  For a loss that is a mean over examples, the mean over equal chunks of the
  chunk losses and gradients equals the full-batch loss and gradient, while
  ``'sequential'`` mode holds the activations of one chunk only. This is the
  clean gradient to hand to a transformation built with
  ``chunk_size=m, shared_perturbation=True`` (SAM with gradient accumulation).

  Examples:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> def loss_fn(w, x):
    ...   return jnp.mean((x @ w) ** 2)
    >>> x = jnp.arange(12.0).reshape(6, 2)
    >>> vg = sam_optax.chunked_value_and_grad(loss_fn, chunk_size=2)
    >>> loss, grad = vg(jnp.ones(2), x=x)
    >>> bool(jnp.allclose(grad, jax.grad(loss_fn)(jnp.ones(2), x)))
    True

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar (or
      ``(scalar, aux)`` with ``has_aux=True``).
    chunk_size: m, the examples per chunk; must divide the batch.
    has_aux: whether loss_fn returns ``(loss, aux)``; aux is then returned
      stacked over chunks (leading chunk axis).
    chunk_mode: ``'sequential'``, ``'vectorized'`` or `mesh_chunks`.

  Returns:
    ``f(params, **loss_kwargs) -> (loss, grads)`` (``((loss, aux), grads)``
    with ``has_aux``), loss in float32, grads in the parameters' dtypes.
  """
  owner = 'chunked_value_and_grad'
  validation.check_loss_fn(owner, loss_fn)
  chunk_size = validation.check_static_int(
      owner, 'chunk_size', chunk_size, minimum=1
  )
  chunk_mode = check_chunk_mode(owner, chunk_mode)
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def fn(params, **loss_kwargs):
    split_kwargs, chunks = split(owner, loss_kwargs, chunk_size, chunk_mode)

    def one(chunk_kwargs):
      out, grads = value_and_grad(params, **chunk_kwargs)
      loss, aux = out if has_aux else (out, None)
      return (jnp.asarray(loss, jnp.float32), grads), aux

    (loss, grads), aux = over_chunks(one, split_kwargs, chunks, chunk_mode)
    grads = tree_math.tree_cast_like(grads, params)
    return ((loss, aux), grads) if has_aux else (loss, grads)

  return fn
