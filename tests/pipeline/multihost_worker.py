"""One JAX process of test_multihost.py (run as a script, not by pytest).

Usage: python tests/pipeline/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Every process holds one CPU device. The processes join JAX's distributed
runtime on localhost, build a mesh over all their devices, and train a tiny
model for a few steps with `sam(..., layout=PerDevice('d'))` inside `jax.shard_map`:
each process perturbs with the gradient of its own half of the batch, and the
averaged gradient updates the (replicated) parameters. The final parameters
are written to OUT.npz.
"""

import os
import sys

if __name__ == '__main__':  # one CPU device per process
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ['XLA_FLAGS'] = ' '.join(
      f for f in os.environ.get('XLA_FLAGS', '').split()
      if 'xla_force_host_platform_device_count' not in f
  )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

STEPS = 4
RHO = 0.2
LEARNING_RATE = 0.1


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params['w1'])
  return jnp.mean((h @ params['w2'] - y) ** 2)


def problem():
  """The same data and initial weights in every process (and the test)."""
  rng = np.random.default_rng(0)
  params = {'w1': rng.normal(size=(3, 4)).astype(np.float32),
            'w2': rng.normal(size=(4, 1)).astype(np.float32)}
  x = rng.normal(size=(STEPS, 16, 3)).astype(np.float32)
  y = rng.normal(size=(STEPS, 16, 1)).astype(np.float32)
  return params, x, y


def main(argv):
  process_id, num_processes, port, out = (
      int(argv[0]), int(argv[1]), int(argv[2]), argv[3])
  jax.config.update('jax_num_cpu_devices', 1)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=f'localhost:{port}',
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=60,
  )
  import optax  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import sam_optax  # noqa: PLC0415

  assert jax.process_count() == num_processes, jax.process_count()
  mesh = jax.make_mesh((jax.device_count(),), ('d',))
  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P('d'))
  tx = optax.chain(sam_optax.sam(loss_fn, RHO, layout=sam_optax.PerDevice('d')),
                   optax.sgd(LEARNING_RATE))

  def step(params, state, x, y):
    local = jax.lax.pcast(params, 'd', to='varying')
    grads = jax.grad(loss_fn)(local, x, y)
    updates, state = tx.update(grads, state, params, x=x, y=y)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(step, mesh=mesh,
                               in_specs=(P(), P(), P('d'), P('d')),
                               out_specs=(P(), P())))
  params, x, y = problem()
  state = tx.init(params)
  params, state = jax.device_put((params, state), replicated)
  per_process = x.shape[1] // num_processes
  mine = slice(process_id * per_process, (process_id + 1) * per_process)
  for t in range(STEPS):
    xs = jax.make_array_from_process_local_data(split, x[t, mine])
    ys = jax.make_array_from_process_local_data(split, y[t, mine])
    params, state = step(params, state, xs, ys)
  np.savez(out, **{k: np.asarray(v.addressable_data(0))
                   for k, v in params.items()},
           perturbed_loss=np.asarray(state[0].perturbed_loss
                                     .addressable_data(0)))
  jax.distributed.shutdown()


if __name__ == '__main__':
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, os.path.dirname(os.path.dirname(here)))  # the checkout
  main(sys.argv[1:])
