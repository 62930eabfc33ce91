"""Type checkers see the real signatures: pyright flags a misused rho."""

from __future__ import annotations

import inspect
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

import sam_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMON_OPTIONS = ('ascent_steps', 'has_aux', 'perturbation_mask', 'layout',
                  'track_cosine')

# Each line marked `# flagged` must get exactly one pyright error.
MISUSE = '''
import jax.numpy as jnp
import sam_optax
from sam_optax import sharpness

def loss_fn(params: jnp.ndarray) -> jnp.ndarray:
  return jnp.sum(params ** 2)

sam_optax.sam(loss_fn, rho='0.05')  # flagged
sam_optax.asam(loss_fn, eta=None)  # flagged
sam_optax.xsam(loss_fn, ascent_steps='2')  # flagged
sam_optax.gsam(loss_fn, track_cosine=1.0)  # flagged
sam_optax.sam(loss_fn, rhoo=0.05)  # flagged
top = sharpness.hessian_top_eigenvalue(loss_fn, jnp.ones(3))
top.eigenvalues  # flagged
'''

CORRECT = '''
import jax.numpy as jnp
import optax
import sam_optax
from sam_optax import sharpness

def loss_fn(params: jnp.ndarray) -> jnp.ndarray:
  return jnp.sum(params ** 2)

rho: sam_optax.ScalarOrSchedule = optax.linear_schedule(0.0, 0.1, 10)
tx = optax.chain(
    sam_optax.sam(loss_fn, rho=rho, ascent_steps=2, has_aux=False,
                  perturbation_mask=None, layout=sam_optax.Chunks(2),
                  track_cosine=True),
    optax.sgd(0.1))
coupled = sam_optax.wsam(loss_fn=loss_fn, rho=0.05, gamma=jnp.asarray(0.8))
xsam: optax.GradientTransformationExtraArgs = sam_optax.xsam(
    loss_fn, 0.1, rho_max=0.2, probe_every=None, alpha=0.5)
injected = sam_optax.inject_hyperparams(sam_optax.sam)(loss_fn, rho=0.05)
top = sharpness.hessian_top_eigenvalue(loss_fn, jnp.ones(3))
value: float = float(top.eigenvalue)
'''


def pyright_errors(tmp_path: pathlib.Path, **scripts: str) -> dict:
  """Runs pyright on the scripts; maps each to its errors' (line, message)."""
  for name, text in scripts.items():
    (tmp_path / f'{name}.py').write_text(textwrap.dedent(text))
  # The checkout itself, whether sam_optax is installed editable or not.
  (tmp_path / 'pyrightconfig.json').write_text(json.dumps(
      {'extraPaths': [str(ROOT)], 'typeCheckingMode': 'standard'}))
  run = subprocess.run(
      [sys.executable, '-m', 'pyright', '--outputjson', '-p', str(tmp_path),
       *[f'{name}.py' for name in scripts]],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  report = json.loads(run.stdout)
  errors = {name: [] for name in scripts}
  for diagnostic in report['generalDiagnostics']:
    if diagnostic['severity'] == 'error':
      name = pathlib.Path(diagnostic['file']).stem
      errors[name].append((diagnostic['range']['start']['line'] + 1,
                           diagnostic['message']))
  return errors


def test_pyright_flags_each_misuse_and_passes_correct_use(tmp_path):
  errors = pyright_errors(tmp_path, misuse=MISUSE, correct=CORRECT)
  assert errors['correct'] == [], errors['correct']
  lines = textwrap.dedent(MISUSE).splitlines()
  flagged = [i + 1 for i, line in enumerate(lines) if line.endswith('# flagged')]
  assert sorted(line for line, _ in errors['misuse']) == flagged, errors
  by_line = dict(errors['misuse'])
  assert '"rho"' in by_line[flagged[0]], by_line[flagged[0]]
  assert 'ScalarOrSchedule' in by_line[flagged[0]], by_line[flagged[0]]
  assert '"eigenvalues"' in by_line[flagged[-1]], by_line[flagged[-1]]


@pytest.mark.parametrize('name', ['sam', 'asam', 'xsam', 'wsam', 'looksam'])
def test_signature_shows_loss_fn_hyperparameters_and_the_options(name):
  factory = getattr(sam_optax, name)
  parameters = inspect.signature(factory).parameters
  assert list(parameters)[:2] == ['loss_fn', 'rho']
  assert list(parameters)[-len(COMMON_OPTIONS):] == list(COMMON_OPTIONS)
  assert parameters['rho'].annotation == 'ScalarOrSchedule'
  assert all(parameters[o].kind is inspect.Parameter.KEYWORD_ONLY
             for o in COMMON_OPTIONS)
  assert 'common' not in parameters


def test_annealable_arguments_are_the_scalar_or_schedule_ones():
  from sam_optax._src.core import inject  # pylint: disable=g-import-not-at-top
  assert inject.annealable(sam_optax.sam) == {'rho'}
  assert inject.annealable(sam_optax.xsam) == {'rho', 'rho_max', 'alpha'}
  assert inject.annealable(sam_optax.wsam) == {'rho', 'gamma'}
  assert inject.annealable(sam_optax.bsam) == {'learning_rate', 'rho'}
  assert inject.annealable(sam_optax.decoupled_wsam) == {
      'rho', 'gamma', 'learning_rate'}
  with pytest.raises(TypeError, match='optax.inject_hyperparams'):
    sam_optax.inject_hyperparams(lambda learning_rate: None)
