"""Filter-normalized random directions (Li et al.) for loss landscapes."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.sharpness import checks

PyTree = Any


def filter_normalized_direction(
    params: PyTree,
    key: Optional[jax.Array] = None,
    *,
    filter_axis: int = -1,
    ignore_1d: bool = True,
) -> PyTree:
  r"""A random Gaussian direction, filter-normalized to the weights' scale.

  For every leaf with two or more axes, each filter :math:`d_{i}` (the
  slice at index i along ``filter_axis``: an output unit of a Flax
  ``Dense`` kernel ``(in, out)`` or ``Conv`` kernel ``(h, w, in, out)``) is
  rescaled to the norm of the matching weight filter:

  .. math::

    d_{i} \leftarrow \frac{d_{i}}{\|d_{i}\|} \, \|w_{i}\|.

  Leaves with at most one axis (biases, normalization scales) get a zero
  direction (``ignore_1d=True``, Li et al.'s ``ignore='biasbn'``) or the
  weights themselves (``ignore_1d=False``, as in their code).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> params = {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}
    >>> d = sharpness.filter_normalized_direction(params, jax.random.key(0))
    >>> print(jnp.linalg.norm(d['kernel'], axis=0).round(4), d['bias'])
    [1.7321 1.7321] [0. 0.]

  Args:
    params: the weights w.
    filter_axis: the axis that indexes filters (output units); -1 for Flax
      and Equinox-style kernels, 0 for PyTorch-style ``(out, in, ...)``.
    ignore_1d: zero direction for leaves with ndim <= 1 (else d = w there).

  Returns:
    A float32 pytree like params; NaN in the filters of NaN weights.

  Raises:
    TypeError: params with a complex leaf (split it into real parts,
      ``{'re': w.real, 'im': w.imag}``) or an integer leaf.

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.
  """
  checks.check_params('filter_normalized_direction', params)
  key = checks.resolve_key(key)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = []
  for k, p in zip(keys, leaves):
    p = tree_math.wide(jnp.asarray(p))
    if p.ndim <= 1:
      out.append(jnp.zeros(p.shape, jnp.float32) if ignore_1d
                 else p.astype(jnp.float32))
      continue
    d = jax.random.normal(k, p.shape, jnp.float32)
    axis = filter_axis % p.ndim
    other = tuple(a for a in range(p.ndim) if a != axis)
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=other, keepdims=True))
    p_norm = jnp.sqrt(jnp.sum(jnp.square(p.astype(jnp.float32)), axis=other,
                              keepdims=True))
    out.append(d * p_norm * tree_math.safe_inverse(d_norm))
  return jax.tree.unflatten(treedef, out)


def random_direction(owner: str, params: PyTree, key: Optional[jax.Array],
                     filter_axis: int, ignore_1d: bool) -> PyTree:
  """`filter_normalized_direction`; an error when it would be all zeros."""
  if ignore_1d and all(jnp.ndim(p) <= 1 for p in jax.tree.leaves(params)):
    raise ValueError(
        f'{owner}: every leaf of params has at most one axis, and'
        ' ignore_1d=True gives such leaves (biases, norm scales) a zero'
        ' direction, so every direction was zeroed and the landscape would'
        ' be perfectly flat. Pass ignore_1d=False (the direction is then'
        ' the weights themselves there), or give directions explicitly.')
  return filter_normalized_direction(
      params, key, filter_axis=filter_axis, ignore_1d=ignore_1d)
