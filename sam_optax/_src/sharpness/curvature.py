"""Curvature matrices for the spectral helpers: Hessian, GGN, empirical Fisher.

A curvature is a symmetric matrix C(w) reached only through products
v -> C v on one batch; the spectral helpers (`hessian_top_eigenvalue`,
`hessian_eigenvalues`, `hessian_trace`, `hessian_spectral_density`) take it
as ``curvature=``: ``'hessian'`` (the default), a `GGN` or an
`EmpiricalFisher`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


def _check_callable(owner: str, name: str, fn: Any) -> None:
  if not callable(fn):
    raise TypeError(
        f'{owner}: {name} must be a function, got {type(fn).__name__}.')


class GGN(NamedTuple):
  r"""The generalized Gauss-Newton matrix :math:`G = J^\top H_{\text{out}} J`.

  For a loss :math:`L(w) = \ell(f(w))` split into a model :math:`f` (the
  outputs, e.g. logits) and an output loss :math:`\ell`, with the Jacobian
  :math:`J = \partial f / \partial w` and :math:`H_{\text{out}} = \nabla^2
  \ell` at :math:`f(w)`:

  .. math::

    G v = J^\top \big(H_{\text{out}}\, (J v)\big),

  one `jax.jvp` of f, one HVP of :math:`\ell` in output space and one
  `jax.vjp` of f. G drops the term :math:`\sum_k \partial_k \ell\,
  \nabla^2 f_k` of the Hessian, so it is positive semi-definite whenever
  :math:`\ell` is convex in the outputs (squared error, softmax cross
  entropy; for cross entropy it equals the true Fisher).

  Both functions get the helper's loss_kwargs (and batch) as keyword
  arguments; take the ones you need and ``**_`` the rest. ``loss_fn`` must
  equal ``output_loss(apply_fn(params, **kw), **kw)``: it gives L(w) (a NaN
  loss makes the result NaN).

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> apply_fn = lambda w, x, **_: jnp.tanh(x @ w)
    >>> output_loss = lambda z, y, **_: 0.5 * jnp.sum((z - y) ** 2)
    >>> loss_fn = lambda w, x, y: output_loss(apply_fn(w, x), y)
    >>> kw = {'x': jnp.eye(2), 'y': jnp.ones(2)}
    >>> out = sharpness.hessian_eigenvalues(
    ...     loss_fn, jnp.zeros(2), k=2, loss_kwargs=kw,
    ...     curvature=sharpness.GGN(apply_fn, output_loss))
    >>> print(out.eigenvalues.round(4))  # J = I at w = 0: G = I
    [1. 1.]

  Attributes:
    apply_fn: ``apply_fn(params, **loss_kwargs)`` -> the model outputs (an
      array or pytree).
    output_loss: ``output_loss(outputs, **loss_kwargs)`` -> the scalar loss.

  References:
    Schraudolph, `Fast Curvature Matrix-Vector Products for Second-Order
    Gradient Descent <https://doi.org/10.1162/08997660260028683>`_, Neural
    Computation 2002; Martens, `New insights and perspectives on the natural
    gradient method <https://arxiv.org/abs/1412.1193>`_, JMLR 2020.
  """

  apply_fn: Callable[..., Any]
  output_loss: Callable[..., Any]

  def check(self, owner: str) -> None:
    _check_callable(owner, 'GGN apply_fn', self.apply_fn)
    _check_callable(owner, 'GGN output_loss', self.output_loss)

  def product(self, params: PyTree, vector: PyTree,
              kwargs: Mapping[str, Any]) -> PyTree:
    model = lambda p: self.apply_fn(p, **kwargs)
    outputs, jv = jax.jvp(model, (params,), (vector,))
    out_grad = jax.grad(
        lambda z: jnp.asarray(self.output_loss(z, **kwargs), jnp.float32))
    _, h_jv = jax.jvp(out_grad, (outputs,), (jv,))
    _, pullback = jax.vjp(model, params)
    return pullback(h_jv)[0]


class EmpiricalFisher(NamedTuple):
  r"""The empirical Fisher :math:`F = \frac{1}{B}\sum_i g_i g_i^\top`.

  With per-example losses :math:`\ell_i(w)` (i = 1..B) and their gradients
  :math:`g_i = \nabla \ell_i`, i.e. the Jacobian :math:`J_\ell` of the loss
  vector (rows :math:`g_i^\top`):

  .. math::

    F v = \frac{1}{B} J_\ell^\top (J_\ell v),

  one `jax.jvp` and one `jax.vjp` of the loss vector; PSD, with rank at
  most B per batch. It is the uncentered covariance of the per-example
  gradients, not the true Fisher (for which use `GGN` with a cross-entropy
  output loss); Kunstner et al. explain when the two differ.

  ``per_example_loss(params, **loss_kwargs)`` returns the vector of the B
  losses; ``loss_fn`` must be its mean (it gives L(w): a NaN loss makes the
  result NaN). With ``batches``, F is averaged over the batches.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> per_example = lambda w, x: x @ w  # g_i = x_i
    >>> loss_fn = lambda w, x: jnp.mean(per_example(w, x))
    >>> kw = {'x': jnp.array([[2., 0.], [0., 1.]])}  # F = diag(4, 1) / 2
    >>> out = sharpness.hessian_trace(
    ...     loss_fn, jnp.zeros(2), loss_kwargs=kw,
    ...     curvature=sharpness.EmpiricalFisher(per_example))
    >>> print(f'{out.trace:.3f}')
    2.500

  Attributes:
    per_example_loss: ``per_example_loss(params, **loss_kwargs)`` -> the
      per-example losses, shape (B,).

  References:
    Kunstner et al., `Limitations of the Empirical Fisher Approximation for
    Natural Gradient Descent <https://arxiv.org/abs/1905.12558>`_, NeurIPS
    2019.
  """

  per_example_loss: Callable[..., Any]

  def check(self, owner: str) -> None:
    _check_callable(owner, 'EmpiricalFisher per_example_loss',
                    self.per_example_loss)

  def product(self, params: PyTree, vector: PyTree,
              kwargs: Mapping[str, Any]) -> PyTree:
    losses = lambda p: jnp.asarray(self.per_example_loss(p, **kwargs),
                                   jnp.float32)
    values, jv = jax.jvp(losses, (params,), (vector,))
    if values.ndim != 1:
      raise ValueError(
          'EmpiricalFisher: per_example_loss must return a vector of the B'
          f' per-example losses, got shape {values.shape}; return the losses'
          ' before the mean.')
    _, pullback = jax.vjp(losses, params)
    return pullback(jv / values.shape[0])[0]


def check_curvature(owner: str, curvature: Any) -> Any:
  """None for the Hessian, else the checked GGN / EmpiricalFisher."""
  if isinstance(curvature, str) and curvature == 'hessian':
    return None
  if isinstance(curvature, (GGN, EmpiricalFisher)):
    curvature.check(owner)
    return curvature
  raise ValueError(
      f"{owner}: curvature must be 'hessian', sharpness.GGN(apply_fn,"
      ' output_loss) or sharpness.EmpiricalFisher(per_example_loss), got'
      f' {curvature!r}.')
