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
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

from sam_optax._src.core import batching
from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import groups
from sam_optax._src.pipeline import layouts

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
    check_not_empty(owner, batch, f'batches[{i}]')
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


def device_mean(tree: PyTree, axes: tuple) -> PyTree:
  """The mean of ``tree`` over ``axes`` in one all-reduce.

  The leaves are raveled into one vector first (`jax.lax.pmean` of a tree
  is one all-reduce per leaf), at least float32 wide, as they come back.
  """
  flat, unravel = flatten_util.ravel_pytree(jax.tree.map(tree_math.wide, tree))
  return unravel(jax.lax.pmean(flat, axes))


def check_layout(owner: str, layout: Any) -> layouts.Layout:
  """A helper's ``layout=``: None, PerDevice(axis) or Chunks(m, shared=True).

  A helper measures one loss, so a layout only says where its batch lies:
  `PerDevice` -- sharded over a pmap / shard_map axis, measured on the global
  batch (``sync`` makes no difference; ``groups`` is refused);
  ``Chunks(m, shared=True)`` (alone or as ``PerDevice(..., chunks=)``) -- the
  batch accumulated over chunks of m examples, at the memory of one chunk.
  A per-chunk measurement (``Chunks(m)`` without ``shared``) is
  `m_sharpness`, and the error says so.
  """
  layout = layouts.check_layout(owner, layout)
  if isinstance(layout, layouts.PerDevice) and layout.groups is not None:
    raise ValueError(
        f'{owner}: layout={layout!r}: a helper measures the loss on the whole'
        ' (global) batch of the axis, so groups= has no meaning here. Use'
        f' PerDevice({layout.axis!r}), or call the helper inside each group'
        ' with a pmap / shard_map over the group axis.')
  chunks = layout if isinstance(layout, layouts.Chunks) else getattr(
      layout, 'chunks', None)
  if chunks is not None and not chunks.shared:
    raise ValueError(
        f'{owner}: layout={layout!r} gives every chunk of {chunks.m} examples'
        ' its own measurement, but a helper measures one loss. Use'
        f' Chunks({chunks.m}, shared=True) to accumulate the batch over chunks'
        f' (memory of one chunk), or sharpness.m_sharpness(..., m={chunks.m})'
        ' for the mean of per-chunk measurements.')
  if isinstance(layout, layouts.PerDevice):
    check_bound(owner, layout)
  return layout


def check_bound(owner: str, layout: layouts.PerDevice) -> None:
  """A PerDevice axis must be bound: the helper runs inside pmap/shard_map."""
  for axis in layout.axes:
    try:
      jax.lax.axis_size(axis)
    except NameError as error:
      raise ValueError(
          f'{owner}: layout={layout!r} measures a batch sharded over axis'
          f' {axis!r} of jax.pmap / jax.shard_map, but no such axis is bound'
          ' here. Call the helper inside pmap(..., axis_name=...) /'
          ' shard_map over that axis, or use layout=None on one device.'
      ) from error


def check_loss_output(owner: str, out: Any, has_aux: bool) -> Any:
  """The loss from loss_fn's output; a helper's fix is ``has_aux=`` of it."""
  return validation.check_loss_output(
      owner, out, has_aux, fix=f'pass has_aux={{}} to {owner}')


