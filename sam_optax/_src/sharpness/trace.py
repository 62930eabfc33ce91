"""The curvature trace: Hutchinson's estimator and Hutch++."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from sam_optax._src.core import validation
from sam_optax._src.sharpness import blocks
from sam_optax._src.sharpness import checks
from sam_optax._src.sharpness import compiled
from sam_optax._src.sharpness import loops
from sam_optax._src.sharpness import operator as operator_lib

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]

class HessianTrace(NamedTuple):
  """Result of `hessian_trace`.

  Attributes:
    trace: the estimate of tr(H) (Hutchinson or Hutch++), float32.
    standard_error: its standard error: sample std / sqrt(number of
      Hutchinson probes); for Hutch++ that of the probes of the deflated
      part (the low-rank part is exact given the sketch).
  """

  trace: jax.Array
  standard_error: jax.Array


def _mean_and_error(samples: jax.Array):
  """(mean, sample std / sqrt(N)) of a 1-D array; error 0 for N = 1."""
  count = samples.shape[0]
  mean = jnp.mean(samples)
  if count == 1:
    return mean, jnp.zeros([], jnp.float32)
  variance = jnp.sum(jnp.square(samples - mean)) / (count - 1)
  return mean, jnp.sqrt(variance / count)


def _hutchinson(op: operator_lib.FlatOperator, key: jax.Array, num_samples: int):
  def probe(probe_key):
    v = jax.random.rademacher(probe_key, (op.size,), jnp.float32)
    return jnp.vdot(v, op(v))

  return _mean_and_error(
      loops.map(probe, jax.random.split(key, num_samples), op.unroll))


def _hutch_plus_plus(op: operator_lib.FlatOperator, key: jax.Array, num_samples: int):
  """Hutch++: k = N // 3 sketch HVPs, k for tr(Q^T H Q), N - 2k probes."""
  k = min(num_samples // 3, op.size)
  sketch_key, probe_key = jax.random.split(key)
  sketch = jax.random.rademacher(sketch_key, (k, op.size), jnp.float32)
  q, _ = jnp.linalg.qr(loops.map(op, sketch, op.unroll).T)  # (n, k)
  low_rank = jnp.sum(q * loops.map(op, q.T, op.unroll).T)  # tr(Q^T H Q)
  num_probes = num_samples - 2 * k

  def probe(one_key):
    g = jax.random.rademacher(one_key, (op.size,), jnp.float32)
    g = g - q @ (q.T @ g)  # (I - Q Q^T) g
    return jnp.vdot(g, op(g))

  rest, error = _mean_and_error(
      loops.map(probe, jax.random.split(probe_key, num_probes), op.unroll))
  return low_rank + rest, error


_TRACE_METHODS = {'hutchinson': (_hutchinson, 1), 'hutch++': (
    _hutch_plus_plus, 3)}


@compiled.reuse_compiled
@blocks.selectable
def hessian_trace(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *,
    num_samples: int = 64,
    method: str = 'hutchinson',
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
    curvature: Any = 'hessian',
    unroll: Optional[bool] = None,
    select: Any = None,  # select and per_leaf: see blocks.selectable
    per_leaf: bool = False,
) -> HessianTrace:
  r"""The Hessian trace by Hutchinson's estimator or by Hutch++.

  ``method='hutchinson'`` (the default) averages N Rademacher probes:

  .. math::

    \mathrm{tr}(H) = \mathbb{E}_v\left[v^\top H v\right]
      \approx \frac{1}{N} \sum_{i=1}^{N} v_i^\top H v_i,
    \qquad v_i \in \{-1, +1\}^n \text{ uniform},

  unbiased, with variance :math:`2(\|H\|_F^2 - \sum_j H_{jj}^2)` per probe
  (the smallest of any i.i.d. probe distribution). One HVP per probe.

  ``method='hutch++'`` spends the same N HVPs differently: with
  :math:`k = \lfloor N/3 \rfloor` (at most n), a Rademacher sketch
  :math:`S \in \mathbb{R}^{n \times k}`, :math:`Q = \mathrm{orth}(H S)`, and
  :math:`N - 2k` Rademacher probes :math:`g_i`,

  .. math::

    \mathrm{tr}(H) \approx \mathrm{tr}(Q^\top H Q) + \frac{1}{N - 2k}
      \sum_i g_i^\top (I - QQ^\top) H (I - QQ^\top) g_i,

  unbiased; the top of the spectrum is taken exactly and only the deflated
  rest is sampled, so on a decaying spectrum the error falls like 1/N
  instead of :math:`1/\sqrt{N}` (it needs N >= 3; with 3k >= 3n it is
  exact).

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.arange(1., 5.) * w ** 2)
    >>> out = sharpness.hessian_trace(loss_fn, jnp.zeros(4), num_samples=8)
    >>> print(f'{out.trace:.3f} {out.standard_error:.3f}')  # diagonal: exact
    10.000 0.000
    >>> out = sharpness.hessian_trace(loss_fn, jnp.zeros(4), num_samples=12,
    ...                               method='hutch++')  # k = n: exact
    >>> print(f'{out.trace:.3f}')
    10.000

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    num_samples: the HVP budget N, >= 1 (>= 3 for Hutch++).
    method: ``'hutchinson'`` or ``'hutch++'``.

  Returns:
    A `HessianTrace` (trace, standard_error); NaN when L(w) or the Hessian
    is NaN.

  Raises:
    ValueError: num_samples < 1 (< 3 for Hutch++); method not 'hutchinson' or
      'hutch++'.

  References:
    Hutchinson, `A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines
    <https://doi.org/10.1080/03610919008812866>`_, 1990; Meyer et al.,
    `Hutch++: Optimal Stochastic Trace Estimation
    <https://arxiv.org/abs/2010.09649>`_, SOSA 2021; Yao et al.,
    `PyHessian <https://arxiv.org/abs/1912.07145>`_, 2020.
  """
  owner = 'hessian_trace'
  if method not in _TRACE_METHODS:
    raise ValueError(
        f"{owner}: method must be 'hutchinson' or 'hutch++', got {method!r}.")
  estimate, minimum = _TRACE_METHODS[method]
  num_samples = validation.check_static_int(owner, 'num_samples', num_samples, 1)
  if num_samples < minimum:
    raise ValueError(
        f"{owner}: method='hutch++' needs num_samples >= 3 (a sketch, its"
        f' product and one probe), got {num_samples}; raise num_samples or'
        " use method='hutchinson'.")
  op = operator_lib.make(owner, loss_fn, params, loss_kwargs, batches, has_aux,
                 curvature, layout, unroll)
  trace, error = estimate(op, checks.resolve_key(key), num_samples)
  return HessianTrace(trace=trace, standard_error=error)
