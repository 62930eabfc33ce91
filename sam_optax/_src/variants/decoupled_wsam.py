"""Decoupled WSAM: the base optimizer on g0, the sharpness as an SGD step."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, cast

import jax
import jax.numpy as jnp
import optax

from sam_optax._src.core import directions
from sam_optax._src.core import inject
from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import layouts
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import complete
from sam_optax._src.variants import wsam as wsam_lib

ScalarOrSchedule = validation.ScalarOrSchedule
PyTree = Any
_OWNER = 'decoupled_wsam'


class WSAMState(NamedTuple):
  """State of the sharpness part of `decoupled_wsam`.

  Attributes:
    count: number of updates so far (int32).
    perturbed_loss: L(w + eps) at the last update, float32.
    grad_norm: ||g0||, the norm of the last clean gradient, float32.
    cosine: cos(g0, g) between the clean gradient and the gradient handed to
      the base optimizer (g0 itself, so 1 unless g0 = 0); 0 unless built
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
  """State of `decoupled_wsam`.

  Attributes:
    wsam: the `WSAMState` (diagnostics and the sharpness gradient).
    base: the base optimizer's state.
    skipped_steps: the number of steps refused because their gradient,
      their perturbed pass or their update was not finite (int32); such a
      step leaves every other field as it was.
  """

  wsam: WSAMState
  base: Any
  skipped_steps: jax.Array


def _sharpness_gradient(ctx: variant_lib.Context) -> variant_lib.Step:
  """Hands on g0; keeps alpha (g1 - g0) (zero where rho = 0)."""
  loss, perturbed = ctx.perturbed()
  zero_rho = ctx.hyperparams['rho'] == 0
  alpha = wsam_lib.sharpness_weight(ctx.hyperparams)
  sharpness = jax.tree.map(lambda d: jnp.where(zero_rho, 0.0, alpha * d),
                           tree_math.tree_sub(perturbed, ctx.clean_grad))
  return variant_lib.Step(ctx.clean_grad, loss,
                          ctx.state._replace(sharpness=sharpness))


def _sharpness_part(rho, gamma) -> variant_lib.Variant:
  """The pipeline's piece: g0 handed on, alpha (g1 - g0) in the state."""
  return variant_lib.Variant(
      name=_OWNER, hyperparams={'rho': rho, 'gamma': gamma},
      state=WSAMState, combine=_sharpness_gradient,
      bounds={'gamma': variant_lib.BELOW_ONE}, agree={'sharpness': 'mean'},
      init=lambda params: dict(
          sharpness=tree_math.float32_zeros_like(params)))


def _learning_rate(learning_rate, count, base_state) -> jax.Array:
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
        f'{_OWNER}: the sharpness step needs the learning rate: pass'
        ' learning_rate= (a number or the schedule the base optimizer uses),'
        ' or build the base optimizer with optax.inject_hyperparams so that'
        f" its state holds one 'learning_rate' (found {len(injected)}).")
  return jnp.asarray(injected[0], jnp.float32)


def _check_base(base_optimizer) -> None:
  if not (hasattr(base_optimizer, 'init')
          and hasattr(base_optimizer, 'update')):
    raise TypeError(
        f'{_OWNER}: base_optimizer must be an optax optimizer (e.g.'
        ' optax.sgd(lr, 0.9)) that steps with the clean gradient, got'
        f' {base_optimizer!r}. For the coupled form in front of an optimizer'
        ' use sam_optax.wsam(loss_fn, ...).')


