"""m-sharpness: any one-value measure, averaged over disjoint chunks of m examples."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp

from sam_optax._src.core import batching
from sam_optax._src.core import collectives
from sam_optax._src.core import validation
from sam_optax._src.pipeline import layouts
from sam_optax._src.sharpness import checks
from sam_optax._src.sharpness import compiled
from sam_optax._src.sharpness import first_order

PyTree = Any
Batches = Optional[Iterable[Mapping[str, Any]]]

def _accepts_key(measure: Callable[..., Any]) -> bool:
  try:
    return 'key' in inspect.signature(measure).parameters
  except (TypeError, ValueError):
    return False


# The field of a measure's NamedTuple result that m_sharpness averages, in
# this order: WorstCaseSharpness / AverageCaseSharpness -> sharpness,
# HessianTopEigenvalue -> eigenvalue, HessianEigenvalues -> eigenvalues,
# HessianTrace -> trace.
MAIN_FIELDS = ('sharpness', 'eigenvalue', 'eigenvalues', 'trace')


def _name(measure: Callable[..., Any]) -> str:
  inner = getattr(measure, 'func', measure)  # functools.partial
  return getattr(inner, '__name__', repr(measure))


def _main_value(owner: str, measure: Callable[..., Any], out: Any):
  """The number (or fixed-shape array) that m_sharpness averages."""
  fields = getattr(out, '_fields', None)
  if fields is not None:
    field = next((f for f in MAIN_FIELDS if f in fields), None)
    if field is None:
      raise TypeError(
          f'{owner}: measure {_name(measure)} returned a'
          f' {type(out).__name__}, which has none of the fields m_sharpness'
          f' averages over chunks ({", ".join(MAIN_FIELDS)}). Pass a measure'
          ' that gives one value per chunk (a sharpness, an eigenvalue, a'
          ' trace), or a function returning that value.'
      )
    out = getattr(out, field)
  if not hasattr(out, 'dtype') and not isinstance(out, float):
    raise TypeError(
        f'{owner}: measure {_name(measure)} returned a {type(out).__name__};'
        ' m_sharpness averages a number (or an array of fixed shape) per'
        ' chunk, or a NamedTuple with one of the fields'
        f' {", ".join(MAIN_FIELDS)}.'
    )
  return jnp.asarray(out, jnp.float32)


def _chunked(owner, m, loss_kwargs, batches):
  """(leaves, treedef, indices of the chunked leaves, common kwargs, count).

  Each chunked leaf has a leading axis over all chunks (of every batch).
  """
  if batches is None:
    if not loss_kwargs:
      raise ValueError(
          f'{owner}: m-sharpness splits a batch into chunks of m examples, so'
          ' it needs the batch: pass loss_kwargs={...} (or batches=[...]).'
      )
    split, mask, num_chunks = batching.split_into_chunks(owner, loss_kwargs, m)
    leaves, treedef = jax.tree.flatten(split)
    mapped = [i for i, s in enumerate(jax.tree.leaves(mask)) if s]
    return leaves, treedef, mapped, {}, num_chunks
  stacked, num_batches = checks.stack_batches(owner, batches)
  first = jax.tree.map(lambda x: x[0], stacked)
  _, _, per_batch = batching.split_into_chunks(owner, first, m)  # the errors

  def chunks(x):
    # (B, n, ...) -> (B * n / m, m, ...): the chunks of every batch; a
    # per-batch scalar (shape (B,)) goes to each of that batch's chunks.
    if x.ndim > 1:
      return jnp.reshape(x, (-1, m) + x.shape[2:])
    return jnp.repeat(x, per_batch)

  leaves, treedef = jax.tree.flatten(jax.tree.map(chunks, stacked))
  return (leaves, treedef, list(range(len(leaves))), dict(loss_kwargs or {}),
          num_batches * per_batch)


@compiled.reuse_compiled
def m_sharpness(
    loss_fn: Callable[..., Any],
    params: PyTree,
    m: int,
    *,
    measure: Optional[Callable[..., Any]] = None,
    key: Optional[jax.Array] = None,
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    batches: Batches = None,
    has_aux: bool = False,
    layout: Any = None,
    **measure_options: Any,
) -> jax.Array:
  r"""m-sharpness: the mean sharpness of disjoint chunks of m examples.

  .. math::

    S_m(w) = \frac{1}{|\mathcal{C}|} \sum_{C \in \mathcal{C}}
      \Big[\max_{\|\epsilon\| \le \rho} L_C(w + \epsilon) - L_C(w)\Big],

  where :math:`\mathcal{C}` splits the examples into disjoint chunks of m and
  :math:`L_C` is the loss on chunk C. The bracket is ``measure`` (default
  `sam_sharpness`, SAM's one-step approximation of the max; pass
  `worst_case_sharpness` for multi-step ascent, or any helper of this module
  that measures one value), called with ``measure_options`` (e.g.
  ``rho=0.05``) on each chunk; chunks are processed one after another with
  `jax.lax.map`. The value averaged is the measure's result itself when it
  is an array, else its main field: ``.sharpness`` (`worst_case_sharpness`,
  `average_case_sharpness`), ``.eigenvalue`` (`hessian_top_eigenvalue`),
  ``.eigenvalues`` (`hessian_eigenvalues`, averaged entrywise: the mean
  i-th eigenvalue) or ``.trace`` (`hessian_trace`). Every array with a
  leading batch dimension in ``loss_kwargs`` (or in each of ``batches``) is
  split; with ``batches`` the mean is over the chunks of every batch. A
  ``measure`` that takes a ``key`` gets an independent key per chunk. A NaN
  loss on any chunk makes the result NaN.

  With ``layout=sam_optax.PerDevice(axis)`` inside `jax.pmap` /
  `jax.shard_map`, each device splits its own shard of the batch and the
  mean runs over the chunks of every device (one all-reduce of the result):
  m = the per-device batch is the SAM paper's data-parallel m-sharpness.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> def loss_fn(w, x):  # mean over examples of (x_i . w)^2 / 2
    ...   return 0.5 * jnp.mean((x @ w) ** 2)
    >>> x = jnp.array([[1., 0.], [0., 1.], [1., 1.], [1., -1.]])
    >>> w = jnp.array([1., 0.5])
    >>> per_example = sharpness.m_sharpness(  # mean of 4 one-example values
    ...     loss_fn, w, 1, rho=0.1, loss_kwargs={'x': x})
    >>> whole_batch = sharpness.m_sharpness(  # = sam_sharpness on the batch
    ...     loss_fn, w, 4, rho=0.1, loss_kwargs={'x': x})
    >>> print(f'{per_example:.4f} {whole_batch:.4f}')
    0.1157 0.0876
    >>> top = sharpness.m_sharpness(  # mean over chunks of lambda_max(H_C)
    ...     loss_fn, w, 2, measure=sharpness.hessian_top_eigenvalue,
    ...     loss_kwargs={'x': x})
    >>> print(f'{top:.3f}')  # H_C = x_C^T x_C / 2: (1/2 + 1) / 2
    0.750

  The shared arguments and errors: see `sam_optax.sharpness`.

  Args:
    loss_fn: ``loss_fn(params, **loss_kwargs)`` returning a scalar loss
      averaged over the examples it is given.
    m: examples per chunk; must divide the batch size.
    measure: a sharpness helper ``measure(loss_fn, params, *, loss_kwargs,
      has_aux, **measure_options)`` returning an array or a NamedTuple with
      one of the fields above; default `sam_sharpness`. A result without
      one (e.g. `hessian_spectral_density`) is a TypeError.
    key: PRNG key, split over the chunks when ``measure`` takes one.
    loss_kwargs: a dict of keyword arguments of ``loss_fn`` holding the batch
      (with ``batches``: arguments shared by every batch, not split).
    batches: an iterable of batch dicts, each split into chunks of m.
    **measure_options: forwarded to ``measure`` (e.g. ``rho``).
    layout: ``None``, or ``sam_optax.PerDevice(axis)`` with the batch
      sharded over ``axis`` inside pmap / shard_map (the mean over the
      chunks of every device).

  Returns:
    The mean over chunks of the per-chunk value, float32 (a scalar, or the
    shape of the per-chunk value, e.g. (k,) for `hessian_eigenvalues`);
    NaN when the measure is NaN on any chunk.

  Raises:
    TypeError: a measure whose result has no main field (e.g.
      `hessian_spectral_density`); measure options named loss_kwargs,
      batches, has_aux or key (pass those to m_sharpness itself).
    ValueError: no batch to split; m not dividing the batch size.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021
    (section 4.1); Andriushchenko & Flammarion, `Towards Understanding
    Sharpness-Aware Minimization <https://arxiv.org/abs/2206.06232>`_,
    ICML 2022.
  """
  owner = 'm_sharpness'
  m = validation.check_static_int(owner, 'm', m, 1)
  measure = first_order.sam_sharpness if measure is None else measure
  if not callable(measure):
    raise TypeError(
        f'{owner}: measure must be a sharpness helper such as'
        f' sam_sharpness or worst_case_sharpness, got {measure!r}.'
    )
  for reserved in ('loss_kwargs', 'batches', 'has_aux', 'key', 'layout'):
    if reserved in measure_options:
      raise TypeError(f'{owner}: pass {reserved} to m_sharpness itself.')
  checks.check_inputs(owner, loss_fn, params, loss_kwargs, has_aux)
  axes = _device_axes(owner, layout)
  leaves, treedef, mapped, common, num_chunks = _chunked(
      owner, m, loss_kwargs, batches)

  def chunk_kwargs(chunk_leaves):
    full = list(leaves)
    for i, x in zip(mapped, chunk_leaves):
      full[i] = x
    return {**common, **jax.tree.unflatten(treedef, full)}

  # The loss's output is checked once here, so that its errors name
  # m_sharpness rather than the measure.
  first = chunk_kwargs([leaves[i][0] for i in mapped])
  jax.eval_shape(lambda: checks.check_loss_output(
      owner, loss_fn(params, **first), has_aux))
  checks.check_sharded(owner, layout, params, (leaves, common))
  # Each device measures its own chunks: at weights marked device-varying
  # inside shard_map, so that autodiff does not sum over the devices.
  tracked = collectives.tracks_variance((leaves, common), axes)
  params = collectives.make_local(params, axes, tracked)
  pass_key = _accepts_key(measure)
  keys = jax.random.split(checks.resolve_key(key), num_chunks)

  def one_chunk(inputs):
    chunk_leaves, chunk_key = inputs
    extra = {'key': chunk_key} if pass_key else {}
    out = measure(loss_fn, params, loss_kwargs=chunk_kwargs(chunk_leaves),
                  has_aux=has_aux, **extra, **measure_options)
    return _main_value(owner, measure, out)

  values = jax.lax.map(one_chunk, ([leaves[i] for i in mapped], keys))
  mean = jnp.mean(values, axis=0)
  return jax.lax.pmean(mean, axes) if axes else mean


def _device_axes(owner: str, layout: Any) -> tuple:
  """m_sharpness's layout: None or a plain PerDevice(axis); its axes."""
  layout = layouts.check_layout(owner, layout)
  if layout is None:
    return ()
  if isinstance(layout, layouts.Chunks) or layout.chunks is not None or (
      layout.groups is not None):
    raise ValueError(
        f'{owner}: layout={layout!r}: m already splits the batch into chunks;'
        ' the layout only says which axis the batch is sharded over. Use'
        ' layout=None on one device or sam_optax.PerDevice(axis) inside'
        ' pmap / shard_map.')
  layouts.check_bound(owner, layout, caller='the helper')
  return layout.axes
