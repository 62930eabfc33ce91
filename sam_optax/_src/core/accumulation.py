"""The clean gradient accumulated over chunks: for batches that do not fit."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from sam_optax._src.core import batching
from sam_optax._src.core import tree_math
from sam_optax._src.core import validation

PyTree = Any


def chunked_value_and_grad(
    loss_fn: Callable[..., Any],
    chunk_size: int,
    *,
    has_aux: bool = False,
    mode: batching.ChunkMode = batching.SEQUENTIAL,
    batch_argnames: Optional[Sequence[str]] = None,
) -> Callable[..., tuple[Any, PyTree]]:
  r"""``jax.value_and_grad`` accumulated over chunks of m examples.

  For a loss that is a mean over examples, the mean over equal chunks of the
  chunk losses and gradients equals the full-batch loss and gradient, while
  ``'sequential'`` mode holds the activations of one chunk only. This is the
  clean gradient to hand to a transformation with
  ``layout=Chunks(m, shared=True)`` (SAM with gradient accumulation).

  Examples:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> def loss_fn(w, x):
    ...   return jnp.mean((x @ w) ** 2)
    >>> x = jnp.arange(12.0).reshape(6, 2)
    >>> vg = sam_optax.chunked_value_and_grad(loss_fn, chunk_size=2)
    >>> loss, grad = vg(jnp.ones(2), x=x)
    >>> bool(jnp.allclose(grad, jax.grad(loss_fn)(jnp.ones(2), x)))
    True

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar (or
      ``(scalar, aux)`` with ``has_aux=True``).
    chunk_size: m, the examples per chunk; must divide the batch.
    has_aux: whether loss_fn returns ``(loss, aux)``; aux is then returned
      stacked over chunks (leading chunk axis).
    mode: ``'sequential'``, ``'vectorized'`` or `sam_optax.mesh_chunks`.
    batch_argnames: the names of the per-example keyword arguments (None:
      every array with a leading dimension), as in `sam_optax.Chunks`.

  Returns:
    ``f(params, **loss_kwargs) -> (loss, grads)`` (``((loss, aux), grads)``
    with ``has_aux``), loss in float32, grads in the parameters' dtypes.
  """
  owner = 'chunked_value_and_grad'
  validation.check_loss_fn(owner, loss_fn)
  chunk_size = validation.check_static_int(
      owner, 'chunk_size', chunk_size, minimum=1)
  mode = batching.check_mode(owner, mode)
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def fn(params, **loss_kwargs):
    split, mask, chunks = batching.split_into_chunks(
        owner, loss_kwargs, chunk_size, batch_argnames)

    def one(chunk_kwargs):
      out, grads = value_and_grad(params, **chunk_kwargs)
      loss, aux = out if has_aux else (out, None)
      return (jnp.asarray(loss, jnp.float32), grads), aux

    (loss, grads), aux = batching.over_chunks(one, split, mask, chunks, mode)
    grads = tree_math.tree_cast_like(grads, params)
    return ((loss, aux), grads) if has_aux else (loss, grads)

  return fn
