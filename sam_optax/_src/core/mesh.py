"""Chunks laid over a device mesh under plain `jax.jit`.

`mesh_chunks(mesh, axis)` is a chunk mode (``Chunks(m, mode=mesh_chunks(
mesh))``): the chunks of a batch are vectorized and their leading axis is
pinned to the mesh's data axis, so m-sharpness spreads over many devices
without `jax.pmap`. `shard_batch` puts a batch on such a mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

PyTree = Any


def is_explicit(mesh: jax.sharding.Mesh, axis: Hashable) -> bool:
  """Whether ``axis`` is an explicit-sharding axis (`jax.make_mesh` default)."""
  axis_type = getattr(jax.sharding, 'AxisType', None)
  types = getattr(mesh, 'axis_types', None)
  if axis_type is None or types is None:
    return False
  return types[mesh.axis_names.index(axis)] == axis_type.Explicit


@dataclasses.dataclass(frozen=True)
class MeshChunks:
  """Vectorized chunks with the chunk axis sharded over a mesh axis.

  Build it with `mesh_chunks`; use it as ``Chunks(m, mode=...)``.

  Attributes:
    mesh: the `jax.sharding.Mesh`.
    axis: the name of the mesh's data axis.
  """

  mesh: jax.sharding.Mesh
  axis: Hashable

  def __repr__(self) -> str:
    return f'mesh_chunks(<mesh {dict(self.mesh.shape)}>, {self.axis!r})'

  @property
  def size(self) -> int:
    return int(self.mesh.shape[self.axis])

  def constrain(self, tree: PyTree) -> PyTree:
    """Shards the leading (chunk) dimension of every non-scalar leaf."""
    sharding = NamedSharding(self.mesh, PartitionSpec(self.axis))
    explicit = is_explicit(self.mesh, self.axis)

    def put(x):
      if jnp.ndim(x) == 0:
        return x
      if explicit:
        return jax.sharding.reshard(x, sharding)
      return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(put, tree)

  def replicate(self, tree: PyTree) -> PyTree:
    """Replicates ``tree`` (e.g. the weights) over the mesh.

    With explicit mesh axes a contraction between sharded examples and
    weights that JAX cannot place is an error, so the weights each chunk
    differentiates at are made replicated first.
    """
    if not is_explicit(self.mesh, self.axis):
      return tree
    sharding = NamedSharding(self.mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.sharding.reshard(x, sharding), tree)


def mesh_chunks(mesh: jax.sharding.Mesh, axis: Hashable = 'data') -> MeshChunks:
  """A chunk mode that lays the chunks over ``mesh``'s data ``axis``.

  Under `jax.jit`, with the batch sharded over ``axis`` (see `shard_batch`),
  ``sam(loss_fn, rho, layout=Chunks(m, mode=mesh_chunks(mesh)))`` evaluates
  the chunks of m examples in parallel, each device holding
  ``chunks / mesh.shape[axis]`` of them; the number of chunks in a batch must
  be a multiple of the axis size.

  **Put the parameters on the mesh, replicated** (``jax.device_put(params,
  NamedSharding(mesh, P()))``). With explicit mesh axes (`jax.make_mesh`'s
  default) JAX refuses the contraction between a sharded batch and weights
  that are not on the mesh, in your own ``jax.grad`` already
  (``ShardingTypeError: Contracting dimensions are sharded``). Models whose
  loss reduces over the batch in ways explicit axes cannot type (Flax NNX
  BatchNorm statistics, for one) need a mesh with
  ``axis_types=(jax.sharding.AxisType.Auto,)``. Both axis types are tested.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((len(jax.devices()),), ('data',))
    >>> def loss_fn(params, x):
    ...   return jnp.mean((x @ params['w']) ** 2)
    >>> params = jax.device_put({'w': jnp.ones(3)}, NamedSharding(mesh, P()))
    >>> batch = sam_optax.shard_batch(
    ...     {'x': jnp.ones((4 * len(jax.devices()), 3))}, mesh)
    >>> tx = sam_optax.sam(loss_fn, rho=0.05, layout=sam_optax.Chunks(
    ...     4, mode=sam_optax.mesh_chunks(mesh, 'data')))
    >>> @jax.jit
    ... def step(params, state, batch):
    ...   grads = jax.grad(loss_fn)(params, **batch)
    ...   return tx.update(grads, state, params, **batch)
    >>> updates, state = step(params, tx.init(params), batch)
    >>> updates['w'].shape
    (3,)

  Args:
    mesh: a `jax.sharding.Mesh`.
    axis: the name of its data axis.

  Returns:
    A `MeshChunks` to pass as ``Chunks(m, mode=...)``.
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
  has ``layout=Chunks(m, mode=mesh_chunks(mesh, axis))``.

  Examples:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> mesh = jax.make_mesh((len(jax.devices()),), ('data',))
    >>> batch = sam_optax.shard_batch({'x': jnp.ones((16, 3))}, mesh)
    >>> batch['x'].sharding.spec == jax.sharding.PartitionSpec('data')
    True
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
