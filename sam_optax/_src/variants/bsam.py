"""bSAM: Bayesian sharpness-aware minimization (Moellenhoff & Khan, 2023)."""

from __future__ import annotations

import functools
from typing import Any, Callable, cast

import jax
import jax.numpy as jnp
import optax

from sam_optax._src.core import inject
from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import groups
from sam_optax._src.pipeline import layouts
from sam_optax._src.pipeline import transformation
from sam_optax._src.variants import bsam_parts as parts
from sam_optax._src.variants import complete
from sam_optax._src.variants.bsam_parts import BSAMState
from sam_optax._src.variants.bsam_parts import noise_like

__all__ = ['BSAMState', 'bsam', 'noise_like']

ScalarOrSchedule = validation.ScalarOrSchedule
_OWNER = parts.OWNER


def _group_means(batch: groups.Batch, layout, precision, num_data, rho, key):
  """`parts.group_step` on every group of ``layout``, averaged over them.

  The groups are the pipeline's (`groups.map_groups`), each with its own
  noise key (``key`` folded with its device's or sync group's index, then
  its chunk's). Returns ``(L(w + rho g / s), g_eps, sqrt(s g^2), ||g||)``,
  the same on every device (`groups.reduce_step`: one all-reduce).
  """
  params, precision = groups.replicated(layout, (batch.params, precision))
  step = lambda group, k: parts.group_step(params, precision, num_data, rho,
                                           group, k)
  (loss, grad_eps, scaled, grad_norm), _ = groups.map_groups(
      layout, step, batch, key=key)
  grad_eps, (loss, grad_norm), scaled = groups.reduce_step(
      layout, grad_eps, (loss, grad_norm), scaled)
  return loss, grad_eps, scaled, grad_norm


