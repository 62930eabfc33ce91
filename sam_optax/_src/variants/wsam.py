"""WSAM: weighted sharpness as a regularization term (Yue et al., 2023)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import bounds
from sam_optax._src.variants import sam as sam_lib

ScalarOrSchedule = variant_lib.ScalarOrSchedule


PyTree = Any


class WSAMState(NamedTuple):
  """State of the sharpness part of a decoupled `wsam`.

  Attributes:
    count: number of updates so far (int32).
    perturbed_loss: L(w + eps) at the last update, float32.
    grad_norm: ||g0||, the norm of the last clean gradient, float32.
    cosine: cos(g0, g) between the clean gradient and the gradient handed to
      the base optimizer (g0 itself, so 1 unless g0 = 0); NaN unless built
      with ``track_cosine=True``.
    sharpness: alpha (g1 - g0), the weighted sharpness gradient of the last
      update that the decoupled step applies with the learning rate, a float32
      tree like ``params``; zero where rho = 0.
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  sharpness: PyTree


class DecoupledWSAMState(NamedTuple):
  """State of a decoupled `wsam`: its sharpness part and the base optimizer's.

  Attributes:
    wsam: the `WSAMState` (diagnostics and the sharpness gradient).
    base: the base optimizer's state.
  """

  wsam: WSAMState
  base: Any


def _alpha(ctx: variant_lib.Context) -> jax.Array:
  """gamma / (1 - gamma); NaN for a traced gamma >= 1."""
  gamma = ctx.hyperparams['gamma']
  below = gamma < 1.0
  return jnp.where(below, gamma / jnp.where(below, 1.0 - gamma, 1.0), jnp.nan)


def _coupled(ctx: variant_lib.Context) -> variant_lib.Step:
  """alpha g1 + (1 - alpha) g0, as g0 + alpha (g1 - g0)."""
  loss, perturbed = ctx.perturbed()
  clean = jax.tree.map(tree_math.wide, ctx.clean_grad)
  out = tree_math.tree_add_scaled(clean, _alpha(ctx),
                                  tree_math.tree_sub(perturbed, clean))
  return variant_lib.Step(out, loss, ctx.state)


def _decoupled(ctx: variant_lib.Context) -> variant_lib.Step:
  """Hands on g0; keeps alpha (g1 - g0) (zero where rho = 0)."""
  loss, perturbed = ctx.perturbed()
  zero_rho, alpha = ctx.hyperparams['rho'] == 0, _alpha(ctx)
  sharpness = jax.tree.map(lambda d: jnp.where(zero_rho, 0.0, alpha * d),
                           tree_math.tree_sub(perturbed, ctx.clean_grad))
  return variant_lib.Step(ctx.clean_grad, loss,
                          ctx.state._replace(sharpness=sharpness))


@transformation.transformation
def _sharpness_part(loss_fn, rho: ScalarOrSchedule, gamma: ScalarOrSchedule,
                    decouple: bool) -> variant_lib.Variant:
  del loss_fn
  bounds.check_below('wsam', 'gamma', gamma, 1.0, inclusive=False)
  if not decouple:
    return variant_lib.Variant(
        name='wsam', hyperparams={'rho': rho, 'gamma': gamma},
        state=sam_lib.SAMState, combine=_coupled,
        init=lambda params: sam_lib.SAMState(
            **variant_lib.initial_diagnostics()))
  return variant_lib.Variant(
      name='wsam', hyperparams={'rho': rho, 'gamma': gamma},
      state=WSAMState, combine=_decoupled, agree={'sharpness': 'mean'},
      init=lambda params: WSAMState(**variant_lib.initial_diagnostics(),
                                    sharpness=tree_math.float32_zeros_like(
                                        params)))


def _learning_rate(learning_rate, count, base_state):
  """The learning rate of this step: given, or the base's injected one."""
  if learning_rate is not None:
    value = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(value, jnp.float32)
  has_rate = lambda x: 'learning_rate' in (getattr(x, 'hyperparams', None)
                                            or {})
  injected = [x.hyperparams['learning_rate'] for x in jax.tree.leaves(
      base_state, is_leaf=has_rate) if has_rate(x)]
  if len(injected) != 1:
    raise ValueError(
        'wsam: decouple=True needs the learning rate: pass learning_rate='
        ' (a number or the schedule the base optimizer uses), or build the'
        ' base optimizer with optax.inject_hyperparams so that its state'
        f" holds one 'learning_rate' (found {len(injected)}).")
  injected = injected[0]
  return jnp.asarray(injected, jnp.float32)


