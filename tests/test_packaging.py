"""The package metadata is true: floors pinned for the min-versions run, an sdist whose tests run."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / '.ci' / 'constraints-min.txt'
# The extras a user installs; `crosscheck` is torch's own environment.
EXTRAS = ('test', 'examples', 'docs')
# Folders the sdist carries whole, for its tests to run.
SHIPPED_FOLDERS = ('tests', 'examples', 'notebooks', 'docs', 'benchmarks', '.ci')
SHIPPED_FILES = ('LICENSE', 'README.md', 'mkdocs.yml', 'pyproject.toml')
NOT_SHIPPED = ('__pycache__', '.ipynb_checkpoints', '.pytest_cache')


def project() -> dict:
  return tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']


def declared_floors() -> dict[str, Version]:
  """Maps each declared requirement to its `>=` floor."""
  meta = project()
  requirements = list(meta['dependencies'])
  for extra in EXTRAS:
    requirements += meta['optional-dependencies'][extra]
  floors = {}
  for line in requirements:
    requirement = Requirement(line)
    lower = [Version(s.version) for s in requirement.specifier if s.operator == '>=']
    assert len(lower) == 1, (
        f'{line!r}: every requirement needs exactly one `>=` floor, pinned in'
        f' {CONSTRAINTS.name}'
    )
    name = canonicalize_name(requirement.name)
    assert floors.setdefault(name, lower[0]) == lower[0], (
        f'{name} has two floors: {floors[name]} and {lower[0]}'
    )
  return floors


def pinned_versions() -> dict[str, Version]:
  pins = {}
  for line in CONSTRAINTS.read_text().splitlines():
    line = line.split('#')[0].strip()
    if line:
      name, version = line.split('==')
      pins[canonicalize_name(name)] = Version(version)
  return pins


def test_every_declared_floor_is_pinned_in_the_constraints():
  assert declared_floors() == pinned_versions()


def test_python_classifiers_start_at_requires_python_and_leave_no_gap():
  meta = project()
  floor = re.fullmatch(r'>=3\.(\d+)', meta['requires-python'])
  assert floor, meta['requires-python']
  minors = sorted(
      int(m.group(1)) for c in meta['classifiers']
      if (m := re.fullmatch(r'Programming Language :: Python :: 3\.(\d+)', c))
  )
  assert minors[0] == int(floor.group(1))
  assert minors == list(range(minors[0], minors[-1] + 1))


def shipped_source_files() -> set[str]:
  files = {name for name in SHIPPED_FILES}
  for folder in SHIPPED_FOLDERS:
    for path in (ROOT / folder).rglob('*'):
      relative = path.relative_to(ROOT)
      if path.is_file() and not set(relative.parts) & set(NOT_SHIPPED) \
          and path.suffix != '.pyc':
        files.add(relative.as_posix())
  return files


def test_the_sdist_carries_the_suite_and_the_license(tmp_path):
  floor = declared_floors()['setuptools']
  installed = Version(importlib.metadata.version('setuptools'))
  assert installed >= floor, (
      f'setuptools {installed} cannot write the license metadata (PEP 639);'
      f" `pip install -e '.[test]'` brings setuptools>={floor}"
  )
  # Built from a copy so the checkout's egg-info is left alone.
  source = tmp_path / 'source'
  shutil.copytree(
      ROOT, source,
      ignore=shutil.ignore_patterns('.git', '*.egg-info', 'build', 'dist',
                                    'out', 'site', *NOT_SHIPPED, '*.pyc'),
  )
  out = tmp_path / 'dist'
  subprocess.run(
      [sys.executable, '-c',
       'import sys; from setuptools import build_meta;'
       ' print(build_meta.build_sdist(sys.argv[1]))', str(out)],
      cwd=source, check=True, capture_output=True, text=True,
  )
  (sdist,) = out.glob('*.tar.gz')
  with tarfile.open(sdist) as archive:
    names = archive.getnames()
    top = names[0].split('/')[0]
    pkg_info = archive.extractfile(f'{top}/PKG-INFO').read().decode()
  shipped = {name.split('/', 1)[1] for name in names if '/' in name}
  missing = sorted(shipped_source_files() - shipped)
  assert not missing, f'the sdist lacks {missing}; add them to MANIFEST.in'
  assert 'sam_optax/__init__.py' in shipped
  assert 'License-Expression: Apache-2.0' in pkg_info
  assert 'License-File: LICENSE' in pkg_info
  assert f'Requires-Python: {project()["requires-python"]}' in pkg_info
