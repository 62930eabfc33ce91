"""The one sharpness-aware pipeline that every variant is built from.

A step has three pieces (DESIGN.md, "The pipeline inside"):

1. **ascent** -- a unit-length direction ``d(g, w)`` in the variant's metric;
   the pipeline walks ``ascent_steps`` steps of length ``rho / ascent_steps``
   from ``w``, re-evaluating the gradient at each intermediate point;
2. **re-gradient** -- ``g_k = grad loss_fn(w + eps, **loss_kwargs)``;
3. **combine** -- the gradient handed on (``g_k`` for SAM and ASAM).

A variant supplies the direction (and optionally a combine step and extra
state); the pipeline owns hyperparameter schedules, validation, numerics,
diagnostics and the `optax.GradientTransformationExtraArgs` plumbing, and the
data-parallel / m-sharpness layout (`Parallel`, see sam_optax/_src/devices.py).
"""

from __future__ import annotations

import dataclasses
from typing import (Any, Callable, Hashable, Mapping, NamedTuple, Optional,
                    Sequence, Union)

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import devices
from sam_optax._src import tree_math
from sam_optax._src import validation

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

# direction(grad, params, hyperparams) -> unit-length ascent direction.
Direction = Callable[[PyTree, PyTree, Mapping[str, jax.Array]], PyTree]


