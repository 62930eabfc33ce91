"""SAM: sharpness-aware minimization (Foret et al., 2021)."""

from __future__ import annotations

from typing import NamedTuple, Unpack

import jax

from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib


class SAMState(NamedTuple):
  """State of `sam`, `asam`, `gsam`, `wsam`; every state opens with it.

  Every variant's state begins with these four fields and documents only
  its own after them (`bsam`'s has the first three; `decoupled_wsam`'s sits
  in its ``wsam`` field). Each diagnostic is the mean over the perturbation
  groups (the whole batch, a chunk of `Chunks`, a device of `PerDevice`,
  the axis with ``sync=True``); one that is not measured holds 0, never NaN.

  Attributes:
    count: number of updates so far (int32); schedules are evaluated on it.
    perturbed_loss: L(w + eps) at the last update, float32 (the cheap
      variants keep the last SAM step's value on the steps without one).
    grad_norm: ||g0||, the norm of the clean gradient, float32; 0 where the
      variant never reads g0 (`msam` without ``track_cosine``).
    cosine: cos(g0, g) between the clean gradient and the gradient handed
      on, float32; 0 unless built with ``track_cosine=True``.
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array


@transformation.transformation
def sam(
    rho: ScalarOrSchedule = 0.05,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""Sharpness-aware minimization: the gradient at the worst nearby point.

  Given the clean gradient :math:`g_0 = \nabla L(w)` as the incoming
  updates, SAM climbs to the first-order worst point of the L2 ball of
  radius :math:`\rho` and hands on the gradient found there:

  .. math::

    \epsilon = \rho \, \frac{g_0}{\|g_0\|_2}, \qquad
    g = \nabla L(w + \epsilon).

  With ``ascent_steps=k`` the climb is k normalized steps,
  :math:`w_{i+1} = w_i + (\rho/k)\, g_i / \|g_i\|` from :math:`w_0 = w`,
  and :math:`g = \nabla L(w_k)`.

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``; the keyword arguments of
      ``update`` that it accepts are forwarded to it.
    rho: radius of the ball (the total ascent length), a number >= 0 or an
      optax schedule of the step count; 0 hands on :math:`g_0`.
    ascent_steps: k, the number of normalized ascent steps, a static
      int >= 1 (k + 1 gradients a step).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the aux of the
      perturbed passes is dropped.
    perturbation_mask: which parameters are perturbed: None (all), a
      pytree of bools like params, a function ``params -> bools`` or a
      predicate ``(path, leaf) -> bool`` (e.g.
      `sam_optax.normalization_mask`); the norm is over the selected
      leaves and the others stay at w.
    layout: None (one device, the whole batch), `sam_optax.PerDevice`
      (inside `jax.pmap` / `jax.shard_map`: one perturbation per device)
      or `sam_optax.Chunks` (one per chunk, or accumulation with
      ``shared=True``).
    track_cosine: measure the state's ``cosine`` (one more parameter-sized
      buffer, two more passes over the parameters); off, it holds 0.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SAMState`,
    to chain in front of an optax optimizer.

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

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021
    (authors' code: google-research/sam).
  """
  return variant_lib.Variant(
      hyperparams={'rho': rho}, state=SAMState)