@inject.record_annealable
def bsam(
    loss_fn: Callable[..., Any],
    learning_rate: ScalarOrSchedule,
    num_data: float,
    rho: ScalarOrSchedule = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    prior_prec: float = 1.0,
    damping: float = 0.1,
    s_init: float = 1.0,
    *,
    seed: int = 0,
    has_aux: bool = False,
    layout: layouts.Layout = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Bayesian SAM: SAM as a variational (Gaussian) posterior's optimizer.

  bSAM keeps a Gaussian posterior :math:`\mathcal N(w, \mathrm{diag}(1 /
  (N s)))` over the weights and, at every step (all operations
  elementwise, :math:`\delta` = ``prior_prec / num_data``):

  .. math::

    \begin{aligned}
    \theta &= w + \xi / \sqrt{N s}, \quad \xi \sim \mathcal N(0, I),
    \qquad g = \nabla L(\theta), \\
    g_\epsilon &= \nabla L(w + \rho\, g / s), \\
    m &\leftarrow \beta_1 m + (1 - \beta_1)(g_\epsilon + \delta w), \\
    w &\leftarrow w - \alpha\, m / s, \\
    s &\leftarrow \beta_2 s + (1 - \beta_2)(\sqrt{s\, g^2} + d + \delta),
    \end{aligned}

  with the old :math:`s` in the weight update and in the noise. The ascent
  is not normalized: :math:`\rho\, g / s` is SAM's step in the posterior's
  metric. :math:`L` is the mean loss over a minibatch, :math:`N` the size
  of the training set (the authors' ``Ndata``), :math:`d` the damping.

  It is a complete optimizer, like ``optax.adam``: use it alone (or after
  clipping), not behind another one. ``update`` evaluates both gradients
  itself (two forward-backward passes), so the incoming ``updates`` give
  only the structure: pass the clean gradient if you have it, or ``params``
  itself to save a pass. The keyword arguments of ``update`` that
  ``loss_fn`` accepts are forwarded to it. The noise comes from the state's
  key: ``key, sub = jax.random.split(key)`` each step, leaf i of
  :math:`\xi` drawn with ``jax.random.fold_in(sub, i)`` (`noise_like`).

  A step whose gradients, losses or update are not finite, or where a
  traced or scheduled hyperparameter is NaN or out of its interval (those
  of Args below), is skipped: a zero
  update, every state field as it was (the count and the key too, so
  training goes on as if the batch had not been there), and
  ``skipped_steps`` counts it.

  **As the authors' JAX code** (team-approx-bayes/bayesian-sam, ``optim.py``
  ``build_bsam_optimizer``, with their ``wdecay = priorprec / Ndata`` as
  :math:`\delta` and ``lrfactor`` as a schedule of ``learning_rate``).
  **pytorch-optimizer's ``BSAM`` differs** and is not followed: its noise
  has standard deviation, not variance, ``1 / (N s)``; it never restores the
  weights, so the perturbation and the noise stay in them; its momentum
  averages ``weight_decay * g`` instead of the gradient plus
  :math:`\delta w`; and it squares the precision's update.

  **Layouts** (``layout=``, as for every transformation of the library). A
  *group* is what gets one noise sample and one perturbation; for groups
  :math:`k = 1..K` with their own examples and noise :math:`\xi_k`, each
  takes its own :math:`g_k = \nabla L_k(\theta_k)` and
  :math:`g_{\epsilon,k} = \nabla L_k(w + \rho\, g_k / s)`, and the update
  above consumes the means

  .. math::

    g_\epsilon = \tfrac1K \textstyle\sum_k g_{\epsilon,k}, \qquad
    \sqrt{s\, g^2} \to \tfrac1K \textstyle\sum_k \sqrt{s\, g_k^2}.

  This is the authors' m-sharpness: their ``msharpness`` (``--batchsplit``,
  8 in their runs) reshapes the minibatch into that many sub-batches,
  ``jax.vmap`` gives each its own key from ``jax.random.split(rngkey,
  msharpness + 1)``, its own noisy sample, ``g``, ascent and ``g_eps``, and
  averages ``gs = sqrt(s g^2)`` (for the precision) and ``g_eps`` (for the
  momentum) over the sub-batches. They run on one device under ``jax.jit``
  (their m-sharpness "on one GPU"; ``train.py`` has no ``pmap``), so
  `PerDevice` applies the same rule with a device as a group. Here
  ``Chunks(m)`` counts examples per chunk (their batch of 200 in 8 splits
  is ``Chunks(25)``), and the keys differ: each step splits
  ``key, sub = jax.random.split(key)`` and

  * ``None``: one group, the whole batch, noise from ``sub``.
  * ``Chunks(m)``: chunk i of m examples draws its noise from
    ``fold_in(sub, i)``; ``mode='sequential'`` (``lax.scan``, memory of one
    chunk), ``'vectorized'`` (``vmap``, as the authors) or
    `sam_optax.mesh_chunks`. bSAM takes both its gradients on each chunk, so
    chunks cost no extra pass.
  * ``Chunks(m, shared=True)``: one group, noise from ``sub``; ``g``, ``g_eps``
    and the loss accumulated over the chunks (the full batch's, at the memory
    of one chunk).
  * ``PerDevice(axis)`` inside `jax.pmap` / `jax.shard_map`: device d draws
    its noise from ``fold_in(sub, d)`` (d = ``axis_index(axis)``) and takes
    its own ``g`` and ``g_eps`` on its examples; ``g_eps``,
    ``sqrt(s g^2)``, the loss and ``||g||`` are averaged over the axis in
    one all-reduce, so the state stays the same on every device.
    ``sync=True``: one noise sample (from ``sub``) on every device and ``g``
    averaged over the axis before the ascent (one more all-reduce): bSAM on
    the global batch; with ``groups=``, each group of devices draws from
    ``fold_in(sub, group number)`` and averages ``g`` inside the group.
    ``chunks=Chunks(m)`` splits each device's batch again (chunk i of device
    d: ``fold_in(fold_in(sub, d), i)``); ``chunks=Chunks(m, shared=True)``
    accumulates the device's gradients (and composes with ``sync``). Inside
    ``jax.shard_map`` every gradient is taken at weights marked varying over
    the axis; the incoming ``updates`` may be the replicated ``params``.

  ``perturbed_loss`` and ``grad_norm`` are the means over the groups of
  :math:`L_k(w + \rho g_k / s)` and :math:`\|g_k\|`. Only the noise keys and
  the averaged quantities are bSAM's own; the splitting into chunks and the
  device averaging are the library's (`sam_optax.Chunks`,
  `sam_optax.PerDevice`).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]),
    ...          'y': jnp.array([1.0, -1.0])}
    >>> tx = sam_optax.bsam(loss_fn, learning_rate=0.1, num_data=1000,
    ...                     rho=0.01)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params, batch=batch)
    >>> params = optax.apply_updates(params, updates)
    >>> print(state.precision['w'].shape, state.count)
    (3,) 1

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning the mean loss over
      the minibatch, or ``(loss, aux)`` with ``has_aux=True`` (aux dropped).
    learning_rate: the step size (the paper's alpha), a number or a schedule.
    num_data: N, the number of training examples (the posterior's scale).
    rho: the ascent's scale, a number >= 0 or a schedule.
    betas: (beta1, beta2), the momentum's and the precision's decays, in
      [0, 1).
    prior_prec: the Gaussian prior's precision; ``prior_prec / num_data``
      acts as weight decay and in the precision (the authors' default 25).
    damping: added to the precision's update (the authors' default 0.1).
    s_init: the initial precision, > 0.
    seed: the seed of the noise's PRNG key.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    layout: ``None`` (one device, the whole batch, one noise sample), a
      `sam_optax.Chunks` or a `sam_optax.PerDevice` (see Layouts above).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `BSAMState`.

  References:
    Moellenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  validation.check_loss_fn(_OWNER, loss_fn)
  beta1, beta2 = parts.split_betas(betas)
  hyperparams = dict(learning_rate=learning_rate, rho=rho, num_data=num_data,
                     beta1=beta1, beta2=beta2, prior_prec=prior_prec,
                     damping=damping, s_init=s_init)
  parts.check_hyperparams(hyperparams)
  validation.check_bool(_OWNER, 'has_aux', has_aux)
  layout = layouts.check_layout(_OWNER, layout)
  scalar_loss = validation.checked_scalar_loss(_OWNER, loss_fn, has_aux)
  accepted = transformation.forwarded_names(loss_fn)
  constants = {name: parts.as_float32(value)
               for name, value in hyperparams.items()
               if name not in parts.SCHEDULABLE}
  beta1, beta2, damp, n = (
      constants[name] for name in ('beta1', 'beta2', 'damping', 'num_data'))
  delta = constants['prior_prec'] / n

  init_fn = functools.partial(parts.initial_state, s_init=s_init, seed=seed)

  def update_fn(updates, state, params=None, **extra_args):
    validation.check_params_given(_OWNER, params)
    validation.check_same_tree(_OWNER, updates, params)
    validation.check_state(_OWNER, state, init_fn, params)
    validation.check_real(_OWNER, params)
    lr = parts.value_at(learning_rate, state.count)
    r = parts.value_at(rho, state.count)
    ok = parts.in_bounds({**constants, 'learning_rate': lr, 'rho': r})
    loss_kwargs = {k: v for k, v in extra_args.items()
                   if accepted is None or k in accepted}
    # No clean gradient: each group starts from its own noisy sample.
    batch = groups.Batch(
        _OWNER, None, params, loss_kwargs,
        parts.value_and_grad(scalar_loss, parts.has_float16(params)),
        scalar_loss)
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    loss, grad_eps, scaled, grad_norm = _group_means(
        batch, layout, state.precision, n, r, sub)
    momentum, precision = parts.posterior_step(
        state, grad_eps, scaled, params, beta1, beta2, damp, delta)
    out = jax.tree.map(lambda m, si, u: (-lr * m / si).astype(u.dtype),
                       momentum, state.precision, updates)
    new_state = BSAMState(
        # optax types it as any number; an int32 array in, one out.
        count=cast(jax.Array, optax.safe_increment(state.count)),
        perturbed_loss=jnp.asarray(loss, jnp.float32), grad_norm=grad_norm,
        momentum=momentum, precision=precision,
        key=jax.random.key_data(key), skipped_steps=state.skipped_steps)
    # g is finite exactly when ||g|| is; g_eps enters the momentum.
    ok = ok & tree_math.all_finite((out, new_state))
    return complete.skip_unless_finite(ok, out, state, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