def check_params(owner: str, params: PyTree, name: str = 'params') -> None:
  """Every leaf real floating-point: complex or integer leaves are refused.

  Norms, dot products and Hessians here are those of real vectors; a complex
  leaf would silently lose its imaginary part (or its conjugation), so it is
  an error that says how to split it into real parts.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(leaf)
    where = f'{name}{jax.tree_util.keystr(path)}'
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise TypeError(
          f'{owner}: {where} is complex ({dtype}); the sharpness helpers'
          ' measure real parameters, and their norms and dot products would'
          ' drop the imaginary part. Split each complex leaf into real parts,'
          " e.g. params = {'re': w.real, 'im': w.imag}, and rebuild"
          " w = params['re'] + 1j * params['im'] inside loss_fn."
      )
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f'{owner}: {where} has dtype {dtype}; every leaf of {name} is'
          ' differentiated, so each must be floating-point (e.g.'
          ' jnp.float32). Pass integer or boolean arguments in loss_kwargs'
          ' (or close over them in loss_fn) instead.'
      )


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
    check_inputs(owner, loss_fn, params, loss_kwargs, has_aux)
    self.layout = check_layout(owner, layout)
    self.unroll = unroll
    self.owner = owner
    self.loss_fn = loss_fn
    self.has_aux = has_aux
    self.common = dict(loss_kwargs or {})
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
    self._axes = (self.layout.axes if isinstance(
        self.layout, layouts.PerDevice) else ())
    self._chunks = (self.layout if isinstance(self.layout, layouts.Chunks)
                    else getattr(self.layout, 'chunks', None))
    data = (self.common, self.stacked)
    self._tracked = bool(self._axes) and any(
        set(self._axes) & groups.varying_axes(x) for x in jax.tree.leaves(data))
    check_sharded(owner, self.layout, params, data)

  def local(self, tree: PyTree) -> PyTree:
    """``tree`` marked device-varying (inside shard_map with PerDevice).

    A derivative with respect to replicated weights of a loss on sharded
    data is summed over the devices by autodiff; taken at varying weights
    it is the device's own, which `_mean` then averages.
    """
    return groups.make_local(tree, self._axes, self._tracked)

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
    return device_mean(out, self._axes) if self._axes else out

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
    return check_loss_output(self.owner, out, self.has_aux).astype(
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


def check_sharded(owner: str, layout: Any, params: PyTree,
                   data: PyTree) -> None:
  """Data sharded over shard_map axes that the layout does not name: error.

  Autodiff with respect to replicated weights would sum the derivatives
  over those axes (not average them), a silently wrong curvature.
  """
  named = set(layout.axes) if isinstance(layout, layouts.PerDevice) else set()
  data_axes = frozenset().union(
      *[groups.varying_axes(x) for x in jax.tree.leaves(data)])
  param_axes = [groups.varying_axes(x) for x in jax.tree.leaves(params)]
  unnamed = sorted(
      (a for a in data_axes - named
       if not all(a in axes for axes in param_axes)), key=str)
  if unnamed:
    axis = unnamed[0] if len(unnamed) == 1 else tuple(unnamed)
    raise ValueError(
        f'{owner}: the batch is sharded over shard_map axis {axis!r} but'
        f' layout={layout!r} does not name it, so the derivatives would be'
        ' summed over the devices. Pass'
        f' layout=sam_optax.PerDevice({axis!r}) to measure the global batch,'
        ' or give each device its own measurement with'
        f" params=jax.lax.pcast(params, {axis!r}, to='varying').")


def check_inputs(owner: str, loss_fn: Any, params: PyTree, loss_kwargs: Any,
                 has_aux: Any) -> None:
  """The checks every helper runs on its common arguments, before tracing."""
  validation.check_loss_fn(owner, loss_fn)
  check_params(owner, params)
  if not isinstance(has_aux, bool):
    raise TypeError(
        f'{owner}: has_aux must be True or False, got {has_aux!r}.')
  if loss_kwargs is not None and not isinstance(loss_kwargs, Mapping):
    raise TypeError(
        f'{owner}: loss_kwargs must be a dict of keyword arguments for'
        f' loss_fn (e.g. loss_kwargs={{"batch": batch}}), got'
        f' {type(loss_kwargs).__name__}.'
    )
  if loss_kwargs is not None:
    check_not_empty(owner, loss_kwargs, 'loss_kwargs')


def check_not_empty(owner: str, kwargs: Mapping[str, Any], name: str) -> None:
  """No array of the loss's keyword arguments with a leading dimension of 0.

  The mean loss of an empty batch is 0 / 0: every helper would measure NaN.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(kwargs))[0]:
    shape = getattr(leaf, 'shape', None)
    if shape is not None and len(shape) > 0 and shape[0] == 0:
      raise ValueError(
          f'{owner}: {name}{jax.tree_util.keystr(path)} has shape'
          f' {tuple(shape)}: an empty batch (leading dimension 0) has no loss'
          ' to measure (its mean is 0 / 0). Pass a batch with at least one'
          ' example, and drop empty batches (e.g. a last batch of a'
          ' drop_remainder=False loader) before the call.')


def num_parameters(params: PyTree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))
