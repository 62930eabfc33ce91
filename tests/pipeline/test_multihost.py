"""Two JAX processes on this machine train in lockstep with per-process SAM.

`tests/pipeline/multihost_worker.py` is started twice; the processes join JAX's own
distributed runtime (`jax.distributed.initialize` on localhost, gloo CPU
collectives), each perturbs with the gradient of its half of the batch
(``sam(..., layout=PerDevice('d'))`` in `jax.shard_map` over the global mesh), and
both must end with bit-identical parameters equal to a single-process
reference written out by hand here.
"""

import importlib.util
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# An artifact test: deselected by default, run by `-m slow` (and CI).
pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))  # the checkout
WORKER = os.path.join(HERE, 'multihost_worker.py')
PROCESSES = 2

_spec = importlib.util.spec_from_file_location('multihost_worker', WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def reference_params(parts=PROCESSES):
  """Per-part SAM gradients, averaged, then SGD -- in one process."""
  params, x, y = worker.problem()
  params = jax.tree.map(jnp.asarray, params)
  grad = jax.grad(worker.loss_fn)
  half = x.shape[1] // parts
  for t in range(worker.STEPS):
    grads = []
    for h in range(parts):
      xs, ys = x[t, h * half:(h + 1) * half], y[t, h * half:(h + 1) * half]
      g0 = grad(params, xs, ys)
      norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(g0)))
      point = jax.tree.map(lambda p, g: p + worker.RHO * g / norm, params, g0)
      grads.append(grad(point, xs, ys))
    mean = jax.tree.map(lambda *g: sum(g) / parts, *grads)
    params = jax.tree.map(lambda p, g: p - worker.LEARNING_RATE * g, params,
                          mean)
  return params


def test_two_processes_match_single_process_reference(tmp_path):
  port = free_port()
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [ROOT] + env.get('PYTHONPATH', '').split(os.pathsep))
  outs = [str(tmp_path / f'params{i}.npz') for i in range(PROCESSES)]
  procs = [
      subprocess.Popen(
          [sys.executable, WORKER, str(i), str(PROCESSES), str(port), outs[i]],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(PROCESSES)
  ]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=150)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, (
        f'process {i} failed (rc={proc.returncode}):\n{logs[i][-3000:]}')
  results = [np.load(out) for out in outs]
  expected = reference_params()
  for name in expected:
    # Lockstep: both processes hold bit-identical replicated parameters...
    np.testing.assert_array_equal(results[0][name], results[1][name])
    # ...equal to the per-process-perturbation reference.
    np.testing.assert_allclose(results[0][name], expected[name], atol=1e-5,
                               rtol=1e-5)
  # One synced (full-batch) perturbation would have ended elsewhere.
  synced = reference_params(parts=1)
  assert max(float(np.max(np.abs(results[0][k] - synced[k])))
             for k in synced) > 1e-4
