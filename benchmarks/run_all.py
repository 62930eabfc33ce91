"""Runs every benchmark and rewrites benchmarks/RESULTS.md from their sections.

Each benchmark script runs in its own process (the device benchmark needs 8
fake CPU devices set before JAX starts) and writes its section to
benchmarks/results/<name>.md; this script then assembles RESULTS.md with the
machine and JAX version at the top.

  python benchmarks/run_all.py            # everything (tens of minutes on 2 cores)
  python benchmarks/run_all.py --only step memory
  python benchmarks/run_all.py --assemble # only rebuild RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# Section name -> the script that writes benchmarks/results/<name>.md.
BENCHMARKS = {
    'step': 'bench_step.py',
    'memory': 'bench_memory.py',
    'xsam': 'bench_xsam.py',
    'devices': 'bench_devices.py',
    'hessian': 'bench_hessian.py',
    'xsam_defaults': 'xsam_defaults.py',
}


def assemble() -> str:
  from _common import machine  # pylint: disable=g-import-not-at-top

  parts = [
      '# Benchmark results',
      '',
      'Every figure below was measured by the script named in its section, on'
      ' the machine named there (machines here are shared and noisy: we quote'
      ' medians of interleaved repeats and ratios measured side by side in one'
      ' run). Rebuild with `python benchmarks/run_all.py`.',
      '',
      f'Last assembled on: {machine()}.',
      '',
  ]
  for name in BENCHMARKS:
    path = os.path.join(HERE, 'results', f'{name}.md')
    if os.path.exists(path):
      with open(path) as f:
        parts += [f.read().rstrip(), '']
    else:
      parts += [f'## {name}', '', f'Not measured yet: run'
                f' `python benchmarks/{BENCHMARKS[name]}`.', '']
  extra = sorted(
      f[:-3] for f in os.listdir(os.path.join(HERE, 'results'))
      if f.endswith('.md') and f[:-3] not in BENCHMARKS)
  for name in extra:
    with open(os.path.join(HERE, 'results', f'{name}.md')) as f:
      parts += [f.read().rstrip(), '']
  text = '\n'.join(parts).rstrip() + '\n'
  with open(os.path.join(HERE, 'RESULTS.md'), 'w') as f:
    f.write(text)
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', nargs='+', choices=list(BENCHMARKS))
  parser.add_argument('--assemble', action='store_true',
                      help='only rebuild RESULTS.md from the sections')
  args = parser.parse_args(argv)
  if not args.assemble:
    for name in args.only or BENCHMARKS:
      print(f'== {BENCHMARKS[name]}', flush=True)
      start = time.perf_counter()
      subprocess.run([sys.executable, BENCHMARKS[name]], cwd=HERE, check=True)
      print(f'== {BENCHMARKS[name]} done in {time.perf_counter() - start:.0f}'
            ' s', flush=True)
  assemble()
  print('wrote', os.path.join(HERE, 'RESULTS.md'))


if __name__ == '__main__':
  main()
