"""How a step lies over devices and over chunks of the batch: ``layout=``.

Two small frozen objects, validated when they are built; a variant never
sees them:

* `Chunks` -- in-device m-sharpness: the batch is split into chunks of m
  examples, each with its own perturbation (or, ``shared=True``, one
  perturbation with gradients accumulated over the chunks);
* `PerDevice` -- inside `jax.pmap` / `jax.shard_map`: each device perturbs
  with its own gradient and the gradient handed on is averaged over the axis
  (``sync=True``: one perturbation from the axis-averaged gradient);
  ``chunks=`` splits each device's batch further.

``layout=None`` (the default) is one device, the whole batch, one
perturbation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Optional, Sequence, Union

import jax

from sam_optax._src.core import batching
from sam_optax._src.core import mesh as mesh_lib
from sam_optax._src.core import validation


def _call_repr(name: str, positional: Sequence[object], options: dict,
               defaults: dict) -> str:
  shown = [repr(p) for p in positional] + [
      f'{k}={v!r}' for k, v in options.items() if v != defaults[k]]
  return f'{name}({", ".join(shown)})'


@dataclasses.dataclass(frozen=True, repr=False)
class Chunks:
  """In-device m-sharpness: one perturbation per chunk of ``m`` examples.

  The per-example keyword arguments of ``update`` are split into chunks of
  ``m`` examples. Each chunk gets its own clean gradient (3 passes a step
  instead of SAM's 2), ascent, re-gradient and combine; the gradients
  handed on are averaged. With ``shared=True`` there is one perturbation
  and every gradient after the incoming one is accumulated over the
  chunks: SAM on a batch too big for memory, at the memory of one chunk
  (the incoming ``updates`` must then be the full-batch gradient, e.g.
  from `sam_optax.chunked_value_and_grad`).

  Attributes:
    m: examples per chunk (an int >= 1 that divides the batch).
    mode: ``'sequential'`` (`jax.lax.scan`, memory of one chunk),
      ``'vectorized'`` (`jax.vmap`, all chunks at once) or
      `sam_optax.mesh_chunks` (vectorized, chunks laid over a mesh axis
      under plain `jax.jit`).
    shared: one perturbation for all chunks, gradients accumulated.
    batch_argnames: the names of the per-example keyword arguments;
      ``None`` splits every array with a leading dimension. The others (a
      typed key, a lookup table) go whole to every chunk; one whose leading
      dimension is the batch size is an error unless in ``shared_argnames``.
    shared_argnames: the names of keyword arguments that go whole to every
      chunk although their leading dimension may be the batch size.

  Examples:
    >>> import sam_optax
    >>> sam_optax.Chunks(16, mode='vectorized')
    Chunks(16, mode='vectorized')
    >>> sam_optax.Chunks(64, shared=True, batch_argnames=('x', 'y'))
    Chunks(64, shared=True, batch_argnames=('x', 'y'))
    >>> sam_optax.Chunks(8, batch_argnames=('x', 'y'),
    ...                  shared_argnames=('table',))
    Chunks(8, batch_argnames=('x', 'y'), shared_argnames=('table',))
  """

  m: int
  mode: batching.ChunkMode = batching.SEQUENTIAL
  shared: bool = False
  batch_argnames: Optional[tuple[str, ...]] = None
  shared_argnames: tuple[str, ...] = ()

  def __post_init__(self) -> None:
    owner = 'Chunks'
    object.__setattr__(self, 'm', validation.check_static_int(
        owner, 'm', self.m, minimum=1))
    batching.check_mode(owner, self.mode)
    validation.check_bool(owner, 'shared', self.shared)
    if self.batch_argnames is not None:
      object.__setattr__(self, 'batch_argnames', _names(
          owner, 'batch_argnames', self.batch_argnames, ('x', 'y')))
    shared = _names(owner, 'shared_argnames', self.shared_argnames,
                    ('table',)) if self.shared_argnames else ()
    both = sorted(set(shared) & set(self.batch_argnames or ()))
    if both:
      raise ValueError(
          f'{owner}: {both} are named both in batch_argnames (split into'
          ' chunks) and in shared_argnames (whole to every chunk); name each'
          ' in one of them.')
    object.__setattr__(self, 'shared_argnames', shared)

  def __repr__(self) -> str:
    return _call_repr(
        'Chunks', [self.m],
        dict(mode=self.mode, shared=self.shared,
             batch_argnames=self.batch_argnames,
             shared_argnames=self.shared_argnames),
        dict(mode=batching.SEQUENTIAL, shared=False, batch_argnames=None,
             shared_argnames=()))


def _names(owner: str, field: str, names, example: tuple) -> tuple:
  """A non-empty tuple of keyword-argument names (one str is one name)."""
  given = names
  if isinstance(names, str):
    names = (names,)
  try:
    names = tuple(names)
  except TypeError:
    names = ()
  if not names or not all(isinstance(n, str) for n in names):
    raise TypeError(
        f'{owner}: {field} must be a tuple of keyword-argument names, e.g.'
        f' {example!r}, got {given!r}.')
  return names


def _check_groups(owner: str, groups) -> tuple[tuple[int, ...], ...]:
  try:
    groups = tuple(tuple(int(i) for i in g) for g in groups)
  except TypeError as error:
    raise TypeError(
        f'{owner}: groups must be a list of lists of device indices, e.g.'
        f' [[0, 1], [2, 3]], got {groups!r}.') from error
  flat = [i for g in groups for i in g]
  if (not groups or len({len(g) for g in groups}) != 1
      or sorted(flat) != list(range(len(flat)))):
    raise ValueError(
        f'{owner}: groups must split the axis indices 0..n-1 into disjoint'
        f' groups of equal size, e.g. [[0, 1], [2, 3]]; got {groups!r}.')
  return groups


@dataclasses.dataclass(frozen=True, repr=False)
class PerDevice:
  """Inside `jax.pmap` / `jax.shard_map`: one perturbation per device.

  Each device perturbs with its own incoming gradient (m-sharpness with m =
  the per-device batch) and the gradient handed on is averaged over
  ``axis``, with the diagnostics, in one all-reduce per step. ``sync=True``
  averages the clean gradient (and every later ascent gradient) over the
  axis first: SAM on the global batch, one more all-reduce. Inside
  `jax.shard_map` take the incoming gradient at weights marked varying,
  ``jax.lax.pcast(params, axis, to='varying')``; a clear error says so
  otherwise.

  Attributes:
    axis: the pmap / shard_map axis name (or a tuple of names).
    sync: build the perturbation from the axis-averaged gradient.
    groups: with ``sync`` (pmap only), average inside these groups of axis
      indices instead (m = group size x per-device batch).
    chunks: a `Chunks` layout for each device's batch (its own
      perturbations; with ``shared=True`` accumulation, which composes with
      ``sync``), or None.

  Examples:
    >>> import sam_optax
    >>> sam_optax.PerDevice('batch')
    PerDevice('batch')
    >>> sam_optax.PerDevice('batch', sync=True, groups=[[0, 1], [2, 3]])
    PerDevice('batch', sync=True, groups=((0, 1), (2, 3)))
    >>> sam_optax.PerDevice('batch', chunks=sam_optax.Chunks(8))
    PerDevice('batch', chunks=Chunks(8))
  """

  axis: Hashable
  sync: bool = False
  groups: Optional[tuple[tuple[int, ...], ...]] = None
  chunks: Optional[Chunks] = None

  def __post_init__(self) -> None:
    owner = 'PerDevice'
    try:
      hash(self.axis)
    except TypeError as error:
      raise TypeError(
          f'{owner}: axis must be a hashable axis name (the name given to'
          f' pmap / shard_map, e.g. "batch"), got {self.axis!r}.'
      ) from error
    if isinstance(self.axis, list):
      object.__setattr__(self, 'axis', tuple(self.axis))
    validation.check_bool(owner, 'sync', self.sync)
    if self.groups is not None:
      if not self.sync:
        raise ValueError(
            f'{owner}: groups= syncs the perturbation inside groups of'
            ' devices; it needs sync=True.')
      object.__setattr__(self, 'groups', _check_groups(owner, self.groups))
    chunks = self.chunks
    if chunks is not None:
      if not isinstance(chunks, Chunks):
        raise TypeError(
            f'{owner}: chunks must be a sam_optax.Chunks, e.g.'
            f' chunks=sam_optax.Chunks(8), got {chunks!r}.')
      if isinstance(chunks.mode, mesh_lib.MeshChunks):
        raise ValueError(
            f'{owner}: mesh_chunks(...) lays chunks over a mesh under plain'
            ' jax.jit; inside pmap / shard_map use'
            " Chunks(m, mode='sequential') or 'vectorized'.")
      if self.sync and not chunks.shared:
        raise ValueError(
            f'{owner}: sync=True builds one perturbation from the whole'
            ' (global) batch, while chunks=Chunks(m) gives every chunk its'
            ' own. Drop one of them, or use Chunks(m, shared=True) for global'
            ' SAM with gradient accumulation.')

  @property
  def axes(self) -> tuple[Any, ...]:
    return self.axis if isinstance(self.axis, tuple) else (self.axis,)

  def __repr__(self) -> str:
    return _call_repr('PerDevice', [self.axis],
                      dict(sync=self.sync, groups=self.groups,
                           chunks=self.chunks),
                      dict(sync=False, groups=None, chunks=None))


Layout = Optional[Union[Chunks, PerDevice]]


def check_bound(owner: str, layout: Layout, caller: str = 'update') -> None:
  """A `PerDevice` axis must be bound: ``caller`` runs inside pmap/shard_map.

  JAX's own NameError here would suggest the wrong fix; this names ours.
  """
  if not isinstance(layout, PerDevice):
    return
  for axis in layout.axes:
    try:
      jax.lax.axis_size(axis)
    except NameError as error:
      raise ValueError(
          f'{owner}: layout={layout!r} runs inside jax.pmap / jax.shard_map'
          f' over axis {axis!r}, but no such axis is bound here. Call'
          f' {caller} inside pmap(..., axis_name=...) / shard_map over that'
          ' axis, or use layout=None (or sam_optax.Chunks(m)) on one device.'
      ) from error


def check_layout(owner: str, layout) -> Layout:
  if layout is None or isinstance(layout, (Chunks, PerDevice)):
    return layout
  raise TypeError(
      f'{owner}: layout must be None (one device, the whole batch),'
      ' sam_optax.PerDevice(axis) (inside pmap / shard_map) or'
      f' sam_optax.Chunks(m) (m-sharpness inside the step); got {layout!r}.')
