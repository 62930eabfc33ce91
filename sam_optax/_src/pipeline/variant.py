"""What a sharpness-aware variant declares, and what its pieces are given.

A variant is a `Variant`: its hyperparameters, its typed state, its ascent
direction, its combine (the gradient it hands on) and how its own state
fields agree across devices and chunks. The pipeline (`transformation.py`,
`update.py`) owns everything else: the name, schedules, validation,
numerics, the layout, the diagnostics and the optax plumbing. A piece sees one *group* -- the whole
batch, one chunk, or one device -- through a `Context`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.core
import jax.numpy as jnp

from sam_optax._src.core import directions
from sam_optax._src.core import tree_math
from sam_optax._src.core import validation

PyTree = Any
ScalarOrSchedule = validation.ScalarOrSchedule
COMMON_FIELDS = ('count', 'perturbed_loss', 'grad_norm', 'cosine')


@dataclasses.dataclass(frozen=True)
class Bound:
  """The interval a hyperparameter lies in, declared next to it, once.

  The pipeline enforces it twice from this one declaration: a number when
  the transformation is built (a ValueError naming the interval), a
  schedule's or a traced value at every step (out of the interval it
  becomes NaN, so the step is skipped as non-finite -- never clamped).
  """

  low: float = 0.0
  high: float = float('inf')
  low_open: bool = False
  high_open: bool = False

  def holds(self, x):
    """Whether ``x`` (a number or an array) lies in the interval."""
    above = x > self.low if self.low_open else x >= self.low
    below = x < self.high if self.high_open else x <= self.high
    return above & below

  def __str__(self) -> str:
    if self.high == float('inf'):
      return f'{">" if self.low_open else ">="} {self.low:g}'
    return (f'in {"(" if self.low_open else "["}{self.low:g},'
            f' {self.high:g}{")" if self.high_open else "]"}')

  def check(self, owner: str, name: str, value: Any) -> None:
    """A number out of the interval is an error (others: at every step)."""
    validation.check_hyperparameter(owner, name, value,
                                    allow_zero=not self.low_open)
    if callable(value) or isinstance(value, jax.core.Tracer):
      return
    number = float(value)  # a Python number or a concrete 0-d array
    if not self.holds(number):
      raise ValueError(f'{owner}: {name} must be {self}, got {number:g}.')


NONNEGATIVE = Bound()
POSITIVE = Bound(low_open=True)
UNIT = Bound(high=1.0)  # [0, 1]
BELOW_ONE = Bound(high=1.0, high_open=True)  # [0, 1)
AGREEMENTS = ('mean', 'same')


class Group(NamedTuple):
  """One group's gradients, built by the layout (see `groups.py`).

  Attributes:
    clean_grad: g0, the gradient the group's perturbation is built from.
    grad_at: ``w -> (loss, grad)`` on the group's examples.
    loss_at: ``w -> loss`` on the group's examples (a forward pass).
    losses_at: ``(w, batch_argnames=None) -> (n,)``: each of the group's n
      examples' own loss (``loss_fn`` on a batch of that one example; n
      forward passes, vmapped). ``batch_argnames`` names the per-example
      keyword arguments (default: the layout's `Chunks` names, else every
      array with a leading dimension).
    grad_on: ``(w, indices, batch_argnames=None) -> (loss, grad)`` on the
      examples ``indices`` of the group only (a static number of them; the
      loss is ``loss_fn`` on those rows).
    mean: averages a value computed from ``losses_at`` over the group's
      devices (``PerDevice(sync=True)``), so it is the group's; the
      identity otherwise.

  With ``PerDevice(sync=True)`` a group spans devices, and every loss and
  gradient is already averaged over them -- except ``losses_at``, which
  gives this device's examples; ``grad_on`` then selects among this
  device's examples and averages the gradient over the group.
  """

  clean_grad: PyTree
  grad_at: Callable[[PyTree], tuple[jax.Array, PyTree]]
  loss_at: Callable[[PyTree], jax.Array]
  losses_at: Optional[Callable[..., jax.Array]] = None
  grad_on: Optional[Callable[..., tuple[jax.Array, PyTree]]] = None
  mean: Callable[[PyTree], PyTree] = lambda tree: tree


def _piece(piece: Optional[Callable[..., Any]],
           name: str) -> Callable[..., Any]:
  """A group's per-example piece (every layout in `groups.py` builds it)."""
  if piece is None:
    raise ValueError(f'This group has no {name}: build groups with the'
                     ' layouts of pipeline/groups.py, which give every one.')
  return piece


