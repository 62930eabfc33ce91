"""Shared pieces of the benchmarks: a small CNN, timing, and the report."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(__file__), 'results')


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> str:
  """The machine, backend and versions, for the heading of a result."""
  device = jax.devices()[0]
  accelerator = ('' if device.platform == 'cpu' else
                 f'{device.device_kind} ({device.platform}), ')
  return (
      f'{accelerator}{_cpu_model()}, {os.cpu_count()} CPU cores,'
      f' JAX {jax.__version__} on {device.platform}, Python'
      f' {platform.python_version()}, {datetime.date.today().isoformat()}'
  )


def cnn_init(key, length=40, channels=32, classes=10):
  """A small 1-D CNN for MNIST-1D-shaped inputs (batch, 40)."""
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      'conv1': jax.random.normal(k1, (5, 1, channels)) / np.sqrt(5),
      'conv2': jax.random.normal(k2, (5, channels, channels))
      / np.sqrt(5 * channels),
      'dense': jax.random.normal(k3, (length * channels, classes))
      / np.sqrt(length * channels),
      'bias': jnp.zeros(classes),
  }


def cnn_apply(params, x):
  h = x[..., None]
  for name in ('conv1', 'conv2'):
    h = jax.lax.conv_general_dilated(
        h, params[name], (1,), 'SAME', dimension_numbers=('NWC', 'WIO', 'NWC')
    )
    h = jax.nn.relu(h)
  return h.reshape(h.shape[0], -1) @ params['dense'] + params['bias']


def cnn_loss(params, batch):
  logits = cnn_apply(params, batch['x'])
  labels = jax.nn.one_hot(batch['y'], logits.shape[-1])
  return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))


def random_batch(key, batch_size=128, length=40, classes=10):
  kx, ky = jax.random.split(key)
  return {
      'x': jax.random.normal(kx, (batch_size, length)),
      'y': jax.random.randint(ky, (batch_size,), 0, classes),
  }


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], repeats: int, calls: int
) -> dict[str, list[float]]:
  """Seconds per call of each fn, `repeats` rounds interleaved in one run.

  Each fn is called once first (compile and warm-up). Each round times
  `calls` back-to-back calls of every fn in turn, blocking on the result.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(calls):
        out = fn()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / calls)
  return times


def paired_ratio(times, numerator: str, denominator: str, scale=1.0):
  """Median over rounds of numerator / (scale * denominator), same round."""
  return statistics.median(
      a / (scale * b) for a, b in zip(times[numerator], times[denominator])
  )


def median_ms(times, name) -> float:
  return 1e3 * statistics.median(times[name])


def write_section(name: str, markdown: str) -> str:
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f'{name}.md')
  with open(path, 'w') as f:
    f.write(markdown.rstrip() + '\n')
  return path
