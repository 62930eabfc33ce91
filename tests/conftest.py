"""pytest set-up: 8 fake CPU devices, before JAX touches a device.

On a loaded 2-core machine a collective over 8 fake devices can wait longer
than XLA:CPU's default 40 s before every device arrives, which aborts the
process; the timeout is raised for the test run.

The tests' programs are tiny and each runs a few times, so compiling them is
most of the suite's time: LLVM's backend optimizations are turned off
(`--xla_backend_optimization_level=0`), which compiles the test_layouts.py
matrix 27 % faster on 2 cores. XLA's own graph passes (fusion, algebraic
simplification) still run, so the programs are the ones users compile, only
their machine code is less optimized.

Compiling is most of the suite's time, and many tests (and both xdist
workers) compile the same program: one compilation cache, new for each run
and shared by its workers, compiles it once. It is removed when the run ends.
"""

import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_FLAGS = (
    '--xla_force_host_platform_device_count=8',
    '--xla_cpu_collective_call_warn_stuck_timeout_seconds=120',
    '--xla_cpu_collective_call_terminate_timeout_seconds=1200',
    '--xla_backend_optimization_level=0',
)
_flags = os.environ.get('XLA_FLAGS', '')
for _flag in _FLAGS:
  if _flag.split('=')[0] not in _flags:
    _flags = f'{_flags} {_flag}'.strip()
os.environ['XLA_FLAGS'] = _flags

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

# The controller makes the folder before it starts the workers, which
# inherit the variable; a worker or a plain run without it makes its own.
_CACHE_VARIABLE = 'SAM_OPTAX_TEST_COMPILATION_CACHE'
_OWNS_CACHE = _CACHE_VARIABLE not in os.environ
if _OWNS_CACHE:
  os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix='sam_optax_jit_')
jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE_VARIABLE])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)


def pytest_unconfigure(config):
  del config
  if _OWNS_CACHE:
    shutil.rmtree(os.environ[_CACHE_VARIABLE], ignore_errors=True)