@dataclasses.dataclass(frozen=True)
class Context:
  """What a variant's pieces see for one group, before this update.

  Every method is a fresh computation (each call to `perturbed` is a
  forward and backward pass); call it inside a `jax.lax.cond` branch to pay
  for it only on the steps that take the branch.

  Attributes:
    clean_grad: g0, the group's clean gradient.
    params: the clean weights w.
    hyperparams: every hyperparameter at this step, float32 scalars (NaN
      where a traced value broke its bound).
    state: the transformation's state before this update (an instance of
      the variant's own ``state`` class).
    decision: what the variant's ``decide`` returned, averaged over every
      group of the layout (None without ``decide``; zeros on steps where
      ``decides`` is False).
    decided: whether ``decide`` ran on this step (a bool scalar).
  """

  clean_grad: PyTree
  params: PyTree
  hyperparams: Mapping[str, jax.Array]
  state: Any
  decision: PyTree  # None (a pytree) without decide
  decided: jax.Array
  group: Group
  variant: 'Variant'
  ascent_steps: int
  mask: Optional[PyTree]

  @property
  def count(self) -> jax.Array:
    return self.state.count

  def grad_at(self, point: PyTree, select: Optional[jax.Array] = None,
              batch_argnames=None) -> tuple[jax.Array, PyTree]:
    """(L(point), grad L(point)) on the group's examples, loss in float32.

    With ``select`` (int indices into the group's examples, as `losses_at`
    numbers them; a static count) only those examples: ``loss_fn`` on
    their rows of every per-example keyword argument (``batch_argnames``,
    see `losses_at`).
    """
    if select is None:
      loss, grad = self.group.grad_at(point)
    else:
      loss, grad = _piece(self.group.grad_on, 'grad_on')(point, select,
                                                         batch_argnames)
    return jnp.asarray(loss, jnp.float32), grad

  def loss_at(self, point: PyTree) -> jax.Array:
    """L(point) on the group's examples (a forward pass), float32."""
    return jnp.asarray(self.group.loss_at(point), jnp.float32)

  def losses_at(self, point: PyTree, batch_argnames=None) -> jax.Array:
    """Each example's loss L_i(point) on the group's examples, float32 (n,).

    Example i's loss is ``loss_fn`` on a batch of that one example (forward
    passes only, vmapped). ``batch_argnames`` names the per-example keyword
    arguments; by default those of the layout's `Chunks`, else every array
    with a leading dimension. Under ``PerDevice(sync=True)`` these are this
    device's examples.
    """
    losses_at = _piece(self.group.losses_at, 'losses_at')
    return jnp.asarray(losses_at(point, batch_argnames), jnp.float32)

  def group_mean(self, tree: PyTree) -> PyTree:
    """``tree`` averaged over the group's devices (``PerDevice(sync=True)``).

    For a value computed from this device's `losses_at` (e.g. a mean of
    them), so that it is the group's value like every other loss; the
    identity under every other layout.
    """
    return self.group.mean(tree)

  def shift(self, displacement: PyTree) -> PyTree:
    """w + displacement, in the parameters' dtypes."""
    return jax.tree.map(lambda p, e: (p + e).astype(p.dtype), self.params,
                        displacement)

  def ascend(self, grad: Optional[PyTree] = None) -> PyTree:
    """eps: ``ascent_steps`` steps of length rho / k along the direction.

    Starts from ``grad`` (default: the clean gradient); each later step
    re-evaluates the gradient at the point reached. Leaves outside the
    perturbation mask do not move. Float32 (or wider).
    """
    step = self.hyperparams['rho'] / self.ascent_steps
    grad = self.clean_grad if grad is None else grad
    displacement = None
    for i in range(self.ascent_steps):
      if i:
        _, grad = self.group.grad_at(self.shift(displacement))
      if self.mask is not None:
        grad = jax.tree.map(lambda g, keep: g if keep else jnp.zeros_like(g),
                            grad, self.mask)
      unit = self.variant.direction(grad, self.params, self.hyperparams)
      displacement = (tree_math.tree_scale(step, unit) if displacement is None
                      else tree_math.tree_add_scaled(displacement, step, unit))
    return displacement

  def perturbed(self, grad: Optional[PyTree] = None):
    """(L(w + eps), grad L(w + eps)) with eps = `ascend` (grad)."""
    return self.grad_at(self.shift(self.ascend(grad)))


class Step(NamedTuple):
  """What a combine returns for one group.

  Attributes:
    gradient: the gradient handed on (any float dtype; cast by the pipeline).
    perturbed_loss: L(w + eps) for the diagnostics (float32 scalar).
    state: the variant's state with its own fields updated (the pipeline
      sets ``count`` and the diagnostics).
  """

  gradient: PyTree
  perturbed_loss: jax.Array
  state: NamedTuple


