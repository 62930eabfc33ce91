"""The one sharpness-aware pipeline that every variant is built from.

A step has three pieces (DESIGN.md, "The pipeline inside"):

1. **ascent** -- a unit-length direction ``d(g, w)`` in the variant's metric;
   the pipeline walks ``ascent_steps`` steps of length ``rho / ascent_steps``
   from ``w``, re-evaluating the gradient at each intermediate point;
2. **re-gradient** -- ``g_k = grad loss_fn(w + eps, **loss_kwargs)``;
3. **combine** -- the gradient handed on (``g_k`` for SAM and ASAM).

A variant supplies the direction (and optionally a combine step and extra
state); the pipeline owns hyperparameter schedules, validation, numerics,
diagnostics and the `optax.GradientTransformationExtraArgs` plumbing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree_math
from sam_optax._src import validation

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

# direction(grad, params, hyperparams) -> unit-length ascent direction.
Direction = Callable[[PyTree, PyTree, Mapping[str, jax.Array]], PyTree]


@dataclasses.dataclass(frozen=True)
class Ascent:
  """What the ascent and re-gradient pieces produced, for a combine step.

  Attributes:
    clean_grad: g0 = grad L(w), the incoming gradient.
    perturbed_grad: g_k = grad L(w + eps).
    perturbed_loss: L(w + eps), float32.
    params: the clean weights w.
    displacement: eps = w_k - w, accumulated in float32.
    hyperparams: every hyperparameter evaluated at this step (float32).
    count: the transformation's step count before this update.
    state: the transformation's state before this update.
    loss_at: ``loss_at(w') -> L(w')``, a forward pass on the same minibatch
      (aux dropped), for variants that probe the loss.
    axis_name: the device axis (pmap / shard_map) when the transformation
      runs per device, else None; a combine step that chooses something from
      local values (e.g. XSAM's probe) must agree across it.
  """

  clean_grad: PyTree
  perturbed_grad: PyTree
  perturbed_loss: jax.Array
  params: PyTree
  displacement: PyTree
  hyperparams: Mapping[str, jax.Array]
  count: jax.Array
  state: Any
  loss_at: Callable[[PyTree], jax.Array]
  axis_name: Optional[str] = None


# combine(ascent) -> (gradient handed on, {extra state field: value}).
Combine = Callable[[Ascent], tuple[PyTree, dict[str, jax.Array]]]


def _evaluate(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  if callable(value):
    value = value(count)
  return jnp.asarray(value, dtype=jnp.float32)


def _is_static_zero(value: ScalarOrSchedule) -> bool:
  return isinstance(value, (int, float)) and float(value) == 0.0


def sharpness_aware(
    loss_fn: Callable[..., Any],
    *,
    owner: str,
    hyperparams: Mapping[str, ScalarOrSchedule],
    direction: Direction,
    state_type: type[NamedTuple],
    ascent_steps: int = 1,
    has_aux: bool = False,
    combine: Optional[Combine] = None,
    init_extra: Optional[Callable[[PyTree], dict[str, jax.Array]]] = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a sharpness-aware transformation from its pieces.

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar, or
      ``(scalar, aux)`` when ``has_aux``.
    owner: the public name, used in error messages.
    hyperparams: scalars or schedules, evaluated on the step count; must
      include ``'rho'``, the total length of the ascent.
    direction: the ascent piece.
    state_type: a NamedTuple with fields ``count``, ``perturbed_loss``,
      ``grad_norm``, ``cosine`` and whatever ``init_extra`` returns.
    ascent_steps: number of normalized ascent steps of length rho / k.
    has_aux: whether loss_fn returns ``(loss, aux)``; aux is dropped.
    combine: the combine piece; ``None`` hands on g_k.
    init_extra: initial values of the variant's extra state fields.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  validation.check_loss_fn(owner, loss_fn)
  ascent_steps = validation.check_static_int(
      owner, 'ascent_steps', ascent_steps, minimum=1
  )
  if not isinstance(has_aux, bool):
    raise TypeError(f'{owner}: has_aux must be a bool, got {has_aux!r}.')
  scalar_loss = validation.checked_scalar_loss(owner, loss_fn, has_aux)
  value_and_grad = jax.value_and_grad(scalar_loss)
  rho_is_zero = _is_static_zero(hyperparams['rho'])

  def init_fn(params):
    extra = init_extra(params) if init_extra is not None else {}
    zero = jnp.zeros([], jnp.float32)
    return state_type(
        count=jnp.zeros([], jnp.int32),
        perturbed_loss=zero,
        grad_norm=zero,
        cosine=zero,
        **extra,
    )

  def update_fn(updates, state, params=None, **loss_kwargs):
    validation.check_params_given(owner, params)
    validation.check_same_tree(owner, updates, params)
    hp = {name: _evaluate(v, state.count) for name, v in hyperparams.items()}
    rho = hp['rho']
    step_length = rho / ascent_steps

    # 1. Ascent: k normalized steps from w, displacement kept in float32.
    grad = updates
    displacement = jax.tree.map(
        lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
        params,
    )
    point = params
    for i in range(ascent_steps):
      if i > 0:
        _, grad = value_and_grad(point, loss_kwargs)
      step = direction(grad, params, hp)
      displacement = tree_math.tree_add_scaled(displacement, step_length, step)
      point = jax.tree.map(
          lambda p, e: (p + e).astype(p.dtype), params, displacement
      )

    # 2. Re-gradient at w + eps.
    perturbed_loss, perturbed_grad = value_and_grad(point, loss_kwargs)
    perturbed_loss = perturbed_loss.astype(jnp.float32)

    # 3. Combine.
    if combine is None:
      out, extra = perturbed_grad, {}
    else:
      out, extra = combine(
          Ascent(
              clean_grad=updates,
              perturbed_grad=perturbed_grad,
              perturbed_loss=perturbed_loss,
              params=params,
              displacement=displacement,
              hyperparams=hp,
              count=state.count,
              state=state,
              loss_at=lambda w: scalar_loss(w, loss_kwargs),
          )
      )
    out = tree_math.tree_cast_like(out, updates)
    # rho = 0 is exactly the base optimizer: a select, never a blend.
    if rho_is_zero:
      out = updates
    else:
      out = tree_math.tree_select(rho > 0, out, updates)

    new_state = state_type(
        count=optax.safe_increment(state.count),
        perturbed_loss=perturbed_loss,
        grad_norm=tree_math.tree_norm(updates),
        cosine=tree_math.safe_cosine(updates, out),
        **extra,
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
