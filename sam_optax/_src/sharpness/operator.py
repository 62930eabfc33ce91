r"""The flat curvature operator x -> C x, and `hessian_vector_product`.

Every spectral helper sees the curvature only through products
:math:`v \mapsto H v`, computed by forward-over-reverse differentiation
(`jax.jvp` of `jax.grad`) at about the cost of two gradients; the Hessian is
never formed. Vectors live as flat float32 arrays
(`jax.flatten_util.ravel_pytree`), so norms, dot products and Krylov bases
are float32 whatever the parameters' dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
from jax import flatten_util
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.sharpness import checks
from sam_optax._src.sharpness import compiled
from sam_optax._src.sharpness import curvature as curvature_lib
from sam_optax._src.sharpness import loops
from sam_optax._src.sharpness import objective as objective_lib

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]

class FlatOperator:
  """x -> H x on flat float32 vectors of length n."""

  unroll: bool = False  # the loop form, resolved by `make`

  def __init__(self, obj: objective_lib.Objective, params: PyTree,
               curvature: Any = None):
    wide = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    flat, self.unravel = flatten_util.ravel_pytree(wide)
    self.size = int(flat.shape[0])
    self._obj = obj
    self._params = params
    self._curvature = curvature

  def __call__(self, x: jax.Array) -> jax.Array:
    hv = self._obj.curvature_product(self._params, self.unravel(x),
                                     self._curvature)
    return flatten_util.ravel_pytree(
        jax.tree.map(lambda v: v.astype(jnp.float32), hv)
    )[0]


def make(owner: str, loss_fn: Callable[..., Any], params: PyTree,
         loss_kwargs: Optional[Mapping[str, Any]], batches: Batches,
         has_aux: bool, curvature: Any = 'hessian', layout: Any = None,
         unroll: Optional[bool] = False) -> FlatOperator:
  """The flat operator; ``op.unroll`` is the resolved loop form."""
  loops.check_unroll(owner, unroll)
  curvature = curvature_lib.check_curvature(owner, curvature)
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  op = FlatOperator(obj, params, curvature)
  if op.size == 0:
    raise ValueError(f'{owner}: params has no entries; there is no Hessian.')
  # Decided on the compact form (the scan over batches= included), then the
  # objective's scan follows the choice.
  op.unroll = loops.resolve(unroll, op, op.size)
  obj.unroll = op.unroll
  return op


def norm(x: jax.Array) -> jax.Array:
  """The 2-norm of a flat float32 vector, finite whenever the norm fits.

  Scaled by the largest entry before squaring: squares of entries above
  ~1.8e19 overflow float32 even where the norm itself is representable.
  """
  largest = jnp.max(jnp.abs(x), initial=0.0)
  return largest * jnp.linalg.norm(x * tree_math.safe_inverse(largest))


def unit(x: jax.Array) -> jax.Array:
  return x * tree_math.safe_inverse(norm(x))


@compiled.reuse_compiled
def hessian_vector_product(
    loss_fn: Callable[..., Any],
    params: PyTree,
    vector: PyTree,
    *,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
) -> PyTree:
  r"""The Hessian-vector product :math:`H(w)\,v`, without forming H.

  .. math::

    H v = \frac{\partial}{\partial t} \nabla L(w + t v) \Big|_{t=0},

  one `jax.jvp` (forward mode) of `jax.grad` (reverse mode): about two
  gradients of cost and one gradient of memory.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: w[0] ** 2 * w[1]  # H = [[2 w1, 2 w0], [2 w0, 0]]
    >>> hv = sharpness.hessian_vector_product(
    ...     loss_fn, jnp.array([1., 2.]), jnp.array([1., 0.]))
    >>> print(hv)
    [4. 2.]

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    vector: v, a pytree like params.

  Returns:
    :math:`H v`, a pytree like params; NaN when L(w) is NaN or infinite.

  Raises:
    TypeError: a complex or integer vector.
    ValueError: a vector whose structure differs from params.

  References:
    Pearlmutter, `Fast Exact Multiplication by the Hessian
    <https://doi.org/10.1162/neco.1994.6.1.147>`_, Neural Computation 1994.
  """
  owner = 'hessian_vector_product'
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  checks.check_params(owner, vector, 'vector')
  if jax.tree.structure(vector) != jax.tree.structure(params):
    raise ValueError(
        f'{owner}: vector must have the structure of params:'
        f' {jax.tree.structure(vector)} vs {jax.tree.structure(params)}.')
  return obj.hvp(params, vector)
