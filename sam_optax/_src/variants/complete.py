"""A complete optimizer skips a non-finite step itself: nothing wraps it.

`bsam` and `decoupled_wsam` produce the final update, so
`optax.apply_if_finite` around them sees only the incoming gradient, and
after them there is nothing to wrap. They run each step through
`skip_unless_finite`: a step whose inputs, perturbed pass or result is not
finite leaves the parameters (a zero update) and every state field exactly
as they were -- the step count and the PRNG key included, so training goes
on as if the batch had not been there -- and counts it in the state's
``skipped_steps``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def skip_unless_finite(ok: jax.Array, out: PyTree, state: Any,
                       new_state: Any) -> tuple[PyTree, Any]:
  """``(out, new_state)`` where ``ok``; else a zero update and ``state``.

  A select on every leaf (never a blend: the NaN of the step not taken
  cannot leak). ``state`` and ``new_state`` have a field ``skipped_steps``
  (int32); it counts the steps refused. ``ok`` must be the same on every
  device (computed from values already averaged over them).
  """
  kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                      new_state._replace(skipped_steps=state.skipped_steps),
                      state)
  skipped = jnp.where(ok, state.skipped_steps,
                      optax.safe_increment(state.skipped_steps))
  out = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), out)
  return out, kept._replace(skipped_steps=skipped)


def no_skipped_steps() -> jax.Array:
  """``skipped_steps`` at init: 0, int32."""
  return jnp.zeros([], jnp.int32)
