"""Shared MNIST-1D pieces for the examples and benchmarks: data, CNN, training.

MNIST-1D (Greydanus, 2020, https://github.com/greydanus/mnist1d) is a 1-D
stand-in for MNIST: 10 classes of length-40 signals, generated locally and
deterministically by the ``mnist1d`` package (nothing is downloaded: we call
its generator ``make_dataset`` directly, never ``get_dataset``, which would
try to fetch a pickle from GitHub). It separates optimizers like a small
image benchmark does, yet a CNN trains on it in seconds on a CPU.

What is here:

- `load_data(num_samples=5000, label_noise=0.0, seed=0)` -- train/test arrays
  (80/20 split), with optional symmetric label noise on the training labels.
- `init_params(key)` / `apply(params, x)` / `loss_fn(params, batch)` -- a small
  1-D CNN in plain JAX (three stride-2 convolutions and a linear read-out,
  12k parameters with the default 32 channels; an epoch of 4000
  examples takes a fraction of a second on two CPU cores after compiling).
- `train(make_tx, data, *, epochs, batch_size, seed)` -- a jitted training
  loop, one `lax.scan` per epoch, where ``make_tx(loss_fn)`` builds the optax
  transformation (so sharpness-aware ones get the loss handle). It returns a
  `TrainResult` with the per-epoch history.

Example::

  import optax, sam_optax
  from examples import mnist1d_common as m1d
  data = m1d.load_data(label_noise=0.2)
  result = m1d.train(
      lambda loss_fn: optax.chain(sam_optax.sam(loss_fn, 0.05),
                                  optax.sgd(0.05, momentum=0.9)),
      data, epochs=30, batch_size=100, seed=0)
  print(result.test_accuracy[-1])
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

NUM_CLASSES = 10
SEQUENCE_LENGTH = 40

PyTree = Any
Batch = dict


# ----------------------------------------------------------------------------
# Data.


@functools.lru_cache(maxsize=4)
def _generate(num_samples: int, data_seed: int):
  """mnist1d's own generator, without its side effect on the global RNGs."""
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top

  args = get_dataset_args()
  args.num_samples = num_samples
  args.seed = data_seed
  numpy_state, python_state = np.random.get_state(), random.getstate()
  try:
    dataset = make_dataset(args)  # generates locally; never downloads
  finally:
    np.random.set_state(numpy_state)
    random.setstate(python_state)
  return (
      np.asarray(dataset['x'], np.float32),
      np.asarray(dataset['y'], np.int32),
      np.asarray(dataset['x_test'], np.float32),
      np.asarray(dataset['y_test'], np.int32),
  )


def add_label_noise(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric label noise: a ``fraction`` of labels set to another class.

  Exactly ``round(fraction * n)`` labels, chosen at random, are replaced by a
  class drawn uniformly from the *other* nine classes (so every chosen label
  is really wrong).

  Returns:
    ``(noisy_labels, is_noisy)``, the latter a boolean mask.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'label_noise must be in [0, 1], got {fraction}.')
  rng = np.random.default_rng(seed)
  n = len(labels)
  chosen = rng.choice(n, size=int(round(fraction * n)), replace=False)
  noisy = labels.copy()
  shift = rng.integers(1, NUM_CLASSES, size=len(chosen))
  noisy[chosen] = (labels[chosen] + shift) % NUM_CLASSES
  is_noisy = np.zeros(n, bool)
  is_noisy[chosen] = True
  return noisy, is_noisy


def load_data(
    num_samples: int = 5000,
    label_noise: float = 0.0,
    seed: int = 0,
    data_seed: int = 42,
) -> dict[str, np.ndarray]:
  """MNIST-1D, generated locally, with optional symmetric label noise.

  Args:
    num_samples: examples in total, split 80/20 into train and test (the
      package default 5000 gives 4000 / 1000).
    label_noise: fraction of *training* labels replaced by a wrong class.
      Test labels are always clean.
    seed: seed of the label noise.
    data_seed: seed of the mnist1d generator (42 is the package default).

  Returns:
    A dict with ``x`` (n, 40) float32, ``y`` (n,) int32 (noisy), ``y_clean``,
    ``is_noisy``, and ``x_test``, ``y_test``.
  """
  x, y, x_test, y_test = _generate(int(num_samples), int(data_seed))
  y_noisy, is_noisy = add_label_noise(y, label_noise, seed)
  return {
      'x': x,
      'y': y_noisy,
      'y_clean': y,
      'is_noisy': is_noisy,
      'x_test': x_test,
      'y_test': y_test,
  }


