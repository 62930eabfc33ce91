"""ESAM (Du et al., ICLR 2022): stochastic weight perturbation and
sharpness-sensitive data selection."""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import bounds


class ESAMState(NamedTuple):
  """State of `esam`: the count, diagnostics, the key and SDS's sharpness.

  Attributes:
    count: number of updates so far (int32).
    perturbed_loss: L(w + eps) at the last update, float32 (with
      ``gamma < 1`` the mean of every example's own loss at w + eps).
    grad_norm: ||g0|| at the last update, float32.
    cosine: cos(g0, g), 0 unless ``track_cosine=True``.
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
      grad = bounds.nan_unless(nans == 0, grad)
    grad = bounds.nan_unless(beta <= 1.0, grad)
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
    loss_fn: Callable[..., Any],
    rho: variant_lib.ScalarOrSchedule = 0.05,
    beta: variant_lib.ScalarOrSchedule = 0.5,
    gamma: float = 0.5,
    *,
    seed: int = 0,
    batch_argnames: Optional[Sequence[str]] = None,
) -> variant_lib.Variant:
  r"""ESAM: stochastic weight perturbation and sharpness-sensitive data selection.

  **Stochastic weight perturbation (SWP).** Each step draws one
  Bernoulli(:math:`\beta`) mask :math:`m_l` per parameter leaf (from the
  key in the state: reproducible and resumable) and perturbs the selected
  leaves only, scaled by :math:`1/\beta` so the perturbation is SAM's in
  expectation:

  .. math::

    \epsilon_l = \frac{m_l}{\beta}\, \rho\, \frac{g_{0,l}}{\|g_0\|}.

  **Sharpness-sensitive data selection (SDS)**, with ``gamma < 1``. Each
  example's own loss is measured at :math:`w` and at :math:`w + \epsilon`
  (forward passes only: ``loss_fn`` on a batch of that one example, vmapped
  over the group's examples), and the re-gradient is taken on the
  :math:`k = \max(1, \mathrm{round}(\gamma n))` examples of the group
  whose sharpness is largest:

  .. math::

    s_i = L_i(w + \epsilon) - L_i(w), \qquad
    B^+ = \operatorname{top}_k(s), \qquad
    g = \nabla L_{B^+}(w + \epsilon),

  where :math:`L_{B^+}` is ``loss_fn`` on the rows :math:`B^+` of every
  per-example keyword argument (``batch_argnames``; by default those of the
  layout's `Chunks`, else every array with a leading dimension). k is
  static (`jax.lax.top_k`), so batch sizes stay fixed under `jax.jit`.
  ``gamma=1`` keeps every example and skips the selection statically: it is
  SWP alone, and ``beta=1, gamma=1`` is SAM. The selection is within each
  perturbation group: the whole batch, each chunk of ``Chunks(m)``, each
  device of `PerDevice`. With ``PerDevice(sync=True)`` each device selects
  among its own examples and the selected gradients are averaged over the
  axis (as the authors' distributed code does); with
  ``Chunks(m, shared=True)`` the selection is over the whole batch and the
  selected rows' gradient is accumulated in chunks of at most m.

  **Cost.** ESAM saves time in PyTorch by skipping the second backward pass
  for the unselected parameters (``requires_grad=False``); `jax.grad` of
  one loss computes every leaf's gradient, so SWP costs SAM's two
  gradients. SDS replaces the full re-gradient by one on k examples, and
  adds two per-example forward passes over the group (the authors reuse
  the forward pass of the clean gradient for :math:`L_i(w)`; here the clean
  gradient comes from the caller, so it is one more forward pass).

  **Defaults, and the authors' code.** The authors' ``ESAM`` class
  (dydjw9/Efficient_SAM, ``utils/Esam.py``) defaults to ``beta=1,
  gamma=1`` (SAM); their scripts (``run.sh``) and the paper use
  ``beta=0.5`` (0.6 for ResNet-18) and ``gamma=0.5``, ``rho`` 0.05-0.2.
  Here ``beta`` and ``gamma`` default to the paper's 0.5; ``gamma=1`` turns
  SDS off. Where the authors' code and the paper differ:

  - :math:`L_i` is the per-example loss of the model's forward pass (their
    ``loss_fct`` with ``reduction='none'``), and :math:`L_{B^+}` the mean
    over the selected examples; followed here.
  - their selection is ``sharpness > cutoff`` with ``cutoff`` the
    ``int(gamma * n)``-th largest sharpness, which keeps ``int(gamma n) - 1``
    examples (none when ``gamma n < 2``) -- an off-by-one against the
    paper's :math:`|B^+| = \gamma |B|`. Not followed: here exactly
    :math:`k = \max(1, \mathrm{round}(\gamma n))` examples are kept
    (ties broken by `jax.lax.top_k`, lowest index first).
  - their code keeps every example for ``gamma >= 0.99``; here only
    ``gamma=1`` does (``gamma=0.99`` of 64 examples keeps 63).
  - their SWP mask is drawn at the end of a step for the next one
    (``requires_grad=False``), which also leaves those leaves out of the
    next clean gradient, so their norm :math:`\|g_0\|` is over the
    perturbed leaves only; here the mask is drawn from the key at each step
    and the norm is over every leaf (SAM's direction, then masked), so
    that the perturbation is SAM's in expectation,
    :math:`\mathbb{E}[m_l / \beta] = 1`, as the paper's SWP states. Not
    followed, for that reason.

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

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    rho: radius of the ascent, a number >= 0 or a schedule.
    beta: the probability that a leaf is perturbed, in (0, 1].
    gamma: the fraction of each group's examples whose re-gradient is
      taken, a python number in (0, 1] (static: it fixes the count k).
    seed: seeds the key in the state (an int).
    batch_argnames: with ``gamma < 1``, the names of the per-example
      keyword arguments (the others go to every example whole); default:
      the layout's `Chunks` names, else every array with a leading
      dimension.

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
      name='esam', hyperparams={'rho': rho, 'beta': beta}, state=ESAMState,
      combine=_make_combine(gamma, batch_argnames), positive=('beta',),
      agree={'sam_step': 'same', 'key': 'same', 'sharpness': 'mean',
             'selected_sharpness': 'mean'},
      init=lambda params: ESAMState(
          **variant_lib.initial_diagnostics(), sam_step=jnp.asarray(False),
          key=jax.random.PRNGKey(seed), sharpness=zero,
          selected_sharpness=zero))