@inject.record_annealable
def decoupled_wsam(
    loss_fn: Callable[..., Any],
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    gamma: ScalarOrSchedule = 0.9,
    *,
    learning_rate: Optional[ScalarOrSchedule] = None,
    ascent_steps: int = 1,
    has_aux: bool = False,
    perturbation_mask: Optional[directions.LeafMask] = None,
    layout: layouts.Layout = None,
    track_cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Decoupled weighted SAM: a complete optimizer around a base optimizer.

  With SAM's ascent :math:`\epsilon = \rho\, g_0/\|g_0\|`, :math:`g_1 =
  \nabla L(w + \epsilon)` and :math:`\alpha = \gamma / (1 - \gamma)`, the
  base optimizer sees only the clean gradient :math:`g_0`, and WSAM's
  sharpness term is a plain SGD step outside its preconditioning and
  momentum, with the learning rate :math:`\eta_t` of the same step:

  .. math::

    w \leftarrow w + \mathrm{base}(g_0) - \eta_t\, \alpha\, (g_1 - g_0).

  A step whose clean gradient, perturbed pass or update is not finite is
  skipped: a zero update, every state field as it was (the step count
  too), and ``skipped_steps`` counts it.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]),
    ...          'y': jnp.array([1.0, -1.0])}
    >>> tx = sam_optax.decoupled_wsam(loss_fn, optax.adam(1e-2), rho=0.1,
    ...                               gamma=0.8, learning_rate=1e-2)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> updates, state = tx.update(grads, state, params, batch=batch)
    >>> print(updates['w'])
    [ 0.0125...  0.0044... -0.0418...]

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    base_optimizer: any optax optimizer; it steps with :math:`g_0` and its
      update is taken as it is.
    rho: radius of the ascent, a number >= 0 or a schedule.
    gamma: the sharpness weight in [0, 1), a number or a schedule (a traced
      gamma >= 1 makes the step non-finite, so it is skipped).
    learning_rate: :math:`\eta_t`, a number or the schedule the base
      optimizer uses (evaluated on the same step count); None reads it from
      the state of a base built with `optax.inject_hyperparams` (its
      ``'learning_rate'`` of this step).
    ascent_steps: as in `sam`.
    has_aux: as in `sam`.
    perturbation_mask: as in `sam`.
    layout: as in `sam`; the base optimizer gets the mean clean gradient
      and the sharpness gradient is the mean over the perturbation groups.
    track_cosine: as in `sam`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `DecoupledWSAMState`.

  References:
    Yue et al., `Sharpness-Aware Minimization Revisited: Weighted Sharpness
    as a Regularization Term <https://arxiv.org/abs/2305.15817>`_, KDD 2023.
  """
  _check_base(base_optimizer)
  wsam_lib.check_gamma(_OWNER, gamma)
  if learning_rate is not None:
    validation.check_hyperparameter(_OWNER, 'learning_rate', learning_rate)
  part = transformation.build(
      _sharpness_part(rho, gamma), loss_fn, ascent_steps=ascent_steps,
      has_aux=has_aux, perturbation_mask=perturbation_mask, layout=layout,
      track_cosine=track_cosine)
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params):
    # The part is built from a WSAMState variant; optax types its state
    # only as OptState.
    state = DecoupledWSAMState(cast(WSAMState, part.init(params)),
                               base.init(params), complete.no_skipped_steps())
    _learning_rate(learning_rate, state.wsam.count, state.base)  # checks
    return state

  def update_fn(updates, state, params=None, **extra_args):
    validation.check_state(_OWNER, state, init_fn, params)
    clean, part_state = part.update(updates, state.wsam, params,
                                    **extra_args)
    part_state = cast(WSAMState, part_state)
    out, base_state = base.update(clean, state.base, params, **extra_args)
    lr = _learning_rate(learning_rate, state.wsam.count, base_state)
    out = jax.tree.map(lambda u, s: (tree_math.wide(u) - lr * s).astype(
        u.dtype), out, part_state.sharpness)
    # ||g0|| is finite exactly when g0 is.
    ok = tree_math.all_finite((part_state.perturbed_loss, part_state.grad_norm,
                              part_state.sharpness, out, base_state))
    return complete.skip_unless_finite(
        ok, out, state, DecoupledWSAMState(part_state, base_state,
                                           state.skipped_steps))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
