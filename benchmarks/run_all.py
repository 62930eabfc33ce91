"""Runs every benchmark and rewrites benchmarks/RESULTS.md from their sections.

Each benchmark script runs in its own process (the device benchmark needs 8
fake CPU devices set before JAX starts) and writes its section to
benchmarks/results/<name>.md; this script then assembles RESULTS.md with the
machine and JAX version at the top. Hand-written readings of a section live
in benchmarks/results/<name>.notes.md, which no script overwrites.

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
    'scale': 'bench_scale.py',
    'xsam': 'bench_xsam.py',
    'devices': 'bench_devices.py',
    'hessian': 'bench_hessian.py',
    'helpers_call': 'bench_helpers_call.py',
    'xsam_defaults': 'xsam_defaults.py',
    'crosscheck': 'crosscheck_family.py',
    'efficient': 'bench_efficient.py',
    'family': 'bench_family.py',
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
      'Accelerators: none of these figures comes from a GPU or TPU (none was'
      ' at hand when they were measured); run this script on one and keep'
      ' its sections apart, under a heading that names the device.',
      '',
  ]
  def section(name):
    """results/<name>.md, then the hand-written results/<name>.notes.md."""
    texts = []
    for suffix in ('.md', '.notes.md'):
      path = os.path.join(HERE, 'results', name + suffix)
      if os.path.exists(path):
        with open(path) as f:
          texts += [f.read().rstrip(), '']
    return texts

  for name in BENCHMARKS:
    parts += section(name) or [
        f'## {name}', '',
        f'Not measured yet: run `python benchmarks/{BENCHMARKS[name]}`.', '']
  # Sections measured elsewhere (e.g. by an example), copied in by hand.
  extra = sorted(
      f[:-3] for f in os.listdir(os.path.join(HERE, 'results'))
      if f.endswith('.md') and not f.endswith('.notes.md')
      and f[:-3] not in BENCHMARKS)
  for name in extra:
    parts += section(name)
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
