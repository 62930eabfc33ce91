"""Every notebook in notebooks/ runs top to bottom without a cell error.

Notebooks are executed in memory with nbclient (kernel ``python3``) and
``SAM_OPTAX_NOTEBOOK_QUICK=1`` in the environment, which they read to run a
tiny version; outputs are never written back. Notebooks are stored without
outputs, which is checked too.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
import nbformat

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / 'notebooks'
KERNEL = 'python3'
REQUIRED = ('tutorial.ipynb',)


def ensure_kernel() -> None:
  """Registers an ipykernel named python3 when Jupyter knows no such kernel."""
  from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top

  if KERNEL in KernelSpecManager().find_kernel_specs():
    return
  subprocess.run(
      [sys.executable, '-m', 'ipykernel', 'install', '--user', '--name', KERNEL],
      check=True,
      capture_output=True,
  )


def notebooks() -> list[str]:
  return sorted(p.name for p in NOTEBOOKS.glob('*.ipynb'))


def test_required_notebooks_exist():
  missing = [name for name in REQUIRED if name not in notebooks()]
  assert not missing, f'missing notebooks: {missing}'


@pytest.mark.parametrize('name', notebooks())
def test_notebook_is_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  with_outputs = [
      i for i, cell in enumerate(nb.cells)
      if cell.cell_type == 'code'
      and (cell.get('outputs') or cell.get('execution_count') is not None)
  ]
  assert not with_outputs, (
      f'{name}: code cells {with_outputs} hold outputs; clear them (e.g.'
      f' `jupyter nbconvert --clear-output --inplace notebooks/{name}`).'
  )


@pytest.mark.slow
@pytest.mark.parametrize('name', notebooks())
def test_notebook_runs(name, tmp_path, monkeypatch):
  ensure_kernel()
  path = NOTEBOOKS / name
  nb = nbformat.read(path, as_version=4)
  # The kernel inherits this process's environment.
  monkeypatch.setenv('SAM_OPTAX_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  # Let the kernel find the repository's package and examples first.
  root = str(NOTEBOOKS.parent)
  monkeypatch.setenv(
      'PYTHONPATH', os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))
  )
  client = NotebookClient(
      nb,
      kernel_name=KERNEL,
      timeout=300,
      allow_errors=False,
      resources={'metadata': {'path': str(tmp_path)}},
  )
  try:
    client.execute()
  except CellExecutionError as error:
    pytest.fail(f'{name} failed:\n{error}')
  errors = [
      output for cell in nb.cells if cell.cell_type == 'code'
      for output in cell.outputs if output.output_type == 'error'
  ]
  assert not errors
  # Never written back: the stored notebook still has no outputs.
  stored = nbformat.read(path, as_version=4)
  assert all(
      not cell.get('outputs') for cell in stored.cells
      if cell.cell_type == 'code'
  )
