"""WSAM: the clean loss plus a weighted sharpness term (Yue et al., 2023)."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar, Unpack
import warnings

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import sam as sam_lib

ScalarOrSchedule = validation.ScalarOrSchedule
_Factory = TypeVar('_Factory', bound=Callable[..., Any])
# The keyword arguments of 0.2's wsam(..., decouple=True, ...).
_DECOUPLED_ARGUMENTS = ('decouple', 'base_optimizer', 'learning_rate')


def sharpness_weight(hyperparams) -> jax.Array:
  """alpha = gamma / (1 - gamma); NaN for a traced gamma >= 1."""
  gamma = hyperparams['gamma']
  below = gamma < 1.0
  return tree_math.nan_unless(below,
                              gamma / jnp.where(below, 1.0 - gamma, 1.0))


def check_gamma(owner: str, gamma: ScalarOrSchedule) -> None:
  variant_lib.BELOW_ONE.check(owner, 'gamma', gamma)


def _weighted_gradient(ctx: variant_lib.Context) -> variant_lib.Step:
  """alpha g1 + (1 - alpha) g0, as g0 + alpha (g1 - g0)."""
  loss, perturbed = ctx.perturbed()
  clean = jax.tree.map(tree_math.wide, ctx.clean_grad)
  out = tree_math.tree_add_scaled(clean, sharpness_weight(ctx.hyperparams),
                                  tree_math.tree_sub(perturbed, clean))
  return variant_lib.Step(out, loss, ctx.state)


def _accepts_the_decoupled_spelling(public: _Factory) -> _Factory:
  """Keeps 0.2's ``wsam(..., decouple=True, base_optimizer=...)`` working.

  That spelling (and 0.2's default, a ``base_optimizer`` without
  ``decouple``) builds `decoupled_wsam`; ``decouple=False`` is `wsam`
  itself. Both warn with a `DeprecationWarning`.
  """

  @functools.wraps(public)
  def wsam(loss_fn, *args, **kwargs):
    old = {k: kwargs.pop(k) for k in _DECOUPLED_ARGUMENTS if k in kwargs}
    if not old:
      return public(loss_fn, *args, **kwargs)
    decouple = old.pop('decouple', True)  # 0.2's default
    validation.check_bool('wsam', 'decouple', decouple)
    if not decouple:
      if old:
        raise ValueError(
            'wsam: wsam goes in front of the optimizer:'
            ' optax.chain(sam_optax.wsam(loss_fn), base); do not pass'
            f' {" or ".join(sorted(old))}. For the decoupled form use'
            ' sam_optax.decoupled_wsam(loss_fn, base_optimizer, ...).')
      warnings.warn(
          'wsam(..., decouple=False) is deprecated: wsam(...) is the coupled'
          ' form; drop decouple=False.', DeprecationWarning, stacklevel=2)
      return public(loss_fn, *args, **kwargs)
    warnings.warn(
        'wsam(..., decouple=True, base_optimizer=...) is deprecated: use'
        ' sam_optax.decoupled_wsam(loss_fn, base_optimizer, rho, gamma,'
        ' learning_rate=...), the complete optimizer. wsam(loss_fn, ...) is'
        ' now the coupled transformation that goes in front of an'
        ' optimizer.', DeprecationWarning, stacklevel=2)
    # Imported here: decoupled_wsam builds on this module.
    from sam_optax._src.variants import decoupled_wsam as decoupled_lib  # pylint: disable=g-import-not-at-top
    # Whatever was passed (None if nothing): decoupled_wsam's own check
    # names a missing or wrong base_optimizer.
    base_optimizer: Any = old.get('base_optimizer')
    return decoupled_lib.decoupled_wsam(
        loss_fn, base_optimizer, *args,
        learning_rate=old.get('learning_rate'), **kwargs)

  return wsam  # type: ignore[return-value]


@_accepts_the_decoupled_spelling
@transformation.transformation
def wsam(
    rho: ScalarOrSchedule = 0.05,
    gamma: ScalarOrSchedule = 0.6,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""Weighted SAM: the clean loss plus a weighted sharpness term.

  WSAM minimizes :math:`L(w) + \alpha\,(L(w + \epsilon) - L(w))`, the clean
  loss with the sharpness as a regularizer of weight :math:`\alpha = \gamma
  / (1 - \gamma)` (``gamma=0.5`` is SAM). With SAM's ascent :math:`\epsilon
  = \rho\, g_0/\|g_0\|` and :math:`g_1 = \nabla L(w + \epsilon)` it hands on

  .. math::

    g = g_0 + \alpha\,(g_1 - g_0) = \alpha\, g_1 + (1 - \alpha)\, g_0.

  This is the coupled form: it goes in front of any optimizer, like `sam`.
  The authors' default, the decoupled form whose sharpness term is a plain
  SGD step outside the base optimizer, is `decoupled_wsam`. The default
  ``gamma=0.6`` (:math:`\alpha = 1.5`) is ours: the paper's 0.9
  (:math:`\alpha = 9`) belongs to the decoupled form, and in front of the
  base optimizer (SGD with momentum, AdamW) it diverged or lost accuracy on
  all four tasks of our study (docs/guide/choosing.md), where 0.6 trained
  on every one.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]),
    ...          'y': jnp.array([1.0, -1.0])}
    >>> tx = optax.chain(sam_optax.wsam(loss_fn, rho=0.1, gamma=0.6),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> updates, state = tx.update(grads, state, params, batch=batch)
    >>> print(updates['w'])
    [ 0.1094...  0.0541... -0.4945...]

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    rho: radius of the ascent, a number >= 0 or a schedule.
    gamma: the sharpness weight in [0, 1), a number or a schedule
      (alpha = gamma / (1 - gamma); 0.5 is SAM; a traced gamma >= 1 makes
      the update NaN).

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SAMState`.

  References:
    Yue et al., `Sharpness-Aware Minimization Revisited: Weighted Sharpness
    as a Regularization Term <https://arxiv.org/abs/2305.15817>`_, KDD 2023.
  """
  check_gamma('wsam', gamma)
  return variant_lib.Variant(
      hyperparams={'rho': rho, 'gamma': gamma},
      bounds={'gamma': variant_lib.BELOW_ONE},
      state=sam_lib.SAMState, combine=_weighted_gradient)
