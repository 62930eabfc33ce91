"""SAM: sharpness-aware minimization (Foret et al., 2021)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib


class SAMState(NamedTuple):
  """State of `sam` and `asam`: the step count and diagnostics to log.

  The diagnostics mean the same whatever the layout: each *perturbation
  group* (the whole batch, a chunk of `Chunks`, a device of `PerDevice`, the
  whole axis with ``sync=True``) contributes its own value, and the state
  holds their mean.

  Attributes:
    count: number of updates so far (int32); schedules are evaluated on it.
    perturbed_loss: L(w + eps) at the last update, float32.
    grad_norm: ||g0||, the norm of the clean gradient that built the
      perturbation, float32.
    cosine: cos(g0, g) between that clean gradient and the gradient handed
      on, float32; 0 unless built with ``track_cosine=True``.
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array


@transformation.transformation
def sam(
    loss_fn: Callable[..., Any],
    rho: variant_lib.ScalarOrSchedule = 0.05,
) -> variant_lib.Variant:
  r"""Sharpness-aware minimization: the gradient at the worst nearby point.

  Given the clean minibatch gradient :math:`g_0 = \nabla L(w)` as the incoming
  updates, SAM climbs to the (first-order) worst point of the L2 ball of
  radius :math:`\rho` and returns the gradient found there:

  .. math::

    \epsilon = \rho \, \frac{g_0}{\|g_0\|_2}, \qquad
    g = \nabla L(w + \epsilon).

  With ``ascent_steps=k`` the climb is k normalized steps of length
  :math:`\rho / k`, re-evaluating the gradient at each point:
  :math:`w_{i+1} = w_i + (\rho/k)\, g_i / \|g_i\|`, and
  :math:`g = \nabla L(w_k)`.

  Chain it first, in front of any optax optimizer (then clipping, then the
  optimizer): the optimizer sees the clean weights as ``params``, so weight
  decay acts on :math:`w`, not :math:`w + \epsilon`. The keyword arguments
  given to ``update`` that ``loss_fn`` accepts are forwarded to it (all of
  them if it takes ``**kwargs``), so sam chains with other ExtraArgs
  transformations. Norms are taken in float32; a zero gradient gives a zero
  perturbation; ``rho=0`` is exactly the base optimizer, and a traced rho
  that is negative or NaN (from a schedule or `sam_optax.inject_hyperparams`)
  makes the update NaN rather than being clamped.

  Inside `optax.MultiSteps` the chain runs once per k micro-batches with the
  accumulated gradient and the last micro-batch's keyword arguments: the
  perturbation follows the accumulated gradient but the re-gradient sees the
  last micro-batch only -- neither SAM on the accumulated batch nor
  m-sharpness. For SAM on a batch too large for memory use
  ``layout=sam_optax.Chunks(m, shared=True)`` with the clean gradient from
  `sam_optax.chunked_value_and_grad`, which equals full-batch SAM.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.ones(3)}
    >>> batch = {'x': jnp.eye(3), 'y': jnp.zeros(3)}
    >>> tx = optax.chain(sam_optax.sam(loss_fn, rho=0.05), optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    >>> params = optax.apply_updates(params, updates)
    >>> print(params['w'])
    [0.9314088 0.9314088 0.9314088]

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True`` (aux of the perturbed pass, e.g.
      BatchNorm statistics, is dropped).
    rho: radius of the neighbourhood (total ascent length), a number >= 0 or
      an optax schedule evaluated on this transformation's step count.

  **Options every variant takes** (keyword-only; the pipeline adds them to
  each factory, so they mean the same everywhere):

  - ``ascent_steps`` -- the number of normalized ascent steps (k >= 1).
  - ``has_aux`` -- whether ``loss_fn`` returns ``(loss, aux)``.
  - ``perturbation_mask`` -- which parameters are perturbed: None (all), a
    pytree of bools like params, a function ``params -> pytree of bools``
    (as `optax.masked` takes) or a predicate ``(path, leaf) -> bool``; the
    norm is taken over the selected leaves only, and the others stay at w
    (SAM-ON, Mueller et al., 2023: perturbing only the normalization
    layers).
  - ``layout`` -- how the step lies over devices and over the batch: None
    (one device, the whole batch), `sam_optax.PerDevice` (inside `jax.pmap`
    / `jax.shard_map`, one perturbation per device) or `sam_optax.Chunks`
    (m-sharpness inside the step, or gradient accumulation with
    ``shared=True``).
  - ``track_cosine`` -- measure the ``cosine`` diagnostic. It keeps g0 alive
    through the second pass (one more parameter-sized buffer) and costs two
    passes over the parameters, so it is off by default and the field is
    0 ("not measured"); ``perturbed_loss`` and ``grad_norm`` are free.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SAMState`.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  del loss_fn  # the pipeline takes it
  return variant_lib.Variant(
      name='sam', hyperparams={'rho': rho}, state=SAMState,
      init=lambda params: SAMState(**variant_lib.initial_diagnostics()))