@dataclasses.dataclass(frozen=True)
class Ascent:
  """What the ascent and re-gradient pieces produced, for a combine step.

  With ``chunk_size`` (and no shared perturbation) a combine step sees one
  chunk: ``clean_grad``, ``perturbed_grad``, ``perturbed_loss`` and
  ``loss_at`` are the chunk's; with ``sync_perturbation`` ``clean_grad`` is the
  axis-averaged gradient; with ``shared_perturbation`` the gradients and
  ``loss_at`` are accumulated over all chunks.

  Attributes:
    clean_grad: g0 = grad L(w), the gradient the perturbation was built from.
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
  axis_name: Optional[Hashable] = None


# combine(ascent) -> (gradient handed on, {extra state field: value}).
Combine = Callable[[Ascent], tuple[PyTree, dict[str, jax.Array]]]


def _evaluate(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  if callable(value):
    value = value(count)
  return jnp.asarray(value, dtype=jnp.float32)


def _is_static_zero(value: ScalarOrSchedule) -> bool:
  return isinstance(value, (int, float)) and float(value) == 0.0


@dataclasses.dataclass(frozen=True)
class Parallel:
  """How a step is laid over devices and over chunks of the batch.

  Built and validated by `sharpness_aware` from its keyword arguments of the
  same names (every variant forwards them); see there for their meaning.
  """

  axis_name: Optional[Hashable] = None
  sync_perturbation: bool = False
  axis_index_groups: Optional[tuple[tuple[int, ...], ...]] = None
  chunk_size: Optional[int] = None
  chunk_mode: devices.ChunkMode = devices.SEQUENTIAL
  shared_perturbation: bool = False

  @classmethod
  def create(cls, owner: str, **options) -> 'Parallel':
    """Validates the options; errors name ``owner`` and say what to do."""
    o = cls(**options)
    for name in ('sync_perturbation', 'shared_perturbation'):
      if not isinstance(getattr(o, name), bool):
        raise TypeError(
            f'{owner}: {name} must be a bool, got {getattr(o, name)!r}.'
        )
    if o.axis_name is not None:
      try:
        hash(o.axis_name)
      except TypeError as error:
        raise TypeError(
            f'{owner}: axis_name must be a hashable axis name (the name given'
            ' to pmap / shard_map, e.g. "batch"), got'
            f' {o.axis_name!r}.'
        ) from error
    if o.sync_perturbation and o.axis_name is None:
      raise ValueError(
          f'{owner}: sync_perturbation=True averages the gradient that builds'
          ' the perturbation over a device axis, so it needs axis_name= (the'
          ' pmap / shard_map axis).'
      )
    groups = o.axis_index_groups
    if groups is not None:
      if not o.sync_perturbation:
        raise ValueError(
            f'{owner}: axis_index_groups syncs the perturbation inside groups'
            ' of devices; it needs sync_perturbation=True (and axis_name).'
        )
      try:
        groups = tuple(tuple(int(i) for i in g) for g in groups)
      except TypeError as error:
        raise TypeError(
            f'{owner}: axis_index_groups must be a list of lists of device'
            f' indices, e.g. [[0, 1], [2, 3]], got {o.axis_index_groups!r}.'
        ) from error
      flat = [i for g in groups for i in g]
      if (not groups or len({len(g) for g in groups}) != 1
          or len(set(flat)) != len(flat) or min(flat) < 0
          or sorted(flat) != list(range(len(flat)))):
        raise ValueError(
            f'{owner}: axis_index_groups must split the axis indices'
            ' 0..n-1 into disjoint groups of equal size, e.g.'
            f' [[0, 1], [2, 3]]; got {o.axis_index_groups!r}.'
        )
      object.__setattr__(o, 'axis_index_groups', groups)
    if o.chunk_size is not None:
      object.__setattr__(o, 'chunk_size', validation.check_static_int(
          owner, 'chunk_size', o.chunk_size, minimum=1))
    mode = devices.check_chunk_mode(owner, o.chunk_mode)
    if o.chunk_size is None:
      if mode != devices.SEQUENTIAL:
        raise ValueError(
            f'{owner}: chunk_mode={mode!r} has no effect without chunk_size;'
            ' pass chunk_size=m (examples per chunk) too.'
        )
      if o.shared_perturbation:
        raise ValueError(
            f'{owner}: shared_perturbation=True accumulates gradients over'
            ' chunks of the batch; pass chunk_size=m (examples per chunk).'
        )
    elif o.sync_perturbation and not o.shared_perturbation:
      raise ValueError(
          f'{owner}: sync_perturbation=True builds one perturbation from the'
          ' whole (global) batch, while chunk_size without'
          ' shared_perturbation=True gives every chunk its own. Drop one of'
          ' them, or add shared_perturbation=True for global SAM with gradient'
          ' accumulation.'
      )
    if isinstance(mode, devices.MeshChunks) and o.axis_name is not None:
      raise ValueError(
          f'{owner}: chunk_mode=mesh_chunks(...) lays chunks over a mesh under'
          ' plain jax.jit; inside pmap / shard_map (axis_name=) use'
          " chunk_mode='sequential' or 'vectorized'."
      )
    return o


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
    axis_name: Optional[Hashable] = None,
    sync_perturbation: bool = False,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    chunk_size: Optional[int] = None,
    chunk_mode: devices.ChunkMode = devices.SEQUENTIAL,
    shared_perturbation: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a sharpness-aware transformation from its pieces.

  **Devices.** With ``axis_name`` the transformation runs inside `jax.pmap`
  or `jax.shard_map` over that axis. The incoming gradient is the device's
  own; each device perturbs with it (m-sharpness, m = per-device batch, as in
  the SAM paper's TPU runs) and the gradient handed on is averaged over the
  axis. The diagnostics ride in the same `jax.lax.pmean`, so a step
  compiles to one all-reduce, like data-parallel SGD; they become the mean
  over devices of the per-device values (perturbed loss, ``||g0||``, and the
  cosine between each device's g0 and its own combined gradient), which
  keeps the state replicated. Inside `jax.shard_map` (with its default
  ``check_vma=True``) a gradient taken at replicated weights is already summed
  over the devices, so take the incoming one at
  ``jax.lax.pcast(params, axis_name, to='varying')`` (a clear error says so
  otherwise); the pipeline does the same for its own passes.
  ``sync_perturbation=True`` averages g0 (and, for k > 1, each intermediate
  ascent gradient) over the axis first: SAM on the global batch, one more
  all-reduce per ascent step. With
  ``axis_index_groups`` (pmap only) that average is taken inside groups of
  devices (m = group size x per-device batch); the returned gradient is
  still averaged over the whole axis. Variant state from a combine step must
  agree across devices by itself (`Ascent.axis_name`).

  **Chunks (in-device m-sharpness).** With ``chunk_size=m`` every array of
  the loss keyword arguments with a leading batch dimension is split into
  chunks of m examples (scalars, e.g. a typed key from `jax.random.key`, go
  to every chunk; close over other non-batch arrays in the loss). Each
  chunk gets its own clean gradient (recomputed per chunk: one extra forward
  and backward pass over the batch per step, 3 passes instead of SAM's 2;
  the incoming gradient is then used only for the diagnostics and for
  ``rho=0``), its own ascent, re-gradient and combine, and the combined
  gradients are averaged. ``chunk_mode='sequential'`` walks the chunks in a
  `jax.lax.scan` (peak memory of one chunk plus a float32 running sum);
  ``'vectorized'`` runs them at once with `jax.vmap` (faster on wide devices,
  memory of all chunks and one gradient per chunk);
  ``devices.mesh_chunks(mesh, axis)`` is vectorized with the chunks laid over
  a mesh axis under plain `jax.jit`. Extra state from a combine step (e.g.
  XSAM's alpha and probe losses) is reduced over chunks: floating-point
  fields are averaged, other fields take the first chunk's value.
  ``perturbed_loss`` is the mean of the chunks' perturbed losses.

  **Shared perturbation (SAM with gradient accumulation).** With
  ``chunk_size=m, shared_perturbation=True`` there is a single perturbation
  for the whole batch: the incoming ``updates`` must be the full-batch clean
  gradient g0 -- compute it chunk by chunk with
  `devices.chunked_value_and_grad` -- and every later gradient (the
  intermediate ascent gradients and the perturbed gradient) is accumulated
  over the chunks, as is ``loss_at``. The result is SAM on the full batch at
  the memory of one chunk: the way to run SAM on batches that do not fit in
  memory. It composes with ``axis_name`` and ``sync_perturbation``.

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
    axis_name: the pmap / shard_map axis to average the result over, or None.
    sync_perturbation: build the perturbation from the axis-averaged gradient
      (global SAM) instead of each device's own.
    axis_index_groups: with ``sync_perturbation``, average inside these
      groups of axis indices only (pmap), e.g. ``[[0, 1], [2, 3]]``.
    chunk_size: m, examples per perturbation inside the step, or None.
    chunk_mode: ``'sequential'``, ``'vectorized'`` or
      ``devices.mesh_chunks(mesh, axis)``.
    shared_perturbation: with ``chunk_size``, one perturbation for all
      chunks, gradients accumulated over chunks (gradient accumulation).

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  validation.check_loss_fn(owner, loss_fn)
  ascent_steps = validation.check_static_int(
      owner, 'ascent_steps', ascent_steps, minimum=1
  )
  if not isinstance(has_aux, bool):
    raise TypeError(f'{owner}: has_aux must be a bool, got {has_aux!r}.')
  layout = Parallel.create(
      owner,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      axis_index_groups=axis_index_groups,
      chunk_size=chunk_size,
      chunk_mode=chunk_mode,
      shared_perturbation=shared_perturbation,
  )
  scalar_loss = validation.checked_scalar_loss(owner, loss_fn, has_aux)
  value_and_grad = jax.value_and_grad(scalar_loss)
  rho_is_zero = _is_static_zero(hyperparams['rho'])

  axes = layout.axis_name
  axes = () if axes is None else (
      tuple(axes) if isinstance(axes, (tuple, list)) else (axes,))

  def varying_axes(x) -> frozenset:
    try:
      aval = jax.typeof(x)
    except TypeError:  # a non-array keyword argument (e.g. a string)
      return frozenset()
    manual = getattr(aval, 'manual_axis_type', None)  # jax >= 0.10
    if manual is not None:
      return frozenset(getattr(manual, 'varying', ()))
    return frozenset(getattr(aval, 'vma', ()))  # older jax

  def check_local(updates, loss_kwargs) -> bool:
    """Whether shard_map tracks device variance here (check_vma=True).

    Then a gradient taken at replicated weights is summed over the devices,
    so the incoming gradient must vary over the axis, and every gradient the
    pipeline takes is taken at weights marked varying (`make_local`).
    """
    if not axes:
      return False
    tracked = any(set(axes) & varying_axes(x)
                  for x in jax.tree.leaves((updates, loss_kwargs)))
    if tracked and not any(set(axes) <= varying_axes(g)
                           for g in jax.tree.leaves(updates)):
      raise ValueError(
          f'{owner}: with axis_name={layout.axis_name!r} the incoming gradient'
          ' must be each device\'s own, but it is replicated over the axis:'
          ' inside jax.shard_map, jax.grad with respect to replicated params'
          ' already sums the gradient over the devices. Differentiate with'
          f' respect to jax.lax.pcast(params, {layout.axis_name!r},'
          " to='varying') instead, or use jax.shard_map(...,"
          ' check_vma=False).'
      )
    return tracked

  def make_local(tree, tracked):
    if not tracked:
      return tree

    def cast(x):
      missing = tuple(a for a in axes if a not in varying_axes(x))
      return jax.lax.pcast(x, missing, to='varying') if missing else x

    return jax.tree.map(cast, tree)

  def sync(grad):
    if not layout.sync_perturbation:
      return grad
    return jax.lax.pmean(grad, layout.axis_name,
                         axis_index_groups=layout.axis_index_groups)

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

  def sharpen(clean_grad, params, state, hp, grad_at, loss_at):
    """Ascent, re-gradient and combine from one clean gradient."""
    step_length = hp['rho'] / ascent_steps
    # 1. Ascent: k normalized steps from w, displacement kept in float32.
    grad = clean_grad
    displacement = jax.tree.map(
        lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
        params,
    )
    point = params
    for i in range(ascent_steps):
      if i > 0:
        _, grad = grad_at(point)
        grad = sync(grad)
      step = direction(grad, params, hp)
      displacement = tree_math.tree_add_scaled(displacement, step_length, step)
      point = jax.tree.map(
          lambda p, e: (p + e).astype(p.dtype), params, displacement
      )

    # 2. Re-gradient at w + eps.
    perturbed_loss, perturbed_grad = grad_at(point)
    perturbed_loss = jnp.asarray(perturbed_loss, jnp.float32)

    # 3. Combine.
    if combine is None:
      out, extra = perturbed_grad, {}
    else:
      out, extra = combine(
          Ascent(
              clean_grad=clean_grad,
              perturbed_grad=perturbed_grad,
              perturbed_loss=perturbed_loss,
              params=params,
              displacement=displacement,
              hyperparams=hp,
              count=state.count,
              state=state,
              loss_at=loss_at,
              axis_name=layout.axis_name,
          )
      )
    return tree_math.tree_cast_like(out, params), perturbed_loss, extra

  def update_fn(updates, state, params=None, **loss_kwargs):
    validation.check_params_given(owner, params)
    validation.check_same_tree(owner, updates, params)
    hp = {name: _evaluate(v, state.count) for name, v in hyperparams.items()}
    rho = hp['rho']
    mode = layout.chunk_mode
    tracked = check_local(updates, loss_kwargs)

    def local_value_and_grad(w, kw):
      return value_and_grad(make_local(w, tracked), kw)

    if layout.chunk_size is None:
      clean_grad = sync(updates)
      out, perturbed_loss, extra = sharpen(
          clean_grad, params, state, hp,
          grad_at=lambda w: local_value_and_grad(w, loss_kwargs),
          loss_at=lambda w: scalar_loss(w, loss_kwargs),
      )
    else:
      split_kwargs, chunks = devices.split(
          owner, loss_kwargs, layout.chunk_size, mode
      )
      if layout.shared_perturbation:
        clean_grad = sync(updates)

        def grad_at(w):
          (loss, grad), _ = devices.over_chunks(
              lambda kw: (local_value_and_grad(w, kw), None),
              split_kwargs, chunks, mode)
          return loss, tree_math.tree_cast_like(grad, params)

        def loss_at(w):
          loss, _ = devices.over_chunks(
              lambda kw: (scalar_loss(w, kw), None), split_kwargs, chunks,
              mode)
          return loss

        out, perturbed_loss, extra = sharpen(
            clean_grad, params, state, hp, grad_at=grad_at, loss_at=loss_at
        )
      else:
        clean_grad = updates

        def one_chunk(kw):
          _, chunk_grad = local_value_and_grad(params, kw)
          chunk_out, chunk_loss, chunk_extra = sharpen(
              chunk_grad, params, state, hp,
              grad_at=lambda w: local_value_and_grad(w, kw),
              loss_at=lambda w: scalar_loss(w, kw),
          )
          return (chunk_out, chunk_loss), chunk_extra

        (out, perturbed_loss), stacked = devices.over_chunks(
            one_chunk, split_kwargs, chunks, mode
        )
        out = tree_math.tree_cast_like(out, params)
        extra = {
            name: jnp.mean(value, axis=0).astype(value.dtype)
            if jnp.issubdtype(value.dtype, jnp.inexact) else value[0]
            for name, value in stacked.items()
        }

    out = tree_math.tree_cast_like(out, updates)
    # rho = 0 is exactly the base optimizer: a select, never a blend.
    if rho_is_zero:
      out = updates
    else:
      out = tree_math.tree_select(rho > 0, out, updates)
    diagnostics = (
        perturbed_loss,
        tree_math.tree_norm(clean_grad),
        tree_math.safe_cosine(clean_grad, out),
    )
    if layout.axis_name is not None:
      # One all-reduce: the gradient and the diagnostics together.
      out, diagnostics = jax.lax.pmean((out, diagnostics), layout.axis_name)
    perturbed_loss, grad_norm, cosine = diagnostics

    new_state = state_type(
        count=optax.safe_increment(state.count),
        perturbed_loss=perturbed_loss,
        grad_norm=grad_norm,
        cosine=cosine,
        **extra,
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
