"""SAM-ON: select the normalization layers' parameters for the perturbation."""

from __future__ import annotations

import re
from typing import Any, Optional

import jax

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
  NNX states (leaves ending in ``.value``) and plain dicts both work.

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
    A pytree of Python bools with the structure of ``params``.

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

    def selected(path, leaf):
      del leaf
      return any(compiled.search(str(name))
                 for name in _names(path)[:-1])

  return jax.tree_util.tree_map_with_path(selected, params)
