"""The README's Python blocks run, in order, as one program."""

import pathlib
import re
import subprocess

README = pathlib.Path(__file__).resolve().parents[2] / 'README.md'
CI = pathlib.Path(__file__).resolve().parents[2] / '.ci' / 'run'


def python_blocks():
  return re.findall(r'```python\n(.*?)```', README.read_text(), re.S)


def test_readme_python_blocks_run():
  blocks = python_blocks()
  assert blocks, 'the README has no python blocks'
  namespace = {}
  for block in blocks:
    exec(compile(block, str(README), 'exec'), namespace)  # noqa: S102


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r'```(?:bash|sh)\n(.*?)```', README.read_text(), re.S)
  first = commands[0].strip().splitlines()
  assert len(first) == 2, 'the README opens with two commands'
  test_command = first[1].split('&&')[-1].strip()
  assert test_command in CI.read_text().splitlines(), test_command
  assert subprocess.run(['bash', '-n', str(CI)]).returncode == 0
