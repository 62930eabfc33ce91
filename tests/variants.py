"""The variant table: every variant the battery (variants/test_battery.py) runs.

Every variant, present and future, adds one row here: the battery then checks
convergence, jit stability, inject_hyperparams, low-precision dtypes, zero
gradients, rho = 0, schedules and bad input for it. A row's capabilities say
which checks apply (a complete optimizer, a first step that is special by
design, a step that starts from a noisy sample).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Callable

import optax

import sam_optax

DESIGN_DOC = pathlib.Path(__file__).parent.parent / 'docs' / 'design.md'


def design_doc_variant():
  """The worked example of docs/design.md: the variant a newcomer adds."""
  text = DESIGN_DOC.read_text()
  section = text[text.index('## Adding a variant'):]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  namespace = {}
  exec(compile(code, str(DESIGN_DOC), 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['sign_sam']


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  factory: Callable[..., Any]
  kwargs: dict = dataclasses.field(default_factory=dict)
  # Hyperparameters this configuration does not use in its updates (e.g.
  # xsam's alpha with the probe on only seeds the state before the probe).
  unused: tuple = ()
  # Capabilities: which of the battery's checks apply.
  # A complete optimizer produces the final update (its own learning rate,
  # `base_optimizer` where it takes one); a bad step is skipped and counted
  # in its state, not handed on as NaN.
  complete: bool = False
  takes_base: bool = False
  # Each step depends on the state beyond the count (a momentum, a
  # precision): a step of a running transformation is not a fresh one's.
  stateless: bool = True
  # The step starts from a noisy sample of the weights (bsam): rho = 0 is
  # not the base optimizer and a zero gradient is not a zero update.
  noisy: bool = False
  # The state has SAM's four common fields, cosine among them, and the
  # factory takes track_cosine and ascent_steps.
  common_options: bool = True
  # The clean gradient g0 is read on every step, so grad_norm is measured
  # without track_cosine (msam reads g0 only with track_cosine=True).
  reads_g0: bool = True
  # Hyperparameters any finite value of which is valid (a learning rate):
  # only a NaN of theirs is a bad step.
  signed: tuple = ()
  # Battery checks (test function names) this row does not pass yet: each
  # is a gap of the variant, named in the row's comment, not a capability.
  not_yet: tuple = ()
  # Where the diagnostics (count, perturbed_loss, grad_norm) sit in the
  # optimizer's state: the state itself, or this field of it.
  diagnostics_field: str | None = None

  def make(self, loss_fn, rho, **kwargs):
    """The variant with the cosine diagnostic on (the battery checks it)."""
    on = {'track_cosine': True} if self.common_options else {}
    return self.factory(loss_fn, rho=rho, **{**on, **self.kwargs, **kwargs})

  def optimizer(self, loss_fn, rho, learning_rate, momentum=None, **kwargs):
    """The whole optimizer: the variant before SGD, or the complete one."""
    base = optax.sgd(learning_rate, momentum)
    if not self.complete:
      return optax.chain(self.make(loss_fn, rho, **kwargs), base)
    if self.takes_base:
      kwargs['base_optimizer'] = base
    return self.make(loss_fn, rho, learning_rate=learning_rate, **kwargs)

  def diagnostics(self, state):
    """The diagnostics of a state of `optimizer` (or of the variant alone)."""
    if not self.complete and not hasattr(state, '_fields'):
      state = state[0]  # optax.chain's tuple
    return getattr(state, self.diagnostics_field) if (
        self.diagnostics_field) else state


VARIANTS = [
    Variant('sam', sam_optax.sam),
    Variant('sam_k2', sam_optax.sam, {'ascent_steps': 2}),
    Variant('asam', sam_optax.asam, {'eta': 0.01}),
    Variant('xsam', sam_optax.xsam, {'probe_every': 1, 'rho_max': 0.02},
            unused=('alpha',)),
    Variant('sign_sam_of_design_doc', design_doc_variant()),
    Variant('gsam', sam_optax.gsam, {'alpha': 0.4}),
    # gamma 0.6 (alpha 1.5): the quadratic's SAM-like orbit, scaled by alpha,
    # stays within the convergence test's tolerance.
    Variant('wsam', sam_optax.wsam, {'gamma': 0.6}),
    # Friendly SAM and VaSSO keep a gradient average whose first step is SAM.
    # test_rho_schedule_is_evaluated_on_own_count compares step k of a
    # running transformation with a fresh one (stateless by assumption), so
    # their rows run the average with the ascent following g0 itself (sigma=0,
    # theta=1): the battery checks their state's plumbing; their math with
    # the defaults, over steps and layouts, is checked in variants/test_family.py.
    Variant('friendly_sam', sam_optax.friendly_sam, {'sigma': 0.0}),
    Variant('vasso', sam_optax.vasso, {'theta': 1.0}),
    # The cheap family, configured so that every step is a SAM step (k=1,
    # p=1, a threshold below any gradient norm, beta=1): the battery checks
    # their plumbing; their SAM / reuse steps are checked in test_cheap.py.
    Variant('looksam', sam_optax.looksam, {'k': 1}, unused=('alpha',)),
    Variant('ae_sam', sam_optax.ae_sam, {'c_start': -4.0, 'c_end': -4.0}),
    Variant('random_sam', sam_optax.random_sam, {'p': 1.0}),
    # gamma 0.999 keeps every example of the battery's groups (k = n) but
    # runs SDS's per-example selection; gamma=1 is SWP alone (test_esam_sds).
    Variant('esam', sam_optax.esam, {'beta': 1.0, 'gamma': 0.999}),
]

# Rows only the variant battery runs (other tests iterate over VARIANTS).
# msam's first step is special by design (v = 0): a fresh transformation's
# step is not a running one's.
MSAM = Variant('msam', sam_optax.msam, {'beta': 0.9}, stateless=False,
               reads_g0=False)
COMPLETE_OPTIMIZERS = [
    # A stateless base (SGD without momentum unless the check asks for one):
    # the step is a fresh one's.
    Variant('decoupled_wsam', sam_optax.decoupled_wsam,
            {'gamma': 0.75, 'base_optimizer': optax.sgd(0.1),
             'learning_rate': 0.1},
            complete=True, takes_base=True, diagnostics_field='wsam',
            signed=('learning_rate',)),
    # num_data 1e6: the noise (std 1e-3 / sqrt(s)) stays far below the
    # battery's tolerances.
    Variant('bsam', sam_optax.bsam,
            {'learning_rate': 0.1, 'num_data': 10 ** 6, 'seed': 1},
            complete=True, stateless=False, noisy=True,
            common_options=False),
]
BATTERY = VARIANTS + [MSAM] + COMPLETE_OPTIMIZERS

# The layout battery (pipeline/test_layouts.py) compares a layout with the variant run
# alone on each group's examples, so a variant that chooses something from
# all groups together (XSAM's probe) runs there with that choice fixed; the
# probe's agreement across groups is tested in pipeline/test_devices.py.
LAYOUT_VARIANTS = [
    v if v.name != 'xsam' else Variant(
        'xsam_fixed_alpha', sam_optax.xsam,
        {'probe_every': None, 'alpha': 0.7})
    for v in VARIANTS
]