# ----------------------------------------------------------------------------
# Model: a small 1-D CNN in plain JAX.


def init_params(key: jax.Array, channels: int = 32) -> PyTree:
  """Three stride-2 conv layers (kernel 5) and a linear read-out."""
  keys = jax.random.split(key, 4)

  def conv(k, cin, cout):
    w = jax.random.normal(k, (5, cin, cout)) * jnp.sqrt(2.0 / (5 * cin))
    return {'w': w, 'b': jnp.zeros(cout)}

  length = SEQUENCE_LENGTH // 8  # 40 -> 20 -> 10 -> 5
  dense_in = length * channels
  return {
      'conv1': conv(keys[0], 1, channels),
      'conv2': conv(keys[1], channels, channels),
      'conv3': conv(keys[2], channels, channels),
      'dense': {
          'w': jax.random.normal(keys[3], (dense_in, NUM_CLASSES))
          * jnp.sqrt(1.0 / dense_in),
          'b': jnp.zeros(NUM_CLASSES),
      },
  }


def _conv_stride2(h: jax.Array, w: jax.Array) -> jax.Array:
  """'SAME' 1-D convolution, kernel 5, stride 2, as one matrix product.

  h: (batch, length, cin), w: (5, cin, cout) -> (batch, length // 2, cout).
  The patches are gathered with strided slices (im2col), which XLA turns into
  a single dot: on CPU several times faster than `lax.conv_general_dilated`
  at these sizes.
  """
  length = h.shape[1]
  padded = jnp.pad(h, ((0, 0), (1, 2), (0, 0)))  # 'SAME' for kernel 5, stride 2
  patches = jnp.concatenate(
      [padded[:, i:i + length:2] for i in range(w.shape[0])], axis=-1)
  return patches @ w.reshape(-1, w.shape[-1])


def apply(params: PyTree, x: jax.Array) -> jax.Array:
  """Logits (batch, 10) for signals x of shape (batch, 40)."""
  h = x[:, :, None]  # (batch, length, channels)
  for name in ('conv1', 'conv2', 'conv3'):
    layer = params[name]
    h = jax.nn.relu(_conv_stride2(h, layer['w']) + layer['b'])
  h = h.reshape(h.shape[0], -1)
  return h @ params['dense']['w'] + params['dense']['b']


def loss_fn(params: PyTree, batch: Batch) -> jax.Array:
  """Mean cross-entropy on ``batch = {'x': (b, 40), 'y': (b,)}``."""
  logits = apply(params, batch['x'])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['y']
  ).mean()


