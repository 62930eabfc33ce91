"""A helper called directly reuses its compiled program: one `jax.jit` per call form.

Without it, every direct (un-jitted) call of a helper runs op by op, and
each `lax` loop in it is compiled anew on every call: tens of seconds for
a small CNN, each time. `reuse_compiled` jits the helper once per *call
form* -- its static arguments and the tree structure of all arguments --
and keeps the program, so a repeated call with the same ``loss_fn``, the
same options and arrays of the same shapes runs the cached executable.

What is dynamic (a traced argument of the program) and what is static (part
of the cache key, compared with ``==`` and its type):

- in the data arguments (``params``, ``loss_kwargs``, ``batches``, ``key``,
  ``vector``, directions, checkpoints): every array leaf is dynamic; Python
  scalars there (``train=True``) stay static, as loss_fn may branch on them;
- in the options: arrays with at least one axis are dynamic, while 0-d
  arrays (``rho=jnp.float32(0.1)``) are static by value, so that the
  helper's checks still see a concrete number;
- everything else (``loss_fn``, ints, floats, bools, strings, layouts,
  curvatures, ``select=`` functions) is static.

A call under a JAX transformation (any tracer among the arguments) runs the
helper directly, inside the caller's program; so does a call with an
unhashable static argument. ``batches`` given as an iterator is listed
first (a generator is read once).
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import inspect
from typing import Any, Callable, Mapping, TypeVar

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

F = TypeVar('F', bound=Callable[..., Any])

DATA_ARGUMENTS = frozenset({
    'params', 'vector', 'loss_kwargs', 'batches', 'key', 'direction',
    'endpoint', 'directions', 'checkpoints', 'params_a', 'params_b'})
CACHE_SIZE = 32  # programs kept per helper (least recently used dropped)

_ARRAY = (jax.Array, np.ndarray, np.generic)


def _is_key(x: Any) -> bool:
  dtype = getattr(x, 'dtype', None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _dynamic(name: str, leaf: Any) -> bool:
  """Whether a leaf of argument ``name`` is a traced argument of the program."""
  if not isinstance(leaf, _ARRAY):
    return False
  return name in DATA_ARGUMENTS or np.ndim(leaf) > 0 or _is_key(leaf)


def _is_iterator(x: Any) -> bool:
  """An iterator is one opaque (static) leaf, never a pytree to flatten."""
  return isinstance(x, collections.abc.Iterator)


def _static_key(leaf: Any) -> Any:
  """A hashable stand-in for a static leaf: its type with its value."""
  if isinstance(leaf, _ARRAY):  # a 0-d option, e.g. rho=jnp.float32(0.1)
    return (type(leaf), str(leaf.dtype), np.asarray(leaf).item())
  return (type(leaf), leaf)


def _listed_batches(arguments: dict) -> None:
  """``batches`` as a list when it is an iterator or another iterable."""
  batches = arguments.get('batches')
  if batches is None or isinstance(
      batches, (list, tuple, Mapping, str, bytes, *_ARRAY)):
    return
  if isinstance(batches, collections.abc.Iterable):
    arguments['batches'] = list(batches)


def reuse_compiled(helper: F) -> F:
  """``helper`` with one cached `jax.jit` program per call form (see above)."""
  signature = inspect.signature(helper)
  cache: collections.OrderedDict = collections.OrderedDict()

  def program(names: tuple, treedef, static: tuple, dynamic_at: tuple):
    """The jitted helper for one call form (built once, then cached)."""

    def run(dynamic: list):
      leaves = list(static)
      for i, x in zip(dynamic_at, dynamic):
        leaves[i] = x
      values = jax.tree.unflatten(treedef, leaves)
      bound = inspect.BoundArguments(signature, dict(zip(names, values)))
      return helper(*bound.args, **bound.kwargs)

    return jax.jit(run)

  @functools.wraps(helper)
  def wrapper(*args, **kwargs):
    try:
      bound = signature.bind(*args, **kwargs)
    except TypeError:
      return helper(*args, **kwargs)  # the helper's own error
    arguments = dict(bound.arguments)
    _listed_batches(arguments)
    names = tuple(arguments)
    leaves, kinds = [], []
    for name, value in arguments.items():
      argument_leaves = jax.tree.leaves(value, is_leaf=_is_iterator)
      leaves += argument_leaves
      kinds += [_dynamic(name, x) for x in argument_leaves]
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
      return helper(*args, **kwargs)  # inside the caller's trace
    treedef = jax.tree.structure(tuple(arguments.values()),
                                 is_leaf=_is_iterator)
    dynamic_at = tuple(i for i, d in enumerate(kinds) if d)
    static = tuple(None if d else x for x, d in zip(leaves, kinds))
    try:
      key = (names, treedef, dynamic_at,
             tuple(_static_key(x) for x, d in zip(leaves, kinds) if not d))
      hash(key)
    except TypeError:
      return helper(*args, **kwargs)  # an unhashable option
    jitted = cache.get(key)
    if jitted is None:
      jitted = cache[key] = program(names, treedef, static, dynamic_at)
      while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    cache.move_to_end(key)
    return jitted([leaves[i] for i in dynamic_at])

  wrapper.cache = cache  # type: ignore[attr-defined]
  return wrapper  # type: ignore[return-value]
