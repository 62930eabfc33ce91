"""LookSAM: SAM every k-th step, its direction reused between (Liu et al.)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Unpack
import warnings

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import cheap
from sam_optax._src.variants import gsam


class LookSAMState(NamedTuple):
  """State of `looksam`: the count, diagnostics, the stored direction.

  Attributes:
    count: number of updates so far (int32); steps 0, k, 2k, ... are SAM.
    perturbed_loss: L(w + eps) at the last SAM step, float32.
    grad_norm: ||g0|| at the last update, float32.
    cosine: cos(g0, g), 0 unless ``track_cosine=True``.
    sam_step: whether the last update was a SAM step (bool).
    g_v: the part of g1 orthogonal to g0 at the last SAM step, a float32
      tree like the parameters; zeros at init (so a reuse step before the
      first SAM step hands on g0 exactly).
  """

  count: jax.Array
  perturbed_loss: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  sam_step: jax.Array
  g_v: jax.Array


def _orthogonal(g1, g0, per_tensor: bool):
  """g1 minus its projection on g0, globally or leaf by leaf."""
  if not per_tensor:
    return gsam.residual(g1, g0)
  return jax.tree.map(lambda a, b: gsam.residual(a, b), g1, g0)


def _reuse(g0, g_v, alpha, per_tensor: bool):
  """g0 + alpha ||g0|| / ||g_v|| g_v (globally or per leaf; zero-safe)."""
  g0 = cheap.wide_tree(g0)

  def add(a, v):
    ratio = tree_math.tree_norm(a) * tree_math.safe_inverse(
        tree_math.tree_norm(v))
    return tree_math.tree_add_scaled(a, alpha * ratio, v)

  if not per_tensor:
    return add(g0, g_v)
  return jax.tree.map(add, g0, g_v)


# Ours: the first SAM step at 20 % of training by default.
START_FRACTION = 0.2


def _combine(when: cheap.When, per_tensor: bool):
  """SAM (and store g_v) on the scheduled steps; reuse g_v between.

  Only the second gradient (and g_v) is inside ``when``'s `jax.lax.cond`;
  the reuse axpy is outside it, so XLA fuses it with the base optimizer's
  update, and a SAM step's output is chosen by a select (never a blend).
  """

  def combine(ctx: variant_lib.Context) -> variant_lib.Step:
    alpha = ctx.hyperparams['alpha']
    g0 = cheap.wide_tree(ctx.clean_grad)

    def take_sam():
      loss, g1 = ctx.perturbed()
      g1 = cheap.wide_tree(g1)
      # g_v in the state's float32, whatever the parameters' dtype.
      return loss, g1, tree_math.tree_cast_like(
          _orthogonal(g1, g0, per_tensor), ctx.state.g_v)

    def keep():
      # g1 is not read here (the select takes the reuse).
      return ctx.state.perturbed_loss, g0, ctx.state.g_v

    sam_step, _, (loss, g1, g_v) = when.choose(ctx, take_sam, keep)
    grad = tree_math.tree_select(
        sam_step, g1, _reuse(g0, ctx.state.g_v, alpha, per_tensor))
    return variant_lib.Step(grad, loss, ctx.state._replace(
        sam_step=sam_step, g_v=g_v))

  return combine


@transformation.transformation
def looksam(
    rho: ScalarOrSchedule = 0.05,
    k: int = 8,
    alpha: ScalarOrSchedule = 0.1,
    *,
    total_steps: Optional[int] = None,
    start: Optional[int] = None,
    per_tensor: bool = False,
    **common: Unpack[transformation.CommonOptions],
) -> variant_lib.Variant:
  r"""LookSAM: a SAM step every k steps; between them, its direction reused.

  On steps :math:`t = 0, k, 2k, \dots` of its own count LookSAM is SAM
  (:math:`\epsilon = \rho\, g_0/\|g_0\|`, hands on :math:`g_1 = \nabla
  L(w + \epsilon)`) and stores the part of :math:`g_1` orthogonal to
  :math:`g_0`, the "sharpness-aware" component:

  .. math::

    g_v = g_1 - \|g_1\| \cos(g_0, g_1)\, \frac{g_0}{\|g_0\|}
        = g_1 - \langle g_1, \hat g_0\rangle \hat g_0 .

  The steps between take no second gradient and hand on

  .. math::

    g = g_0 + \alpha\, \frac{\|g_0\|}{\|g_v\|}\, g_v .

  The second gradient is inside a `jax.lax.cond`: a reuse step costs one
  gradient plus two norms and an axpy, which sit outside the cond (the
  handed-on gradient is a select between the two), so XLA fuses them with
  the base optimizer's update; ``g_v`` is kept as a tree like the
  parameters (no flattening).

  **Schedule.** The SAM steps are :math:`t = s, s + k, s + 2k, \dots`
  with :math:`s` = ``start`` (default 0, the paper's schedule); before step
  :math:`s` there is no SAM step and :math:`g_v = 0`, so those steps hand
  on :math:`g_0` exactly. ``per_tensor=False`` (default) uses the global
  vectors, as the paper's Algorithm 1; ``per_tensor=True`` does the
  projection, cosine and norm ratio per parameter leaf. On a reuse step
  ``perturbed_loss`` keeps the last SAM step's value. The measured
  behaviour of the defaults, and how they compare with peers' ports, are in
  the docs (variants/cheap.md, guide/choosing.md).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
    >>> params = {'w': jnp.array([1.0, -0.5, 0.25])}
    >>> batch = {'x': jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]),
    ...          'y': jnp.array([1.0, -1.0])}
    >>> tx = optax.chain(sam_optax.looksam(loss_fn, rho=0.1, k=2),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   grads = jax.grad(loss_fn)(params, batch=batch)
    ...   updates, state = tx.update(grads, state, params, batch=batch)
    ...   params = optax.apply_updates(params, updates)
    >>> print(bool(state[0].sam_step), ' '.join(f'{x:.3f}' for x in params['w']))
    False 1.177 -0.295 -0.194

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    rho: radius of the ascent, a number >= 0 or a schedule.
    k: a SAM step every k steps (an int >= 1; 1 is SAM).
    total_steps: deprecated (a `DeprecationWarning`): given without
      ``start``, it still moves the first SAM step to 20 % of it.
    start: the first SAM step (a static int >= 0, default 0): steps before
      it are plain g0 steps.
    alpha: weight of the reused direction, a number >= 0 or a schedule.
      The default 0.1 is ours: the paper's 0.7 (ViTs at batch 4096) broke
      training on all four tasks of our study (docs/guide/choosing.md),
      where 0.1 trained on every one.
    per_tensor: the projection and norms per parameter leaf (as
      pytorch-optimizer) instead of over the whole vector (the paper).

  ``ascent_steps``, ``has_aux``, ``perturbation_mask``, ``layout`` and
  ``track_cosine`` work as in `sam`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `LookSAMState`.

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
  """
  k = validation.check_static_int('looksam', 'k', k, minimum=1)
  if total_steps is not None:
    total_steps = validation.check_static_int('looksam', 'total_steps',
                                              total_steps, minimum=1)
    if start is None:
      warnings.warn(
          'looksam: total_steps is deprecated: it only moved the first SAM'
          f' step to 20 % of training (start={int(START_FRACTION * total_steps)}'
          ' here). The default start is 0 whether or not total_steps is'
          ' given in a later release; pass start= to keep a late start.',
          DeprecationWarning, stacklevel=2)
  if start is None:
    start = 0 if total_steps is None else int(START_FRACTION * total_steps)
  start = validation.check_static_int('looksam', 'start', start, minimum=0)
  validation.check_bool('looksam', 'per_tensor', per_tensor)
  return variant_lib.Variant(
      hyperparams={'rho': rho, 'alpha': alpha},
      state=LookSAMState, combine=_combine(cheap.every(k, start), per_tensor),
      agree={'sam_step': 'same', 'g_v': 'mean'},
      init=lambda params: dict(
          sam_step=jnp.asarray(False),
          g_v=jax.tree.map(
              lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)))
