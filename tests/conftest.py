"""pytest set-up: 8 fake CPU devices, before JAX touches a device.

On a loaded 2-core machine a collective over 8 fake devices can wait longer
than XLA:CPU's default 40 s before every device arrives, which aborts the
process; the timeout is raised for the test run.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_FLAGS = (
    '--xla_force_host_platform_device_count=8',
    '--xla_cpu_collective_call_warn_stuck_timeout_seconds=120',
    '--xla_cpu_collective_call_terminate_timeout_seconds=1200',
)
_flags = os.environ.get('XLA_FLAGS', '')
for _flag in _FLAGS:
  if _flag.split('=')[0] not in _flags:
    _flags = f'{_flags} {_flag}'.strip()
os.environ['XLA_FLAGS'] = _flags

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
