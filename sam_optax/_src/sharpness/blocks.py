r"""Per-layer curvature: a spectral helper on a diagonal block of C.

`selectable` gives a spectral helper two options, ``select=`` and
``per_leaf=``. With the leaves S selected, the helper runs on

.. math::

  L_S(w_S) = L(w_S, w_{\bar S}) \quad (w_{\bar S} \text{ held fixed}),

whose Hessian is the diagonal block :math:`H_{SS}` of H (and whose GGN /
Fisher is the block of G / F): the helper's own code measures it, at the
cost of one full forward and backward pass per product, with derivatives
only for S. ``per_leaf=True`` runs it once per selected leaf (a Python
loop, so one jit-able program) and returns a pytree like params of the
per-leaf results -- PyHessian's layer-wise spectrum in one call.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ParamSpec, TypeVar, cast

import jax
import jax.numpy as jnp

from sam_optax._src.core import directions
from sam_optax._src.core import validation
from sam_optax._src.sharpness import curvature as curvature_lib
from sam_optax._src.sharpness import checks

PyTree = Any
P = ParamSpec('P')
R = TypeVar('R')


class _Block:
  """The leaves ``indices`` of params as a list; the others held fixed."""

  def __init__(self, leaves: list, treedef, indices: list[int]):
    self.leaves, self.treedef, self.indices = leaves, treedef, indices
    self.params = [leaves[i] for i in indices]
    self.structure = jax.tree.structure(self.params)

  def embed(self, block: list) -> PyTree:
    """The full params with the block's leaves replaced by ``block``."""
    full = list(self.leaves)
    for i, x in zip(self.indices, block):
      full[i] = x
    return jax.tree.unflatten(self.treedef, full)

  def pad(self, block: list) -> PyTree:
    """A vector on the block as a tree like params, zero outside it.

    ``block``'s leaves may carry leading axes (k eigenvectors); the zeros
    get the same ones.
    """
    lead = block[0].shape[:block[0].ndim - jnp.ndim(self.params[0])]
    full = [jnp.zeros(lead + jnp.shape(x), block[0].dtype)
            for x in self.leaves]
    for i, x in zip(self.indices, block):
      full[i] = x
    return jax.tree.unflatten(self.treedef, full)

  def restrict(self, loss_fn: Callable[..., Any], curvature: Any):
    """(L_S, the curvature handle of the block)."""
    block_loss = lambda block, **kw: loss_fn(self.embed(block), **kw)
    if isinstance(curvature, curvature_lib.GGN):
      apply_fn = curvature.apply_fn
      curvature = curvature._replace(
          apply_fn=lambda block, **kw: apply_fn(self.embed(block), **kw))
    elif isinstance(curvature, curvature_lib.EmpiricalFisher):
      per_example = curvature.per_example_loss
      curvature = curvature._replace(
          per_example_loss=lambda block, **kw: per_example(
              self.embed(block), **kw))
    return block_loss, curvature

  def result(self, out: Any, unwrap: bool) -> Any:
    """Vectors on the block: padded to params, or the leaf (``unwrap``)."""

    def convert(value):
      if jax.tree.structure(value) != self.structure:
        return value
      return value[0] if unwrap else self.pad(value)

    return type(out)(*[convert(v) for v in out])


def _selected(owner: str, select: Any, leaves: list, params: PyTree):
  mask = jax.tree.leaves(directions.resolve_mask(owner, 'select', select,
                                                 params))
  indices = [i for i, chosen in enumerate(mask)
             if chosen and jnp.size(leaves[i])]
  if not indices:
    raise ValueError(
        f'{owner}: select= selects no (non-empty) leaf of params, so there'
        ' is no curvature block to measure. Select at least one leaf, e.g.'
        " select=lambda path, leaf: 'kernel' in jax.tree_util.keystr(path),"
        ' or drop select= to measure every leaf.')
  return indices


def selectable(helper: Callable[P, R]) -> Callable[P, R]:
  """Runs a spectral helper on the blocks that ``select=`` / ``per_leaf=`` ask.

  The helper declares both options (so its signature and docs show them)
  and never reads them: this wrapper consumes them and calls it with the
  defaults, on the whole model or on each block's restricted loss. Type
  checkers see the helper's own signature and result class; with
  ``per_leaf=True`` the result is a pytree like params of them.
  """
  owner = helper.__name__
  run: Callable[..., R] = helper  # called with the options it declares

  @functools.wraps(helper)
  def wrapper(loss_fn, params, *args, select=None, per_leaf=False,
              curvature='hessian', **kwargs):
    validation.check_bool(owner, 'per_leaf', per_leaf)
    if select is None and not per_leaf:
      return run(loss_fn, params, *args, curvature=curvature, **kwargs)
    validation.check_loss_fn(owner, loss_fn)
    checks.check_params(owner, params)
    curvature_lib.check_curvature(owner, curvature)
    leaves, treedef = jax.tree.flatten(params)
    indices = _selected(owner, select, leaves, params)
    groups = [[i] for i in indices] if per_leaf else [indices]
    results = []
    for group in groups:
      block = _Block(leaves, treedef, group)
      block_loss, block_curvature = block.restrict(loss_fn, curvature)
      out = run(block_loss, block.params, *args,
                curvature=block_curvature, **kwargs)
      results.append(block.result(out, unwrap=per_leaf))
    if not per_leaf:
      return results[0]
    per_leaf_results = [None] * len(leaves)
    for group, out in zip(groups, results):
      per_leaf_results[group[0]] = out
    return jax.tree.unflatten(treedef, per_leaf_results)

  return cast(Callable[P, R], wrapper)
