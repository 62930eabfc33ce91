"""Which parameter leaves train: arrays only, integer / bool ones carried."""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.core
import jax.numpy as jnp
import numpy as np


def is_float_leaf(leaf: Any) -> bool:
  """Whether a parameter leaf is trained: a real or complex float array."""
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def check_params_are_arrays(owner: str, params: Any) -> None:
  """A Python number among the parameters is an error that names it."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, (numbers.Number, np.generic)):
      raise TypeError(
          f'{owner}: parameter {jax.tree_util.keystr(path)} is a Python'
          f' {type(leaf).__name__} ({leaf!r}), not an array. Make every'
          ' parameter an array, e.g. params = jax.tree.map(jnp.asarray,'
          ' params), or close over a constant in loss_fn.')


def check_param_leaves(owner: str, updates: Any, params: Any) -> None:
  """Every parameter an array; no float0 gradient (optax takes none either).

  Integer and bool leaves (a step counter kept in params) are carried
  through, as optax carries them: not perturbed, their incoming gradient
  handed on unchanged. A float0 gradient -- what ``jax.grad(...,
  allow_int=True)`` gives for them -- is refused, since optax's own
  transformations (``optax.sgd``, ``optax.adam``) cannot take it.
  """
  check_params_are_arrays(owner, params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    if getattr(leaf, 'dtype', None) == jax.dtypes.float0:
      raise TypeError(
          f'{owner}: the gradient of parameter {jax.tree_util.keystr(path)}'
          ' has dtype float0 (jax.grad(..., allow_int=True) of an integer or'
          ' bool leaf), which optax cannot take either (optax.sgd fails on'
          ' it). Give such a leaf a zero gradient of its own dtype and it is'
          ' carried through untouched: grads = jax.tree.map(lambda g, p:'
          ' jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g, grads,'
          ' params); or keep the counter out of params.')


def value_and_grad(loss: Callable[..., jax.Array]) -> Callable[..., Any]:
  """`jax.value_and_grad` of ``loss``; integer / bool leaves get a zero.

  The gradient of a non-float leaf is float32 zeros (never float0), so the
  pieces treat it as a parameter that does not move.
  """
  both = jax.value_and_grad(loss, allow_int=True)

  def value_and_gradient(params, *args):
    value, grad = both(params, *args)
    return value, jax.tree.map(
        lambda g, p: jnp.zeros(jnp.shape(p), jnp.float32)
        if g.dtype == jax.dtypes.float0 else g, grad, params)

  return value_and_gradient


def _has_non_float(params: Any) -> bool:
  return params is not None and not all(
      is_float_leaf(p) for p in jax.tree.leaves(params))


def float_gradient(updates: Any, params: Any) -> Any:
  """The gradient the pieces see: float32 zeros on integer / bool leaves."""
  if not _has_non_float(params):
    return updates
  return jax.tree.map(lambda g, p: g if is_float_leaf(p) else jnp.zeros(
      jnp.shape(p), jnp.float32), updates, params)


def carry_non_float(out: Any, updates: Any, params: Any) -> Any:
  """The incoming gradient of every integer / bool leaf, handed on as is."""
  if not _has_non_float(params):
    return out
  return jax.tree.map(lambda o, g, p: o if is_float_leaf(p) else g, out,
                      updates, params)
