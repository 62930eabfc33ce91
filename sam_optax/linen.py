"""Flax Linen adapter: an ``apply_fn`` and a loss as the transformations' loss.

Importing this module imports flax; ``import sam_optax`` alone does not.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from flax.training import train_state
import optax

from sam_optax._src import adapters

_OWNER = 'sam_optax.linen.loss_fn'


def loss_fn(apply_fn: Callable[..., Any],
            loss: Callable[..., Any]) -> Callable[..., Any]:
  """``loss_fn(params, *, batch_stats, rngs, ...) -> (loss, new_batch_stats)``.

  The model reaches ``loss`` as a function of its inputs, ``model(*inputs,
  **kwargs)``, which is

  .. code-block:: python

    apply_fn({'params': params, 'batch_stats': batch_stats}, *inputs,
             rngs=rngs, mutable=['batch_stats'], **kwargs)

  with the output returned and the updated ``batch_stats`` kept (those of
  the last call). The pair ``(loss, new_batch_stats)`` serves both passes:
  the clean pass takes ``jax.value_and_grad(..., has_aux=True)`` of it and
  stores the new statistics; the transformation, built with
  ``has_aux=True``, drops those of its perturbed pass. The same ``rngs``
  (``{'dropout': key}``) reach both passes, so both draw the same masks.
  Without ``batch_stats`` (None) the model has no mutable collection and the
  aux is None.

  Args:
    apply_fn: the Linen ``module.apply`` (``TrainState.apply_fn``).
    loss: ``loss(model, ...) -> loss``; the arguments after the model come
      by keyword.

  Returns:
    ``loss_fn(params, *, batch_stats=None, rngs=None, ...)`` returning
    ``(loss, new_batch_stats)``, for a transformation built with
    ``has_aux=True`` and for the clean pass.

  Example:
    >>> from flax import linen as nn
    >>> import jax, jax.numpy as jnp
    >>> import optax
    >>> import sam_optax, sam_optax.linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    ...     return nn.Dense(1)(nn.Dropout(0.5, deterministic=not train)(x))
    >>> def loss(model, x):
    ...   return jnp.mean(model(x, train=True) ** 2)
    >>> net = Net()
    >>> x = jnp.linspace(-1, 1, 8).reshape(4, 2)
    >>> variables = net.init(jax.random.key(0), x, train=False)
    >>> sam_loss = sam_optax.linen.loss_fn(net.apply, loss)
    >>> state = sam_optax.linen.TrainState.create(
    ...     apply_fn=net.apply, params=variables['params'],
    ...     batch_stats=variables['batch_stats'],
    ...     tx=optax.chain(sam_optax.sam(sam_loss, has_aux=True),
    ...                    optax.sgd(0.1)))
    >>> @jax.jit
    ... def train_step(state, x, key):
    ...   rngs = {'dropout': jax.random.fold_in(key, state.step)}
    ...   (value, stats), grads = jax.value_and_grad(sam_loss, has_aux=True)(
    ...       state.params, batch_stats=state.batch_stats, rngs=rngs, x=x)
    ...   return state.apply_gradients(grads=grads, batch_stats=stats,
    ...                                loss_kwargs=dict(rngs=rngs, x=x))
    >>> state = train_step(state, x, jax.random.key(1))
    >>> int(state.step)
    1
  """
  parameters = adapters.loss_parameters(_OWNER, loss,
                                        reserved=('batch_stats', 'rngs'))

  def sam_loss(params, batch_stats=None, rngs=None, **kwargs):
    variables = {'params': params}
    if batch_stats is not None:
      variables['batch_stats'] = batch_stats
    mutable = ['batch_stats'] if batch_stats is not None else False
    new_stats = [batch_stats]

    def model(*inputs, **model_kwargs):
      out = apply_fn(variables, *inputs, rngs=rngs, mutable=mutable,
                     **model_kwargs)
      if not mutable:
        return out
      out, mutated = out
      new_stats[0] = mutated.get('batch_stats', batch_stats)
      return out

    return loss(model, **kwargs), new_stats[0]

  reserved = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                default=None)
              for name in ('batch_stats', 'rngs')]
  return adapters.adapted('linen', sam_loss, loss, [*reserved, *parameters])


class TrainState(train_state.TrainState):
  """A ``TrainState`` with ``batch_stats`` whose update forwards the batch.

  ``apply_gradients(grads=..., loss_kwargs=...)`` calls ``tx.update(grads,
  opt_state, params, batch_stats=<this state's>, **loss_kwargs)``, so a
  sharpness-aware transformation gets the batch, the RNG keys and the
  statistics the clean pass started from; without ``loss_kwargs`` it is
  flax's ``apply_gradients`` (a plain optax ``tx`` works as before). Other
  keywords (``batch_stats=new_stats``) replace fields, as in flax.

  Attributes:
    batch_stats: the running statistics (the ``'batch_stats'`` collection),
      or None.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax
    >>> import sam_optax, sam_optax.linen
    >>> def loss_fn(params, target):
    ...   return jnp.sum((params['w'] - target) ** 2)
    >>> tx = optax.chain(sam_optax.sam(loss_fn, rho=0.1), optax.sgd(0.1))
    >>> state = sam_optax.linen.TrainState.create(
    ...     apply_fn=None, params={'w': jnp.zeros(2)}, tx=tx)
    >>> target = jnp.ones(2)
    >>> grads = jax.grad(loss_fn)(state.params, target)
    >>> state = state.apply_gradients(grads=grads,
    ...                               loss_kwargs=dict(target=target))
    >>> state.params['w']  # 0.1 * 2 (1 + 0.1 / sqrt(2)), SAM's step
    Array([0.21414214, 0.21414214], dtype=float32)
  """

  batch_stats: Any = None

  def apply_gradients(self, *, grads: Any,
                      loss_kwargs: Optional[dict[str, Any]] = None,
                      **kwargs: Any) -> 'TrainState':
    if loss_kwargs is None:
      return super().apply_gradients(grads=grads, **kwargs)
    if self.batch_stats is not None:
      loss_kwargs = {'batch_stats': self.batch_stats, **loss_kwargs}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        **loss_kwargs)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)
