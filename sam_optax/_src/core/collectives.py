"""Every collective over pmap / shard_map axes, written once.

The pipeline's layouts, bsam and the sharpness helpers all average over
device axes and, inside ``jax.shard_map`` with ``check_vma=True``, take
gradients at weights marked device-varying (autodiff with respect to
replicated weights would sum the gradient over the devices). These are the
pieces they share; none knows about layouts.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Optional, Sequence

import jax
from jax import flatten_util

from sam_optax._src.core import tree_math

PyTree = Any


def varying_axes(x: Any) -> frozenset:
  """The shard_map axes ``x`` varies over (empty outside shard_map)."""
  try:
    aval = jax.typeof(x)
  except TypeError:  # a non-array value (e.g. a string keyword argument)
    return frozenset()
  manual = getattr(aval, 'manual_axis_type', None)  # jax >= 0.10
  if manual is not None:
    return frozenset(getattr(manual, 'varying', ()))
  return frozenset(getattr(aval, 'vma', ()))  # older jax


def tree_varying_axes(tree: PyTree) -> frozenset:
  """The shard_map axes any leaf of ``tree`` varies over."""
  return frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(tree)))


def tracks_variance(tree: PyTree, axes: Sequence[str]) -> bool:
  """Whether shard_map tracks device variance over ``axes`` (check_vma).

  True when some leaf of ``tree`` (the batch) is marked varying over one of
  ``axes``; then every gradient must be taken at `make_local` weights.
  """
  return bool(set(axes) & tree_varying_axes(tree))


def make_local(tree: PyTree, axes: Sequence[str], tracked: bool) -> PyTree:
  """``tree`` marked device-varying over ``axes`` (when ``tracked``)."""
  if not tracked:
    return tree

  def cast(x):
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to='varying') if missing else x

  return jax.tree.map(cast, tree)


def mean(tree: PyTree, axes: Sequence[str],
         groups: Optional[Sequence[Sequence[int]]] = None) -> PyTree:
  """The mean of ``tree`` over ``axes`` (within ``groups``); identity if none."""
  if not axes:
    return tree
  return jax.lax.pmean(tree, tuple(axes), axis_index_groups=groups)


def flat_mean(tree: PyTree, axes: Sequence[str]) -> PyTree:
  """The mean over ``axes`` in one all-reduce, at least float32 wide.

  The leaves are raveled into one vector first (`jax.lax.pmean` of a tree
  is one all-reduce per leaf) and come back float32 (or wider).
  """
  if not axes:
    return jax.tree.map(tree_math.wide, tree)
  flat, unravel = flatten_util.ravel_pytree(jax.tree.map(tree_math.wide, tree))
  return unravel(jax.lax.pmean(flat, tuple(axes)))


def check_groups(owner: str, axis: Hashable,
                 groups: Sequence[Sequence[int]]) -> None:
  """``groups`` must cover every index of ``axis`` (inside pmap/shard_map)."""
  size = jax.lax.axis_size(axis)
  covered = sum(len(g) for g in groups)
  if covered != size:
    raise ValueError(
        f'{owner}: groups={groups} cover {covered} devices, but axis'
        f' {axis!r} has {size}. Give groups that split the indices'
        f' 0..{size - 1} into equal parts, e.g.'
        f' {[list(range(i, i + 2)) for i in range(0, size, 2)]}.')