def sam_direction(grad, params, hyperparams):
  """SAM's ascent direction g / ||g|| (zero for a zero gradient)."""
  del params, hyperparams
  return directions.normalized_direction(grad)


def perturbed_gradient(ctx: Context) -> Step:
  """SAM's combine: hand on g_k = grad L(w + eps)."""
  loss, grad = ctx.perturbed()
  return Step(grad, loss, ctx.state)


def initial_diagnostics() -> dict[str, jax.Array]:
  """The common state fields at init: count 0 (int32), zeros (float32)."""
  zero = jnp.zeros([], jnp.float32)
  return dict(count=jnp.zeros([], jnp.int32), perturbed_loss=zero,
              grad_norm=zero, cosine=zero)


@dataclasses.dataclass(frozen=True)
class Variant:
  """A sharpness-aware method, as the pieces the pipeline runs.

  Attributes:
    hyperparams: name -> number or schedule, evaluated every step on the
      state's ``count``; must include ``'rho'``.
    state: the state's NamedTuple class; its first fields are ``count``,
      ``perturbed_loss``, ``grad_norm`` and ``cosine`` (set by the
      pipeline), then the variant's own.
    init: ``params -> {own field: initial value}``, the variant's own
      fields only (none by default); the pipeline adds the common four.
    direction: the ascent piece, ``(grad, params, hyperparams) -> unit
      direction`` in the variant's metric.
    combine: ``Context -> Step``, the gradient handed on.
    agree: for each own state field, how the groups' values become one:
      ``'mean'`` or ``'same'`` (equal in every group by construction,
      e.g. chosen from a ``decision``: that common value, no all-reduce; the
      pipeline checks that the groups agree, and a step where they do not
      is skipped as non-finite).
    decide: optional ``Context -> pytree of floats`` that every group
      computes and that is averaged over all groups before ``combine`` runs,
      so a choice made from it is the same everywhere (XSAM's probe).
    decides: optional ``state -> bool``: on which steps ``decide`` runs
      (a `jax.lax.cond`); every step when None.
    bounds: name -> `Bound` for the hyperparameters not simply ``>= 0``
      (e.g. ``{'beta': UNIT}``); checked once, by the pipeline.
    uses_clean_grad: False for a variant that never reads ``ctx.clean_grad``
      (Momentum-SAM): the pipeline then reads it neither (``grad_norm`` is
      0, "not measured", unless ``track_cosine=True``) nor selects it for
      ``rho == 0`` -- the variant's own gradient at ``w + 0`` is then the
      base optimizer's input -- so under `jax.jit` XLA removes the caller's
      clean gradient and the step costs one gradient.
    name: the public name, used in error messages. The decorator
      (`transformation.transformation`) sets it to the factory's name, so a
      variant declares it only where the two differ; the declaration is
      checked once it has a name.
  """

  hyperparams: Mapping[str, ScalarOrSchedule]
  state: type
  init: Callable[[PyTree], Mapping[str, Any]] = lambda params: {}
  direction: Callable[[PyTree, PyTree, Mapping[str, jax.Array]], PyTree] = (
      sam_direction)
  combine: Callable[[Context], Step] = perturbed_gradient
  agree: Mapping[str, str] = dataclasses.field(default_factory=dict)
  decide: Optional[Callable[[Context], PyTree]] = None
  decides: Optional[Callable[[Any], jax.Array]] = None  # on `state`
  bounds: Mapping[str, Bound] = dataclasses.field(default_factory=dict)
  uses_clean_grad: bool = True
  name: str = ''

  def named(self, name: str) -> 'Variant':
    """This variant with ``name`` as its name, unless it declares its own."""
    return self if self.name else dataclasses.replace(self, name=name)

  def initial_state(self, params: PyTree) -> NamedTuple:
    """The state at init: the common fields (count 0, zero diagnostics)
    and the variant's own from ``init``."""
    return self.state(**initial_diagnostics(), **self.init(params))

  def __post_init__(self):
    if not self.name:  # checked when `named` gives it the factory's name
      return
    fields = tuple(self.state._fields)
    if fields[:4] != COMMON_FIELDS:
      raise TypeError(f'{self.name}: the state must start with the fields'
                      f' {COMMON_FIELDS}, got {fields}.')
    own = set(fields[4:])
    if set(self.agree) != own or not set(self.agree.values()) <= set(
        AGREEMENTS):
      raise TypeError(
          f'{self.name}: agree must map each own state field {sorted(own)}'
          f' to one of {AGREEMENTS}, got {dict(self.agree)}.')
    if 'rho' not in self.hyperparams:
      raise TypeError(f'{self.name}: hyperparams must include rho.')