def decoupled_step(sharpness_part, base_optimizer, learning_rate):
  """base(g0) - lr * alpha (g1 - g0): the base optimizer, then the SGD step."""
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params):
    state = DecoupledWSAMState(sharpness_part.init(params), base.init(params))
    _learning_rate(learning_rate, state.wsam.count, state.base)  # checks
    return state

  def update_fn(updates, state, params=None, **extra_args):
    clean, wsam_state = sharpness_part.update(updates, state.wsam, params,
                                              **extra_args)
    out, base_state = base.update(clean, state.base, params, **extra_args)
    lr = _learning_rate(learning_rate, state.wsam.count, base_state)
    out = jax.tree.map(lambda u, s: (tree_math.wide(u) - lr * s).astype(
        u.dtype), out, wsam_state.sharpness)
    return out, DecoupledWSAMState(wsam_state, base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def wsam(
    loss_fn: Callable[..., Any],
    rho: ScalarOrSchedule = 0.05,
    gamma: ScalarOrSchedule = 0.9,
    *,
    decouple: bool = True,
    base_optimizer: Optional[optax.GradientTransformation] = None,
    learning_rate: Optional[ScalarOrSchedule] = None,
    **options,
) -> optax.GradientTransformationExtraArgs:
  r"""Weighted SAM: the clean loss plus a weighted sharpness term.

  WSAM minimizes :math:`L(w) + \frac{\gamma}{1-\gamma}\,(L(w + \epsilon) -
  L(w))`, the clean loss with the sharpness as a regularizer of weight
  :math:`\alpha = \gamma / (1 - \gamma)` (``gamma=0.5`` is SAM). With SAM's
  ascent :math:`\epsilon = \rho\, g_0/\|g_0\|` and :math:`g_1 = \nabla L(w +
  \epsilon)` its gradient is

  .. math::

    g = g_0 + \alpha\,(g_1 - g_0) = \alpha\, g_1 + (1 - \alpha)\, g_0.

  **Coupled** (``decouple=False``): wsam hands on :math:`g` and goes in front
  of any optimizer, like `sam`:
  ``optax.chain(sam_optax.wsam(loss_fn, decouple=False), optax.sgd(lr))``.
  This is pytorch-optimizer's ``WSAM(decouple=False)``.

  **Decoupled** (``decouple=True``, the authors' default): the base
  optimizer sees only :math:`g_0`, and the sharpness term is a plain SGD
  step outside its preconditioning and momentum,

  .. math::

    w \leftarrow w + \mathrm{base}(g_0) - \eta_t\, \alpha\, (g_1 - g_0).

  That step must come after the base optimizer, with its learning rate, so
  a decoupled wsam *is* the optimizer: give it ``base_optimizer`` (any optax
  optimizer; its update is taken as it is) and ``learning_rate`` (a number
  or the schedule the base uses, evaluated on the same step count), or
  leave ``learning_rate=None`` and build the base with
  `optax.inject_hyperparams`: the rate is then read from its state
  (``'learning_rate'``, the value the base used in this step). Use it last
  in the chain, like ``optax.sgd``. Its state is a `DecoupledWSAMState`.
  This is pytorch-optimizer's ``WSAM(decouple=True)``, whose base optimizer
  steps with :math:`g_0` and whose correction uses the group's ``lr`` of
  that step.

  Peers divide by ``||g0|| + 1e-12``; here exactly (zero-safe).
  pytorch-optimizer's ``max_norm`` clips :math:`g_1` before the mix; here
  chain `optax.clip_by_global_norm` after wsam (coupled) or inside the base
  optimizer (decoupled) instead.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]),
    ...          'y': jnp.array([1.0, -1.0])}
    >>> tx = sam_optax.wsam(loss_fn, rho=0.1, gamma=0.8,
    ...                     base_optimizer=optax.adam(1e-2),
    ...                     learning_rate=1e-2)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> updates, state = tx.update(grads, state, params, batch=batch)
    >>> print(updates['w'])
    [ 0.0125...  0.0044... -0.0418...]
    >>> coupled = optax.chain(sam_optax.wsam(loss_fn, decouple=False),
    ...                       optax.sgd(0.1))

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    rho: radius of the ascent, a number >= 0 or a schedule.
    gamma: the sharpness weight in [0, 1), a number or a schedule
      (alpha = gamma / (1 - gamma); a traced gamma >= 1 makes the update
      NaN).
    decouple: True: a complete optimizer around ``base_optimizer``; False: a
      transformation in front of one.
    base_optimizer: with ``decouple=True``, the optimizer that steps with
      :math:`g_0` (required); must be None with ``decouple=False``.
    learning_rate: with ``decouple=True``, the rate of the sharpness step (a
      number or a schedule); None reads it from an injected base optimizer.

  ``ascent_steps``, ``has_aux``, ``perturbation_mask`` and ``layout`` work
  as in `sam`; decoupled under a layout, the base optimizer gets the mean
  clean gradient and the sharpness gradient is the mean over the
  perturbation groups.

  Returns:
    An `optax.GradientTransformationExtraArgs`: coupled, its state is a
    `SAMState`; decoupled, a `DecoupledWSAMState`.

  References:
    Yue et al., `Sharpness-Aware Minimization Revisited: Weighted Sharpness
    as a Regularization Term <https://arxiv.org/abs/2305.15817>`_, KDD 2023.
  """
  validation.check_bool('wsam', 'decouple', decouple)
  part = _sharpness_part(loss_fn, rho, gamma, decouple, **options)
  if not decouple:
    if base_optimizer is not None or learning_rate is not None:
      raise ValueError(
          'wsam: with decouple=False, wsam goes in front of the optimizer:'
          ' optax.chain(sam_optax.wsam(loss_fn, decouple=False), base); do'
          ' not pass base_optimizer or learning_rate.')
    return part
  if not hasattr(base_optimizer, 'update'):
    raise TypeError(
        'wsam: decouple=True (the authors\' default) makes wsam a complete'
        ' optimizer: pass base_optimizer= (e.g. optax.sgd(lr, 0.9)) and'
        ' learning_rate= (or an optax.inject_hyperparams base), or use'
        f' decouple=False in front of an optimizer; got {base_optimizer!r}.')
  if learning_rate is not None:
    validation.check_hyperparameter('wsam', 'learning_rate', learning_rate)
  return decoupled_step(part, base_optimizer, learning_rate)


# The options every variant takes (ascent_steps, has_aux, ...) are those of
# the pipeline, forwarded through **options: show them in the signature.
_signature = inspect.signature(wsam)
wsam.__signature__ = _signature.replace(parameters=[
    p for p in _signature.parameters.values()
    if p.kind is not inspect.Parameter.VAR_KEYWORD] + [
        p for name, p in inspect.signature(_sharpness_part).parameters.items()
        if name not in ('loss_fn', 'rho', 'gamma', 'decouple')])
