"""ESAM's stochastic weight perturbation (Du et al., ICLR 2022)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import bounds


class ESAMState(NamedTuple):
  """State of `esam`: the count, diagnostics and the key.

  Attributes:
    count: number of updates so far (int32).
    perturbed_loss: L(w + eps) at the last update, float32.
    grad_norm: ||g0|| at the last update, float32.
    cosine: cos(g0, g), NaN unless ``track_cosine=True``.
    sam_step: True (every esam step takes the second gradient), a bool.
    key: the raw PRNG key (uint32) of the next leaf draw; the same in every
      group and device.
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  sam_step: jax.Array
  key: jax.Array


def leaf_mask(key: jax.Array, like: Any, beta: jax.Array) -> Any:
  """One Bernoulli(beta) draw per leaf of ``like``, as float32 0 / 1."""
  leaves, treedef = jax.tree.flatten(like)
  draws = jax.random.uniform(key, (len(leaves),)) < beta
  return jax.tree.unflatten(
      treedef, [draws[i].astype(jnp.float32) for i in range(len(leaves))])


def _combine(ctx: variant_lib.Context) -> variant_lib.Step:
  """eps_l = m_l / beta * rho g0_l / ||g0||, m_l ~ Bernoulli(beta)."""
  beta = ctx.hyperparams['beta']
  key, draw = jax.random.split(ctx.state.key)
  mask = leaf_mask(draw, ctx.clean_grad, beta)
  eps = ctx.ascend()
  scale = tree_math.safe_inverse(beta)
  eps = jax.tree.map(lambda e, m: e * (m * scale), eps, mask)
  loss, grad = ctx.grad_at(ctx.shift(eps))
  grad = bounds.nan_unless(beta <= 1.0, grad)
  return variant_lib.Step(grad, loss, ctx.state._replace(
      sam_step=jnp.asarray(True), key=key))


@transformation.transformation
def esam(
    loss_fn: Callable[..., Any],
    rho: variant_lib.ScalarOrSchedule = 0.05,
    beta: variant_lib.ScalarOrSchedule = 0.5,
    *,
    seed: int = 0,
) -> variant_lib.Variant:
  r"""ESAM's stochastic weight perturbation: perturb a random subset of leaves.

  Each step draws one Bernoulli(:math:`\beta`) mask :math:`m_l` per
  parameter leaf (from the key in the state: reproducible and resumable)
  and perturbs the selected leaves only, scaled by :math:`1/\beta` so the
  perturbation is SAM's in expectation:

  .. math::

    \epsilon_l = \frac{m_l}{\beta}\, \rho\, \frac{g_{0,l}}{\|g_0\|},
    \qquad g = \nabla L(w + \epsilon).

  ``beta=1`` is SAM. The norm is over every leaf (as the authors' code).

  **Cost, and what is not here.** ESAM saves time in PyTorch by skipping
  the second backward pass for the unselected parameters
  (``requires_grad=False``); `jax.grad` of one loss computes every leaf's
  gradient, so here every step costs two gradients, as SAM. ESAM's second
  part, sharpness-sensitive data selection (the re-gradient on the top
  ``gamma`` fraction of examples by :math:`L_i(w + \epsilon) - L_i(w)`),
  needs each group's examples, which the pipeline's `Context` does not
  expose to a variant yet; it is not implemented (no ``gamma``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.eye(3), 'y': jnp.zeros(3)}
    >>> tx = sam_optax.esam(loss_fn, rho=0.1, beta=1.0)
    >>> sam = sam_optax.sam(loss_fn, rho=0.1)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> a, _ = tx.update(grads, tx.init(params), params, batch=batch)
    >>> b, _ = sam.update(grads, sam.init(params), params, batch=batch)
    >>> print(bool(jnp.allclose(a['w'], b['w'])))
    True

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    rho: radius of the ascent, a number >= 0 or a schedule.
    beta: the probability that a leaf is perturbed, in (0, 1].
    seed: seeds the key in the state (an int).

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an
    `ESAMState`.

  References:
    Du et al., `Efficient Sharpness-aware Minimization for Improved Training
    of Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022
    (authors' code: dydjw9/Efficient_SAM).
  """
  del loss_fn  # the pipeline takes it
  seed = validation.check_static_int('esam', 'seed', seed, minimum=0)
  bounds.check_below('esam', 'beta', beta, 1.0, inclusive=True)
  return variant_lib.Variant(
      name='esam', hyperparams={'rho': rho, 'beta': beta}, state=ESAMState,
      combine=_combine, positive=('beta',),
      agree={'sam_step': 'same', 'key': 'same'},
      init=lambda params: ESAMState(
          **variant_lib.initial_diagnostics(), sam_step=jnp.asarray(False),
          key=jax.random.PRNGKey(seed)))
