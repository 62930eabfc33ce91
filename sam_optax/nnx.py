"""Flax NNX adapter: an NNX ``loss(model, ...)`` as the transformations' loss.

Importing this module imports flax; ``import sam_optax`` alone does not.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

from flax import nnx
import jax
import numpy as np

from sam_optax._src import adapters

_OWNER = 'sam_optax.nnx.loss_fn'


@jax.tree_util.register_pytree_node_class
class Snapshot:
  """A model's graph and its whole state (plain arrays) at one moment.

  The arrays are the pytree's leaves; the graph and their shapes are static.

  Attributes:
    graphdef: the model's ``nnx.GraphDef``.
    state: its ``nnx.State``, every variable (parameters, running
      statistics, RNG keys and counts) as a plain array.
  """

  def __init__(self, graphdef: Any, state: Any,
               shapes: Optional[tuple[tuple[int, ...], ...]] = None):
    self.graphdef = graphdef
    self.state = state
    self.shapes: tuple[tuple[int, ...], ...] = (
        shapes if shapes is not None
        else tuple(np.shape(x) for x in jax.tree.leaves(state)))

  def tree_flatten(self) -> tuple[tuple[Any], tuple[Any, Any]]:
    return (self.state,), (self.graphdef, self.shapes)

  @classmethod
  def tree_unflatten(cls, aux: tuple[Any, Any],
                     children: Sequence[Any]) -> Snapshot:
    graphdef, shapes = aux
    return cls(graphdef, children[0], shapes)

  def model(self, params: Any) -> Any:
    """A new model: this snapshot with ``params`` in place of its own."""
    got = tuple(np.shape(x) for x in jax.tree.leaves(self.state))
    if got != self.shapes:
      raise ValueError(
          f'{_OWNER}: the snapshot reached the loss with other shapes than it'
          ' was taken with: a chunk layout split it as if it were per-example'
          " data. Name the per-example arguments, e.g."
          " sam_optax.Chunks(m, batch_argnames=('batch',)).")
    model = nnx.merge(self.graphdef, self.state)
    nnx.update(model, params)
    return model


def snapshot(model: nnx.Module) -> Snapshot:
  """The model as it is now, for the perturbed pass; take it before the clean.

  SAM's perturbed pass at w + eps must see the model the clean pass saw: the
  same RNG counts (hence the same dropout masks) and the same running
  statistics. The clean pass, ``nnx.value_and_grad(loss)(model, ...)``,
  advances the model's RNG counts and updates its statistics in place, so
  the snapshot is taken before it and handed to ``optimizer.update(...,
  snapshot=before)``. The perturbed pass runs on a copy built from it, whose
  updated statistics and counts are dropped: the model keeps the clean
  pass's.

  Args:
    model: an ``nnx.Module`` (or any graph node), inside or outside
      ``nnx.jit``.

  Returns:
    A `Snapshot`, a pytree: its arrays are the model's variables (shapes as
    in the model, no copy under jit); graph and shapes are static.

  Example:
    >>> from flax import nnx
    >>> import sam_optax.nnx
    >>> model = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
    >>> before = sam_optax.nnx.snapshot(model)
    >>> int(before.state['rngs']['count'])
    0
  """
  graphdef, state = nnx.split(model)
  return Snapshot(graphdef, nnx.as_pure(state))


def loss_fn(loss: Callable[..., Any]) -> Callable[..., Any]:
  """The transformations' ``loss_fn(params, *, snapshot, ...)`` from an NNX loss.

  With ``before = snapshot(model)`` taken before the clean pass, the
  returned function evaluates

  .. math::

    \\text{loss\\_fn}(w, \\text{snapshot}=s, \\ldots) = \\text{loss}(
      \\text{merge}(s)[\\text{params} \\leftarrow w], \\ldots)

  on a fresh model built from ``s`` with ``w`` in place of the parameters
  that ``nnx.Optimizer`` holds (its ``wrt``). Dropout in that pass draws
  the keys the clean pass drew (the same RNG counts), and its running
  statistics and RNG counts are dropped, so the model keeps the clean
  pass's. Every other keyword goes on to ``loss``.

  Args:
    loss: ``loss(model, ...) -> loss`` (or ``(loss, aux)`` with
      ``has_aux=True`` on the transformation), written the NNX way; the
      arguments after the model come by keyword.

  Returns:
    ``loss_fn(params, *, snapshot, ...)`` for `sam_optax.sam` and the other
    transformations; with ``nnx.Optimizer`` pass
    ``optimizer.update(model, grads, snapshot=before, batch=batch)``.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import sam_optax, sam_optax.nnx
    >>> def loss(model, x):
    ...   return jnp.mean(model(x) ** 2)
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> tx = optax.chain(sam_optax.sam(sam_optax.nnx.loss_fn(loss)),
    ...                  optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x):
    ...   before = sam_optax.nnx.snapshot(model)
    ...   value, grads = nnx.value_and_grad(loss)(model, x)
    ...   optimizer.update(model, grads, snapshot=before, x=x)
    ...   return value
    >>> x = jnp.ones((4, 2))
    >>> bool(train_step(model, optimizer, x) > train_step(model, optimizer, x))
    True
  """
  parameters = adapters.loss_parameters(_OWNER, loss, reserved=('snapshot',))

  def sam_loss(params, snapshot=None, **kwargs):  # pylint: disable=redefined-outer-name
    if not isinstance(snapshot, Snapshot):
      raise TypeError(
          f'{_OWNER}: the loss needs snapshot=, the model as it was before'
          ' the clean pass, got'
          f' {"nothing" if snapshot is None else type(snapshot).__name__}.'
          ' Take `before = sam_optax.nnx.snapshot(model)` before'
          ' nnx.value_and_grad and pass `optimizer.update(model, grads,'
          ' snapshot=before, batch=batch)`.')
    return loss(snapshot.model(params), **kwargs)

  reserved = inspect.Parameter('snapshot', inspect.Parameter.KEYWORD_ONLY,
                               default=None)
  return adapters.adapted('nnx', sam_loss, loss, [reserved, *parameters])
