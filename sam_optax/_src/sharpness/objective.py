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

  Attributes:
    owner: the public helper's name, for error messages.
    num_batches: how many batches are averaged (1 for a single batch).
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
  ):
    check_inputs(owner, loss_fn, params, loss_kwargs, has_aux)
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
    out = self.loss_fn(params, **kwargs)
    return check_loss_output(self.owner, out, self.has_aux).astype(
        jnp.float32)

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
    """H(w) v by forward-over-reverse differentiation (no Hessian is formed).

    NaN wherever L(w) is not finite (the loss comes with the same pass).
    """
    vector = tree_math.tree_cast_like(vector, params)

    def one(kw):
      value_and_grad = lambda p: jax.value_and_grad(self.loss_on)(p, kw)
      (loss, _), (_, hv) = jax.jvp(value_and_grad, (params,), (vector,))
      return loss, hv

    loss, hv = self._mean(one)
    return nan_unless_finite(tree_math.tree_cast_like(hv, params), loss)

  def curvature_product(self, params: PyTree, vector: PyTree,
                        curvature: Any = None) -> PyTree:
    """C(w) v for a curvature (None: the Hessian, `hvp`); NaN like `hvp`."""
    if curvature is None:
      return self.hvp(params, vector)
    vector = tree_math.tree_cast_like(vector, params)

    def one(kw):
      return self.loss_on(params, kw), curvature.product(params, vector, kw)

    loss, cv = self._mean(one)
    return nan_unless_finite(tree_math.tree_cast_like(cv, params), loss)


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


def num_parameters(params: PyTree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))
