"""Equinox adapter: an Equinox ``loss(model, ...)`` as the transformations' loss.

Importing this module imports equinox; ``import sam_optax`` alone does not.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx

from sam_optax._src import adapters

_OWNER = 'sam_optax.equinox.loss_fn'


def loss_fn(loss: Callable[..., Any], model: Any,
            filter_spec: Any = eqx.is_array) -> Callable[..., Any]:
  """The transformations' ``loss_fn(params, ...)`` from an Equinox loss.

  With ``static = eqx.filter(model, filter_spec, inverse=True)`` (the
  model's structure, functions and sizes, taken once here), the returned
  function evaluates

  .. math::

    \\text{loss\\_fn}(w, \\ldots) = \\text{loss}(\\text{eqx.combine}(w,
      \\text{static}), \\ldots)

  for ``w = eqx.filter(model, filter_spec)`` (the optimizer's params) or
  SAM's ``w + eps``. Every keyword goes on to ``loss``: a dropout ``key``
  given to ``tx.update`` reaches both passes (the same mask), and an
  ``eqx.nn.State`` of running statistics given as ``state=`` is the one
  the clean pass started from; with ``has_aux=True`` the transformation
  drops the perturbed pass's ``(loss, new_state)`` aux, so the statistics
  are the clean pass's.

  Args:
    loss: ``loss(model, ...) -> loss`` (or ``(loss, aux)``), written the
      Equinox way; the arguments after the model come by keyword.
    model: the model (any version of it: only its static part is kept).
    filter_spec: which leaves are the parameters (``eqx.is_array``, as in
      ``eqx.filter(model, eqx.is_array)``).

  Returns:
    ``loss_fn(params, ...)`` for `sam_optax.sam` and the other
    transformations.

  Example:
    >>> import equinox as eqx
    >>> import jax, jax.numpy as jnp
    >>> import optax
    >>> import sam_optax, sam_optax.equinox
    >>> def loss(model, x):
    ...   return jnp.mean(jax.vmap(model)(x) ** 2)
    >>> model = eqx.nn.Linear(2, 1, key=jax.random.key(0))
    >>> tx = optax.chain(sam_optax.sam(sam_optax.equinox.loss_fn(loss, model)),
    ...                  optax.sgd(0.1))
    >>> opt_state = tx.init(eqx.filter(model, eqx.is_array))
    >>> @eqx.filter_jit
    ... def train_step(model, opt_state, x):
    ...   value, grads = eqx.filter_value_and_grad(loss)(model, x)
    ...   updates, opt_state = tx.update(
    ...       grads, opt_state, eqx.filter(model, eqx.is_array), x=x)
    ...   return eqx.apply_updates(model, updates), opt_state, value
    >>> x = jnp.ones((4, 2))
    >>> model, opt_state, first = train_step(model, opt_state, x)
    >>> model, opt_state, second = train_step(model, opt_state, x)
    >>> bool(second < first)
    True
  """
  parameters = adapters.loss_parameters(_OWNER, loss, reserved=())
  static = eqx.filter(model, filter_spec, inverse=True)

  def sam_loss(params, **kwargs):
    return loss(eqx.combine(params, static), **kwargs)

  return adapters.adapted('equinox', sam_loss, loss, parameters)
