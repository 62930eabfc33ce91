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

from sam_optax._src.core import batching
from sam_optax._src.core import collectives
from sam_optax._src.core import tree_math
from sam_optax._src.pipeline import layouts
from sam_optax._src.sharpness import checks

PyTree = Any


def nan_where(bad: jax.Array, tree: PyTree) -> PyTree:
  """``tree`` with every floating leaf NaN where ``bad`` (a select)."""
  return jax.tree.map(
      lambda x: jnp.where(bad, jnp.asarray(jnp.nan, x.dtype), x)
      if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else x, tree)


def nan_unless_finite(tree: PyTree, loss: jax.Array) -> PyTree:
  """``tree`` where the loss is finite, NaN everywhere where it is not.

  A NaN (or infinite) loss has no sharpness: every helper returns NaN then,
  never a plausible number computed from a finite gradient.
  """
  return nan_where(~jnp.isfinite(loss), tree)


class Objective:
  """L(w) on one batch or averaged over stacked batches, with derivatives.

  Every helper builds one, so the checks of its input live here: params must
  be real floating-point (`check_params`), loss_kwargs a dict, batches an
  iterable of equally shaped dicts, and loss_fn's output a scalar (or
  ``(loss, aux)`` with ``has_aux=True``, `check_loss_output`).

  ``layout=`` (`check_layout`) says where the batch lies. With
  ``PerDevice(axis)`` every loss, gradient and curvature product is averaged
  over the axis in one all-reduce (`jax.lax.pmean`), so each is that of the
  global batch and identical on every device; inside `jax.shard_map` the
  derivatives are taken at parameters marked device-varying first, so that
  autodiff does not sum them over the devices. With ``Chunks(m,
  shared=True)`` each batch is split into chunks of m examples whose values
  are averaged (`batching.over_chunks`).

  Attributes:
    owner: the public helper's name, for error messages.
    num_batches: how many batches are averaged (1 for a single batch).
    layout: the checked layout.
  """

  def __init__(
      self,
      owner: str,
      loss_fn: Callable[..., Any],
      params: PyTree,
      *,
      loss_kwargs: Optional[Mapping[str, Any]] = None,
      batches: Optional[Iterable[Mapping[str, Any]]] = None,
      has_aux: bool = False,
      layout: Any = None,
      unroll: bool = False,
  ):
    checks.check_inputs(owner, loss_fn, params, loss_kwargs, has_aux)
    self.layout = checks.check_layout(owner, layout)
    self.unroll = unroll
    self.owner = owner
    self.loss_fn = loss_fn
    self.has_aux = has_aux
    self.common = dict(loss_kwargs or {})
    if batches is None:
      self.stacked, self.num_batches = None, 1
    else:
      self.stacked, self.num_batches = checks.stack_batches(owner, batches)
      clash = sorted(set(self.common) & set(self.stacked))
      if clash:
        raise ValueError(
            f'{owner}: {clash} given both in loss_kwargs and in every batch;'
            ' loss_kwargs holds the arguments shared by all batches.'
        )
    self._axes = (self.layout.axes if isinstance(
        self.layout, layouts.PerDevice) else ())
    self._chunks = (self.layout if isinstance(self.layout, layouts.Chunks)
                    else getattr(self.layout, 'chunks', None))
    data = (self.common, self.stacked)
    self._tracked = collectives.tracks_variance(data, self._axes)
    checks.check_sharded(owner, self.layout, params, data)

  def local(self, tree: PyTree) -> PyTree:
    """``tree`` marked device-varying (inside shard_map with PerDevice).

    A derivative with respect to replicated weights of a loss on sharded
    data is summed over the devices by autodiff; taken at varying weights
    it is the device's own, which `_mean` then averages.
    """
    return collectives.make_local(tree, self._axes, self._tracked)

  def _kwargs(self, batch):
    return self.common if batch is None else {**self.common, **batch}

  def _on_batch(self, fn: Callable[[dict], PyTree], kwargs: dict) -> PyTree:
    """fn on one batch, or its mean over the batch's chunks (shared Chunks)."""
    if self._chunks is None:
      return fn(kwargs)
    split, mask, num_chunks = batching.split_into_chunks(
        self.owner, kwargs, self._chunks.m, self._chunks.batch_argnames)
    mean, _ = batching.over_chunks(
        lambda chunk: (fn(chunk), ()), split, mask, num_chunks,
        self._chunks.mode, unroll=self.unroll)
    return mean

  def _mean(self, fn: Callable[[dict], PyTree]) -> PyTree:
    """fn(kwargs) on the one batch, or its float32 mean over the batches.

    Averaged over the devices of a `PerDevice` layout: one all-reduce.
    """
    if self.stacked is None:
      out = self._on_batch(fn, self._kwargs(None))
    else:
      out = self._mean_over_batches(fn)
    return collectives.flat_mean(out, self._axes) if self._axes else out

  def _mean_over_batches(self, fn: Callable[[dict], PyTree]) -> PyTree:
    first = jax.tree.map(lambda x: x[0], self.stacked)
    one = lambda b: self._on_batch(fn, self._kwargs(b))
    shapes = jax.eval_shape(one, first)
    init = jax.tree.map(
        lambda s: batching.like_varying(
            jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), s),
        shapes,
    )

    def body(total, batch):
      out = one(batch)
      return jax.tree.map(lambda t, o: t + o.astype(t.dtype), total, out), None

    total, _ = jax.lax.scan(body, init, self.stacked, unroll=self.unroll)
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
    out = self.loss_fn(params, **kwargs)
    return checks.check_loss_output(self.owner, out, self.has_aux).astype(
        jnp.float32)

  def loss(self, params: PyTree) -> jax.Array:
    """L(w) in float32."""
    return self._mean(lambda kw: self.loss_on(params, kw))

  def value_and_grad(self, params: PyTree):
    """(L(w), grad L(w)); the gradient keeps the parameters' dtypes."""
    local = self.local(params)
    loss, grad = self._mean(
        lambda kw: jax.value_and_grad(self.loss_on)(local, kw)
    )
    return loss, tree_math.tree_cast_like(grad, params)

  def grad(self, params: PyTree) -> PyTree:
    return self.value_and_grad(params)[1]

  def hvp(self, params: PyTree, vector: PyTree) -> PyTree:
    """H(w) v by forward-over-reverse differentiation (no Hessian is formed).

    NaN wherever L(w) is not finite (the loss comes with the same pass).
    """
    local, vector = self.local((params, tree_math.tree_cast_like(
        vector, params)))

    def one(kw):
      value_and_grad = lambda p: jax.value_and_grad(self.loss_on)(p, kw)
      (loss, _), (_, hv) = jax.jvp(value_and_grad, (local,), (vector,))
      return loss, hv

    loss, hv = self._mean(one)
    return nan_unless_finite(tree_math.tree_cast_like(hv, params), loss)

  def curvature_product(self, params: PyTree, vector: PyTree,
                        curvature: Any = None) -> PyTree:
    """C(w) v for a curvature (None: the Hessian, `hvp`); NaN like `hvp`."""
    if curvature is None:
      return self.hvp(params, vector)
    local, vector = self.local((params, tree_math.tree_cast_like(
        vector, params)))

    def one(kw):
      return self.loss_on(local, kw), curvature.product(local, vector, kw)

    loss, cv = self._mean(one)
    return nan_unless_finite(tree_math.tree_cast_like(cv, params), loss)


def num_parameters(params: PyTree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))
