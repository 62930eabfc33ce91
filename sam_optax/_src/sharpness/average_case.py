"""Average-case sharpness: the mean loss increase under Gaussian weight noise."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from sam_optax._src.core import tree_math
from sam_optax._src.core import validation
from sam_optax._src.sharpness import checks
from sam_optax._src.sharpness import compiled
from sam_optax._src.sharpness import metric
from sam_optax._src.sharpness import objective as objective_lib

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]

class AverageCaseSharpness(NamedTuple):
  """Result of `average_case_sharpness`.

  Attributes:
    sharpness: the Monte-Carlo mean of :math:`L(w + \\sigma T_w z) - L(w)`.
    standard_error: its standard error (sample std / sqrt(num_samples)).
  """

  sharpness: jax.Array
  standard_error: jax.Array


@compiled.reuse_compiled
def average_case_sharpness(
    loss_fn: Callable[..., Any],
    params: PyTree,
    sigma: float = 0.01,
    *,
    num_samples: int = 16,
    adaptive: bool = False,
    eta: float = 0.01,
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
) -> AverageCaseSharpness:
  r"""Average-case sharpness: the mean loss increase under Gaussian noise.

  .. math::

    S_{\mathrm{avg}}(w) = \mathbb{E}_{z \sim \mathcal{N}(0, I)}
      \left[L(w + \sigma\, T_w z)\right] - L(w)
      \approx \tfrac{\sigma^2}{2} \mathrm{tr}(T_w H T_w),

  with :math:`T_w = I`, or :math:`\mathrm{diag}(|w| + \eta)` when
  ``adaptive``; estimated with ``num_samples`` draws (one forward pass of the
  dataset loss each), returned with its standard error.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(w ** 2)  # exact: sigma^2 n / 2
    >>> out = sharpness.average_case_sharpness(
    ...     loss_fn, jnp.zeros(100), sigma=0.1, num_samples=64,
    ...     key=jax.random.key(0))
    >>> bool(abs(out.sharpness - 0.5) < 4 * out.standard_error)
    True

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    sigma: standard deviation of the noise, > 0.
    num_samples: number of Gaussian draws, >= 1.
    adaptive: scale the noise by :math:`|w| + \eta`.
    eta: offset of the adaptive metric, >= 0.

  Returns:
    An `AverageCaseSharpness` (sharpness, standard_error); NaN when L(w)
    or any perturbed loss is NaN.

  Raises:
    ValueError: sigma not a finite number > 0; num_samples < 1.

  References:
    Keskar et al., `On Large-Batch Training for Deep Learning
    <https://arxiv.org/abs/1609.04836>`_, ICLR 2017; Andriushchenko et al.,
    `A Modern Look at the Relationship between Sharpness and Generalization
    <https://arxiv.org/abs/2302.07011>`_, ICML 2023.
  """
  owner = 'average_case_sharpness'
  validation.check_number(owner, 'sigma', sigma, allow_zero=False)
  metric.check_adaptive(owner, adaptive, eta)
  num_samples = validation.check_static_int(owner, 'num_samples', num_samples, 1)
  obj = objective_lib.Objective(
      owner, loss_fn, params, loss_kwargs=loss_kwargs, batches=batches,
      has_aux=has_aux, layout=layout)
  key = checks.resolve_key(key)
  noise = jnp.asarray(sigma, jnp.float32)
  scale = metric.scale(params, adaptive, eta)
  base_loss = obj.loss(params)
  leaves, treedef = jax.tree.flatten(params)

  def sample(total, sample_key):
    keys = jax.random.split(sample_key, max(len(leaves), 1))
    z = jax.tree.unflatten(
        treedef,
        [jax.random.normal(k, p.shape, jnp.float32)
         for k, p in zip(keys, leaves)],
    )
    delta = tree_math.tree_scale(noise, metric.apply_scale(scale, z))
    gain = obj.loss(metric.shift(params, delta)) - base_loss
    return (total[0] + gain, total[1] + gain * gain), None

  zero = jnp.zeros([], jnp.float32)
  (total, total_sq), _ = jax.lax.scan(
      sample, (zero, zero), jax.random.split(key, num_samples)
  )
  mean = total / num_samples
  if num_samples > 1:
    variance = jnp.maximum(total_sq - num_samples * mean * mean, 0.0) / (
        num_samples - 1)
    standard_error = jnp.sqrt(variance / num_samples)
  else:
    standard_error = zero
  return objective_lib.nan_unless_finite(
      AverageCaseSharpness(sharpness=mean, standard_error=standard_error),
      base_loss)
