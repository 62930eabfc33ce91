"""ESAM: perturb random leaves, step on the sharpest examples (Du et al.)."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Optional, Sequence, Unpack

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib


class ESAMState(NamedTuple):
  """State of `esam`: the common fields of `SAMState`, the key, the sharpness.

  With ``gamma < 1``, ``perturbed_loss`` is the mean of the examples' own
  losses at w + eps.

  Attributes:
    sam_step: True (every esam step takes the second gradient), a bool.
    key: the raw PRNG key (uint32) of the next leaf draw; the same in every
      group and device.
    sharpness: the mean over the group's examples of the sharpness
      L_i(w + eps) - L_i(w), float32; 0 with ``gamma=1`` (not measured).
    selected_sharpness: the same mean over the selected examples only
      (>= ``sharpness``), float32; 0 with ``gamma=1``.
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  sam_step: jax.Array
  key: jax.Array
  sharpness: jax.Array
  selected_sharpness: jax.Array


def leaf_mask(key: jax.Array, like: Any, beta: jax.Array) -> Any:
  """One Bernoulli(beta) draw per leaf of ``like``, as float32 0 / 1."""
  leaves, treedef = jax.tree.flatten(like)
  draws = jax.random.uniform(key, (len(leaves),)) < beta
  return jax.tree.unflatten(
      treedef, [draws[i].astype(jnp.float32) for i in range(len(leaves))])


def selected_count(gamma: float, n: int) -> int:
  """k = max(1, round(gamma * n)): how many of n examples SDS keeps."""
  return max(1, min(n, int(round(gamma * n))))


def _make_combine(gamma: float, batch_argnames):
  """The combine: SWP's eps, then the re-gradient (on SDS's top k)."""
  select_all = gamma == 1.0

  def combine(ctx: variant_lib.Context) -> variant_lib.Step:
    """eps_l = m_l / beta * rho g0_l / ||g0||, m_l ~ Bernoulli(beta)."""
    beta = ctx.hyperparams['beta']
    key, draw = jax.random.split(ctx.state.key)
    mask = leaf_mask(draw, ctx.clean_grad, beta)
    eps = ctx.ascend()
    scale = tree_math.safe_inverse(beta)
    eps = jax.tree.map(lambda e, m: e * (m * scale), eps, mask)
    point = ctx.shift(eps)
    if select_all:  # static: SWP alone, no per-example work at all
      loss, grad = ctx.grad_at(point)
      sharpness = selected = jnp.zeros([], jnp.float32)  # not measured
    else:
      before = ctx.losses_at(ctx.params, batch_argnames)
      after = ctx.losses_at(point, batch_argnames)
      instance = after - before
      k = selected_count(gamma, instance.shape[0])
      top, indices = jax.lax.top_k(instance, k)
      _, grad = ctx.grad_at(point, select=indices,
                            batch_argnames=batch_argnames)
      # An example's NaN sharpness is never dropped into a number: it makes
      # the update NaN whether or not top_k picked it. Under
      # PerDevice(sync=True) these means are averaged over the group.
      nans, loss, sharpness, selected = ctx.group_mean((
          jnp.mean(jnp.isnan(instance).astype(jnp.float32)), jnp.mean(after),
          jnp.mean(instance), jnp.mean(top)))
      grad = tree_math.nan_unless(nans == 0, grad)
    return variant_lib.Step(grad, loss, ctx.state._replace(
        sam_step=jnp.asarray(True), key=key, sharpness=sharpness,
        selected_sharpness=selected))

  return combine


def _check_gamma(gamma) -> float:
  if (not isinstance(gamma, numbers.Real) or isinstance(gamma, bool)
      or not 0.0 < float(gamma) <= 1.0):
    raise ValueError(
        'esam: gamma must be a python number in (0, 1], the fraction of each'
        ' group\'s examples whose re-gradient is taken (a static number: it'
        f' fixes how many examples are kept), got {gamma!r}. Use e.g.'
        ' gamma=0.5 (the paper\'s choice) or gamma=1.0 to keep every example'
        ' (stochastic weight perturbation alone).')
  return float(gamma)


