"""Loops over curvature products: compact `lax` loops or unrolled Python loops.

On XLA:CPU a convolution inside a loop body (`jax.lax.while_loop`,
`fori_loop`, `scan`, `lax.map`, and the branches of `lax.cond` too) loses its
fast path: one Hessian-vector product of a small CNN there costs 10-40
gradients instead of about 2 (https://github.com/jax-ml/jax/issues/12868;
XLA flags do not help). A Python loop traced into the program keeps every
product in the entry computation, at the fast path, at a compile time that
grows with the number of products. `resolve` picks: unrolled only on a CPU
backend *and* when one product contains a convolution, so matmul models and
GPU / TPU keep the compact loops (and their constant compile time).

Static counts only: `fori` and `map` take Python ints / arrays with a static
leading axis, as `lax.fori_loop` and `lax.map` do.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp

_CONV = 'conv_general_dilated'


def check_unroll(owner: str, unroll: Any) -> Optional[bool]:
  """``unroll`` if it is None, True or False; else a TypeError."""
  if unroll is not None and not isinstance(unroll, bool):
    raise TypeError(
        f'{owner}: unroll must be None (unroll on CPU for convolutional'
        f' models), True or False, got {unroll!r}.')
  return unroll


def _has_primitive(jaxpr: jex_core.Jaxpr, name: str) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
  return any(_has_primitive(sub, name) for sub in jex_core.subjaxprs(jaxpr))


def has_convolution(fn: Callable[..., Any], *args: Any) -> bool:
  """Whether ``fn(*args)`` traces to a `lax.conv_general_dilated`.

  Looks into every sub-jaxpr (jit, scan, cond, custom derivatives). Traces
  ``fn`` once; nothing runs.
  """
  jaxpr = jax.make_jaxpr(fn)(*args)
  return _has_primitive(jaxpr.jaxpr, _CONV)


def resolve(unroll: Optional[bool], matvec: Callable[[jax.Array], jax.Array],
            size: int) -> bool:
  """The loop form: ``unroll`` if given, else the automatic choice.

  None unrolls when the default backend is CPU and ``matvec`` (one curvature
  product on flat float32 vectors of length ``size``) contains a
  convolution; on other backends ``matvec`` is not even traced.
  """
  if unroll is not None:
    return unroll
  if jax.default_backend() != 'cpu':
    return False
  try:
    return has_convolution(matvec, jnp.zeros((size,), jnp.float32))
  except Exception:  # pylint: disable=broad-except
    # The choice is only about speed: whatever fails to trace here fails
    # again, with its own message, when the helper calls matvec.
    return False


def fori(lower: int, upper: int, body: Callable[[Any, Any], Any], init: Any,
         unroll: bool) -> Any:
  """`lax.fori_loop`, or a Python loop with static int indices."""
  if not unroll:
    return jax.lax.fori_loop(lower, upper, body, init)
  state = init
  for i in range(lower, upper):
    state = body(i, state)
  return state


def map(  # pylint: disable=redefined-builtin
    fn: Callable[[Any], Any], xs: Any, unroll: bool) -> Any:
  """`lax.map` over the leading axis, or a Python loop stacking results.

  A Python loop, not `jax.vmap`: vmapping a convolution's derivative over
  tangents batches its kernel (a grouped convolution, itself slow on CPU:
  ~4 gradients per product on the benchmark CNN against ~1.8 looped) and
  multiplies activation memory by the number of probes.
  """
  if not unroll:
    return jax.lax.map(fn, xs)
  count = jax.tree.leaves(xs)[0].shape[0]
  outs = [fn(jax.tree.map(lambda x, i=i: x[i], xs)) for i in range(count)]
  return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)


def while_frozen(cond: Callable[[Any], jax.Array],
                 body: Callable[[Any], Any], init: Any, max_steps: int,
                 unroll: bool) -> Any:
  """`lax.while_loop`, or ``max_steps`` unrolled steps frozen once done.

  Unrolled, every step runs ``body`` and keeps its result only while
  ``cond`` holds (a `jnp.where` per leaf), so the final state is that of the
  while loop (up to rounding) provided ``cond`` is False after ``max_steps``
  steps; the products after the stop are computed and discarded (a
  `lax.cond` to skip them would put them back in a slow branch body).
  """
  if not unroll:
    return jax.lax.while_loop(cond, body, init)
  state = init
  for _ in range(max_steps):
    active = cond(state)
    new = body(state)
    state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state)
  return state
