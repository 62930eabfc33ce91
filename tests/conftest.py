"""pytest set-up: 8 fake CPU devices, before JAX touches a device."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in flags:
  os.environ['XLA_FLAGS'] = (
      flags + ' --xla_force_host_platform_device_count=8'
  ).strip()

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
