"""Which leaves are perturbed: SAM-ON's normalization layers, float leaves."""

from __future__ import annotations

import re
import sys
from typing import Any, Callable, Optional

import jax
import jax.core
import numpy as np

from sam_optax._src.core import directions
from sam_optax._src.core import param_leaves

PyTree = Any

# Flax Linen's automatic names (BatchNorm_0, LayerNorm_2, GroupNorm_1,
# RMSNorm_0, InstanceNorm_0) and the usual hand-given ones (norm, norm1,
# final_norm, bn1, conv_bn, ln_f, ln_2, gn).
NORMALIZATION_PATTERN = r'(?i)norm|(?:^|_)(?:bn|ln|gn)\d*(?:_|$)'


def _names(path) -> list:
  """The keys of a leaf's path; NNX's trailing ``.value`` dropped."""
  names = []
  for key in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        names.append(getattr(key, attribute))
        break
    else:
      names.append(str(key))
  if len(names) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      names[-1] == 'value'):
    names = names[:-1]
  return names


def _nnx_normalization_paths(model) -> list:
  """The paths of the normalization modules of an NNX model, by type."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  kinds = tuple(getattr(nnx, name) for name in (
      'BatchNorm', 'LayerNorm', 'RMSNorm', 'GroupNorm', 'InstanceNorm')
                if hasattr(nnx, name))
  return [tuple(path) for path, node in nnx.iter_graph(model)
          if isinstance(node, kinds)]


def _equinox_normalization_paths(params) -> list:
  """The paths of the Equinox normalization layers in ``params``, by type."""
  eqx = sys.modules.get('equinox')
  if eqx is None:  # not imported: params hold no Equinox module
    return []
  kinds = tuple(getattr(eqx.nn, name) for name in (
      'LayerNorm', 'GroupNorm', 'BatchNorm', 'RMSNorm') if hasattr(eqx.nn,
                                                                    name))
  found = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, kinds))[0]
  return [tuple(path) for path, node in found if isinstance(node, kinds)]


def _nothing_selected(params, pattern: str, model) -> ValueError:
  paths = [jax.tree_util.keystr(path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  shown = ', '.join(paths[:12]) + (f' and {len(paths) - 12} more'
                                   if len(paths) > 12 else '')
  how = ('by type among the NNX modules of model=' if model is not None else
         f'module names matching pattern={pattern!r}, and Equinox'
         ' LayerNorm / GroupNorm / BatchNorm / RMSNorm layers by type')
  return ValueError(
      'normalization_mask: no parameter is a normalization layer\'s, so'
      ' SAM-ON would perturb nothing and train exactly as the base'
      f' optimizer. It looked at the leaves {shown} ({how}). Name the'
      ' normalization modules so that the pattern matches (or pass'
      ' pattern=), give model= for an NNX model, or, for a model without'
      ' normalization layers, use no perturbation_mask.')


def normalization_mask(params: PyTree, *,
                       pattern: str = NORMALIZATION_PATTERN,
                       model: Optional[Any] = None) -> PyTree:
  r"""True for the parameters of normalization layers (SAM-ON), by path.

  SAM-ON (Mueller et al., 2023) perturbs only the normalization layers'
  affine parameters (scale and bias) and reports the same or better
  generalization than SAM, at a smaller cost of the perturbation's norm.
  Pass this function as ``perturbation_mask=`` of any variant: the ascent is
  then :math:`\epsilon_S = \rho\, g_S / \|g_S\|` on the selected leaves S
  (the norm over them only) and the other leaves stay at w::

    tx = optax.chain(
        sam_optax.sam(loss_fn, rho=0.5,
                      perturbation_mask=sam_optax.normalization_mask),
        optax.sgd(0.1, momentum=0.9))

  A leaf is selected when one of the module names on its path (every key
  but the parameter's own name) matches ``pattern`` (`re.search`). The
  default matches Flax Linen's automatic names (``BatchNorm_0``,
  ``LayerNorm_1``, ``GroupNorm_0``, ``RMSNorm_0``) and the usual given
  names (``norm1``, ``final_norm``, ``bn1``, ``ln_f``); for NNX models,
  whose paths are the attribute names you chose, give ``model=`` to select
  by module type (``nnx.BatchNorm``, ``LayerNorm``, ``RMSNorm``,
  ``GroupNorm``) instead:
  ``perturbation_mask=lambda p: sam_optax.normalization_mask(p, model=model)``.
  NNX states (leaves ending in ``.value``) and plain dicts both work, and
  Equinox normalization layers (``eqx.nn.LayerNorm``, ``GroupNorm``,
  ``BatchNorm``, ``RMSNorm``) are selected by type wherever they sit, in
  lists and tuples too. A selection that holds no leaf is an error that
  lists the leaves looked at: SAM-ON would silently be the base optimizer.

  Examples:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
    ...           'LayerNorm_0': {'scale': jnp.ones(4), 'bias': jnp.ones(4)},
    ...           'head': {'kernel': jnp.ones((4, 2))}}
    >>> mask = sam_optax.normalization_mask(params)
    >>> mask['LayerNorm_0'], mask['Dense_0'], mask['head']
    ({'bias': True, 'scale': True}, {'bias': False, 'kernel': False}, {'kernel': False})

  Args:
    params: the parameters (any pytree: Linen's dict, an NNX ``State``).
    pattern: the regular expression a module name must match (used when
      ``model`` is None).
    model: an NNX model; its normalization modules are found by type.

  Returns:
    A pytree of Python bools with the structure of ``params``, at least
    one True.

  References:
    Mueller et al., `Normalization Layers Are All That Sharpness-Aware
    Minimization Needs <https://arxiv.org/abs/2306.04226>`_, NeurIPS 2023.
  """
  if model is not None:
    prefixes = _nnx_normalization_paths(model)

    def selected(path, leaf):
      del leaf
      modules = tuple(_names(path)[:-1])
      return any(modules[:len(p)] == p for p in prefixes)
  else:
    compiled = re.compile(pattern)
    layers = _equinox_normalization_paths(params)

    def selected(path, leaf):
      del leaf
      return any(compiled.search(str(name)) for name in _names(path)[:-1]
                 ) or any(tuple(path[:len(p)]) == p for p in layers)

  mask = jax.tree_util.tree_map_with_path(selected, params)
  if not any(jax.tree.leaves(mask)):
    raise _nothing_selected(params, pattern, model)
  return mask


def _python_bool(owner: str, where: str, value: Any) -> bool:
  """One leaf's choice as a Python bool; a value-dependent one is refused."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f'{owner}: perturbation_mask gave a traced value for {where}: under'
        ' jax.jit a jnp value is traced (even jnp.asarray(True)), so it'
        ' cannot choose the leaves, and a mask cannot depend on the'
        ' parameters\' values. Return Python bools decided from the names,'
        ' shapes and dtypes, e.g. lambda p: jax.tree.map(lambda x: x.ndim >'
        ' 1, p).')
  if np.ndim(value) != 0:
    raise TypeError(
        f'{owner}: perturbation_mask gave an array of shape'
        f' {np.shape(value)} for {where}; a mask holds one bool per'
        ' parameter leaf (a whole leaf is perturbed or not).')
  return bool(value)