@jax.jit
def evaluate(params: PyTree, x: jax.Array, y: jax.Array):
  """(accuracy, mean loss) on a whole set."""
  logits = apply(params, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return jnp.mean(jnp.argmax(logits, -1) == y), loss


# ----------------------------------------------------------------------------
# Training.


@dataclasses.dataclass
class TrainResult:
  """Per-epoch history (lists of floats, one entry per epoch) and end state.

  Attributes:
    test_accuracy: accuracy on the (clean) test set after each epoch.
    test_loss: test cross-entropy after each epoch.
    train_loss: mean minibatch loss (on the possibly noisy labels, at the
      weights before each step) over each epoch.
    step_time: wall seconds per optimizer step in each epoch (compilation
      excluded: it happens before the first epoch, see ``compile_time``; the
      first epoch still carries the one-time cost of a first call, so quote
      medians or later epochs).
    compile_time: seconds spent compiling the epoch function.
    metrics: ``state_metrics(opt_state)`` after each epoch (e.g. XSAM's
      alpha), if given.
    params, opt_state: the final parameters and optimizer state.
  """

  test_accuracy: list
  test_loss: list
  train_loss: list
  step_time: list
  compile_time: float
  metrics: list
  params: PyTree
  opt_state: PyTree

  @property
  def best_test_accuracy(self) -> float:
    return max(self.test_accuracy)


def make_epoch_fn(tx: optax.GradientTransformation, loss=loss_fn):
  """A jitted ``epoch(params, opt_state, xs, ys)`` running one lax.scan.

  ``xs`` has shape (steps, batch, 40), ``ys`` (steps, batch); returns the new
  params, opt_state and the per-step losses.
  """

  def step(carry, batch):
    params, opt_state = carry
    value, grads = jax.value_and_grad(loss)(params, batch=batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return (optax.apply_updates(params, updates), opt_state), value

  @jax.jit
  def epoch(params, opt_state, xs, ys):
    (params, opt_state), losses = jax.lax.scan(
        step, (params, opt_state), {'x': xs, 'y': ys}
    )
    return params, opt_state, losses

  return epoch


def train(
    make_tx: Callable[[Callable[..., jax.Array]], optax.GradientTransformation],
    data: dict[str, np.ndarray],
    *,
    epochs: int,
    batch_size: int = 100,
    seed: int = 0,
    progress: bool = True,
    channels: int = 32,
    state_metrics: Optional[Callable[[Any], dict]] = None,
    desc: str = 'train',
) -> TrainResult:
  """Trains the CNN on ``data`` (from `load_data`) and records each epoch.

  Args:
    make_tx: ``make_tx(loss_fn) -> optax transformation``; ``loss_fn(params,
      batch)`` is the minibatch loss, for sharpness-aware transformations
      (``tx.update`` is called with ``batch=...``).
    data: from `load_data`.
    epochs: number of passes over the training set (the last partial
      minibatch of each shuffled pass is dropped).
    batch_size: examples per step.
    seed: seeds the initialization and the shuffling.
    progress: show a tqdm bar (epoch, test accuracy).
    channels: width of the CNN.
    state_metrics: optional ``opt_state -> {name: scalar}``, recorded after
      every epoch.
    desc: the progress bar's label.

  Returns:
    A `TrainResult`.
  """
  tx = make_tx(loss_fn)
  key = jax.random.PRNGKey(seed)
  params = init_params(key, channels)
  opt_state = tx.init(params)
  x, y = np.asarray(data['x']), np.asarray(data['y'])
  x_test, y_test = jnp.asarray(data['x_test']), jnp.asarray(data['y_test'])
  steps = len(y) // batch_size
  if steps == 0:
    raise ValueError(
        f'batch_size={batch_size} is larger than the training set ({len(y)}).'
    )
  rng = np.random.default_rng(seed)

  epoch_fn = make_epoch_fn(tx)
  shape_x = jax.ShapeDtypeStruct((steps, batch_size, x.shape[1]), jnp.float32)
  shape_y = jax.ShapeDtypeStruct((steps, batch_size), jnp.int32)
  start = time.perf_counter()
  compiled = epoch_fn.lower(params, opt_state, shape_x, shape_y).compile()
  compile_time = time.perf_counter() - start

  result = TrainResult([], [], [], [], compile_time, [], params, opt_state)
  epochs_iter = range(epochs)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm(epochs_iter, desc=desc, leave=False)
    epochs_iter = bar
  for _ in epochs_iter:
    order = rng.permutation(len(y))[: steps * batch_size]
    xs = jnp.asarray(x[order].reshape(steps, batch_size, -1))
    ys = jnp.asarray(y[order].reshape(steps, batch_size))
    start = time.perf_counter()
    params, opt_state, losses = compiled(params, opt_state, xs, ys)
    jax.block_until_ready((params, losses))
    result.step_time.append((time.perf_counter() - start) / steps)
    accuracy, test_loss = evaluate(params, x_test, y_test)
    result.test_accuracy.append(float(accuracy))
    result.test_loss.append(float(test_loss))
    result.train_loss.append(float(jnp.mean(losses)))
    if state_metrics is not None:
      result.metrics.append(
          {k: np.asarray(v).tolist() for k, v in state_metrics(opt_state).items()}
      )
    if bar is not None:
      bar.set_postfix(test_acc=f'{float(accuracy):.3f}')
  result.params, result.opt_state = params, opt_state
  return result


def find_state(opt_state: Any, state_type: type) -> Any:
  """The first sub-state of type ``state_type`` in a (chained) optax state."""
  leaves = jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, state_type)
  )
  for leaf in leaves:
    if isinstance(leaf, state_type):
      return leaf
  raise ValueError(f'no {state_type.__name__} in the optimizer state.')