@transformation.transformation
def esam(
    rho: ScalarOrSchedule = 0.05,
    beta: ScalarOrSchedule = 0.5,
    gamma: float = 1.0,
    *,
    seed: int = 0,
    batch_argnames: Optional[Sequence[str]] = None,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""ESAM: stochastic weight perturbation, sharpness-sensitive data selection.

  Stochastic weight perturbation (SWP) draws one Bernoulli(:math:`\beta`)
  mask :math:`m_l` per parameter leaf, from the key in the state, and
  scales SAM's perturbation so that it is SAM's in expectation:

  .. math::

    \epsilon_l = \frac{m_l}{\beta}\, \rho\, \frac{g_{0,l}}{\|g_0\|}.

  Sharpness-sensitive data selection (SDS, ``gamma < 1``) measures each
  example's own loss :math:`L_i` (``loss_fn`` on that one example) at
  :math:`w` and :math:`w + \epsilon`, forward passes only, and takes the
  re-gradient on the :math:`k = \max(1, \mathrm{round}(\gamma n))` of the
  group's n examples whose sharpness is largest:

  .. math::

    s_i = L_i(w + \epsilon) - L_i(w), \qquad
    B^+ = \operatorname{top}_k(s), \qquad
    g = \nabla L_{B^+}(w + \epsilon).

  ``gamma=1`` skips the selection (SWP alone); ``beta=1, gamma=1`` is SAM.

  Args:
    loss_fn: as in `sam`.
    rho: radius of the ascent, a number >= 0 or a schedule.
    beta: the probability that a leaf is perturbed, in (0, 1], a number or
      a schedule.
    gamma: the fraction of each group's examples whose re-gradient is
      taken, a static number in (0, 1]. The default 1.0 (SWP alone, the
      default of the authors' `ESAM` class) trained on all four tasks of our
      study (docs/guide/choosing.md); the paper's 0.5 diverged on noisy
      labels, where the sharpest examples are the mislabelled ones.
    seed: seeds the key in the state (an int >= 0).
    batch_argnames: with ``gamma < 1``, the names of the per-example
      keyword arguments (the others go whole to every example); default:
      the layout's `Chunks` names, else every array with a leading
      dimension.

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an
    `ESAMState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.eye(3), 'y': jnp.zeros(3)}
    >>> tx = sam_optax.esam(loss_fn, rho=0.1, beta=1.0, gamma=1.0)  # SAM
    >>> sam = sam_optax.sam(loss_fn, rho=0.1)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> a, _ = tx.update(grads, tx.init(params), params, batch=batch)
    >>> b, _ = sam.update(grads, sam.init(params), params, batch=batch)
    >>> print(bool(jnp.allclose(a['w'], b['w'])))
    True
    >>> sds = sam_optax.esam(loss_fn, rho=0.1, beta=1.0, gamma=0.34)
    >>> c, state = sds.update(grads, sds.init(params), params, batch=batch)
    >>> print(bool(state.selected_sharpness >= state.sharpness))
    True

  References:
    Du et al., `Efficient Sharpness-aware Minimization for Improved Training
    of Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022
    (authors' code: dydjw9/Efficient_SAM).
  """
  seed = validation.check_static_int('esam', 'seed', seed, minimum=0)
  gamma = _check_gamma(gamma)
  if batch_argnames is not None:
    if isinstance(batch_argnames, str) or not all(
        isinstance(n, str) for n in batch_argnames):
      raise ValueError(
          'esam: batch_argnames must be a tuple of keyword-argument names,'
          f" e.g. ('x', 'y'), got {batch_argnames!r}.")
    batch_argnames = tuple(batch_argnames)
  zero = jnp.zeros([], jnp.float32)
  return variant_lib.Variant(
      hyperparams={'rho': rho, 'beta': beta}, state=ESAMState,
      combine=_make_combine(gamma, batch_argnames), bounds={'beta': variant_lib.Bound(high=1.0, low_open=True)},
      agree={'sam_step': 'same', 'key': 'same', 'sharpness': 'mean',
             'selected_sharpness': 'mean'},
      init=lambda params: dict(
          sam_step=jnp.asarray(False), key=jax.random.PRNGKey(seed),
          sharpness=zero, selected_sharpness=zero))