def perturbed_leaves(owner: str, mask: Optional[directions.LeafMask]
                     ) -> Callable[[Any], Any]:
  """The perturbation mask the pipeline runs with: ``params -> bools``.

  The user's ``mask`` (None: every leaf; a tree of bools; a function
  ``params -> tree of bools``; a predicate ``(path, leaf) -> bool``), with
  jnp bools turned into Python bools, and integer / bool parameter leaves
  (a step counter kept in params) never perturbed.
  """

  def chosen(params):
    user = mask
    if callable(mask) and not isinstance(mask, dict):
      predicate = mask  # a callable, also inside the lambda below
      # pylint: disable-next=protected-access
      if directions._positional_arity(mask) == 2:
        user = lambda path, leaf: _python_bool(
            owner, jax.tree_util.keystr(path), predicate(path, leaf))
      else:
        given = mask(params)
        try:
          user = jax.tree_util.tree_map_with_path(
              lambda path, _, m: _python_bool(
                  owner, jax.tree_util.keystr(path), m), params, given)
        except ValueError:  # another structure: resolve_mask says so
          user = given
    resolved = directions.resolve_mask(owner, 'perturbation_mask', user,
                                       params)
    return jax.tree.map(lambda keep, p: keep and param_leaves.is_float_leaf(p),
                        resolved, params)

  return chosen
