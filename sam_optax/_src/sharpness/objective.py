r"""The loss that every sharpness helper measures: one batch, or many averaged.

Every helper takes ``loss_kwargs`` (the loss's keyword arguments for one batch)
and ``batches`` (an iterable of such dicts). With ``batches`` the helper
measures the *dataset* loss

.. math::

  L_D(w) = \frac{1}{B} \sum_{b=1}^{B} L(w; \text{batch}_b),

so its gradient, its Hessian-vector products and its landscape are the
averages of the per-batch ones; ``loss_kwargs`` then holds the keyword
arguments shared by every batch (e.g. ``train=False``). The batches are
stacked along a new leading axis and scanned with `jax.lax.scan`, so every
helper stays a pure, jit-able function. This is the one mechanism through
which every helper averages over data.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation

PyTree = Any


def resolve_key(key: Optional[jax.Array]) -> jax.Array:
  """The given PRNG key, or a fixed default (results are deterministic)."""
  return jax.random.key(0) if key is None else key


def stack_batches(owner: str, batches: Iterable[Mapping[str, Any]]):
  """Stacks an iterable of batch dicts into one dict with a leading axis."""
  if isinstance(batches, Mapping):
    raise TypeError(
        f'{owner}: batches must be an iterable of dicts of loss keyword'
        ' arguments (one dict per batch), got a single dict. For one batch,'
        ' pass it as loss_kwargs=... instead.'
    )
  try:
    batch_list = list(batches)
  except TypeError as error:
    raise TypeError(
        f'{owner}: batches must be an iterable of dicts, got'
        f' {type(batches).__name__}.'
    ) from error
  if not batch_list:
    raise ValueError(
        f'{owner}: batches is empty, so there is no loss to average. Pass at'
        ' least one batch (a dict of loss keyword arguments), or use'
        ' loss_kwargs=... for a single batch.'
    )
  for i, batch in enumerate(batch_list):
    if not isinstance(batch, Mapping):
      raise TypeError(
          f'{owner}: batch {i} is a {type(batch).__name__}, not a dict of'
          ' loss keyword arguments (e.g. {"batch": {...}} or {"x": x, "y": y}).'
      )
  first = jax.tree.structure(dict(batch_list[0]))
  first_shapes = [jnp.shape(x) for x in jax.tree.leaves(dict(batch_list[0]))]
  for i, batch in enumerate(batch_list[1:], start=1):
    if jax.tree.structure(dict(batch)) != first:
      raise ValueError(
          f'{owner}: batch {i} has a different structure from batch 0:'
          f' {jax.tree.structure(dict(batch))} vs {first}.'
      )
    shapes = [jnp.shape(x) for x in jax.tree.leaves(dict(batch))]
    if shapes != first_shapes:
      raise ValueError(
          f'{owner}: batch {i} has shapes {shapes} but batch 0 has'
          f' {first_shapes}; batches are stacked, so they must have equal'
          ' shapes. Drop the last incomplete batch (drop_last / drop_remainder)'
          ' or pad it.'
      )
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[dict(b) for b in batch_list])
  return stacked, len(batch_list)


class Objective:
  """L(w) on one batch or averaged over stacked batches, with derivatives.

  Attributes:
    owner: the public helper's name, for error messages.
    num_batches: how many batches are averaged (1 for a single batch).
  """

  def __init__(
      self,
      owner: str,
      loss_fn: Callable[..., Any],
      *,
      loss_kwargs: Optional[Mapping[str, Any]] = None,
      batches: Optional[Iterable[Mapping[str, Any]]] = None,
      has_aux: bool = False,
  ):
    validation.check_loss_fn(owner, loss_fn)
    if not isinstance(has_aux, bool):
      raise TypeError(f'{owner}: has_aux must be a bool, got {has_aux!r}.')
    if loss_kwargs is not None and not isinstance(loss_kwargs, Mapping):
      raise TypeError(
          f'{owner}: loss_kwargs must be a dict of keyword arguments for'
          f' loss_fn, got {type(loss_kwargs).__name__}.'
      )
    self.owner = owner
    self.loss_fn = loss_fn
    self.has_aux = has_aux
    self.common = dict(loss_kwargs or {})
    self._scalar_loss = validation.checked_scalar_loss(owner, loss_fn, has_aux)
    if batches is None:
      self.stacked, self.num_batches = None, 1
    else:
      self.stacked, self.num_batches = stack_batches(owner, batches)
      clash = sorted(set(self.common) & set(self.stacked))
      if clash:
        raise ValueError(
            f'{owner}: {clash} given both in loss_kwargs and in every batch;'
            ' loss_kwargs holds the arguments shared by all batches.'
        )

  def _kwargs(self, batch):
    return self.common if batch is None else {**self.common, **batch}

  def _mean(self, fn: Callable[[dict], PyTree]) -> PyTree:
    """fn(kwargs) on the one batch, or its float32 mean over the batches."""
    if self.stacked is None:
      return fn(self._kwargs(None))
    first = jax.tree.map(lambda x: x[0], self.stacked)
    shapes = jax.eval_shape(lambda b: fn(self._kwargs(b)), first)
    init = jax.tree.map(
        lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
        shapes,
    )

    def body(total, batch):
      out = fn(self._kwargs(batch))
      return jax.tree.map(lambda t, o: t + o.astype(t.dtype), total, out), None

    total, _ = jax.lax.scan(body, init, self.stacked)
    inverse = 1.0 / self.num_batches
    return jax.tree.map(
        lambda t, s: (t * inverse).astype(
            s.dtype if not jnp.issubdtype(s.dtype, jnp.floating)
            else jnp.promote_types(s.dtype, jnp.float32)
        ),
        total,
        shapes,
    )

  def loss_on(self, params: PyTree, kwargs: Mapping[str, Any]) -> jax.Array:
    return self._scalar_loss(params, kwargs).astype(jnp.float32)

  def loss(self, params: PyTree) -> jax.Array:
    """L(w) in float32."""
    return self._mean(lambda kw: self.loss_on(params, kw))

  def value_and_grad(self, params: PyTree):
    """(L(w), grad L(w)); the gradient keeps the parameters' dtypes."""
    loss, grad = self._mean(
        lambda kw: jax.value_and_grad(self.loss_on)(params, kw)
    )
    return loss, tree_math.tree_cast_like(grad, params)

  def grad(self, params: PyTree) -> PyTree:
    return self.value_and_grad(params)[1]

  def hvp(self, params: PyTree, vector: PyTree) -> PyTree:
    """H(w) v by forward-over-reverse differentiation (no Hessian is formed)."""
    vector = tree_math.tree_cast_like(vector, params)

    def one(kw):
      grad_fn = lambda p: jax.grad(self.loss_on)(p, kw)
      return jax.jvp(grad_fn, (params,), (vector,))[1]

    return tree_math.tree_cast_like(self._mean(one), params)


def num_parameters(params: PyTree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))
