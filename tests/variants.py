"""The sharpness-aware transformations that the shared battery runs over.

Every variant, present and future, adds one entry here: the battery in
test_battery.py then checks convergence, jit stability, inject_hyperparams,
low-precision dtypes, zero gradients, rho = 0, schedules and bad input for it.
"""

import dataclasses
import pathlib
import re
from typing import Any, Callable

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

  def make(self, loss_fn, rho, **kwargs):
    """The variant with the cosine diagnostic on (the battery checks it)."""
    kwargs = {'track_cosine': True, **self.kwargs, **kwargs}
    return self.factory(loss_fn, rho=rho, **kwargs)


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
    # the defaults, over steps and layouts, is checked in test_family.py.
    Variant('friendly_sam', sam_optax.friendly_sam, {'sigma': 0.0}),
    Variant('vasso', sam_optax.vasso, {'theta': 1.0}),
    # The cheap family, configured so that every step is a SAM step (k=1,
    # p=1, a threshold below any gradient norm, beta=1): the battery checks
    # their plumbing; their SAM / reuse steps are checked in test_cheap.py.
    # msam's first step is special by design (v = 0), so the stateless
    # checks cannot apply: test_cheap.py runs the battery checks that do.
    Variant('looksam', sam_optax.looksam, {'k': 1}, unused=('alpha',)),
    Variant('ae_sam', sam_optax.ae_sam, {'c_start': -4.0, 'c_end': -4.0}),
    Variant('random_sam', sam_optax.random_sam, {'p': 1.0}),
    # gamma 0.999 keeps every example of the battery's groups (k = n) but
    # runs SDS's per-example selection; gamma=1 is SWP alone (test_esam_sds).
    Variant('esam', sam_optax.esam, {'beta': 1.0, 'gamma': 0.999}),
]

# The layout battery (test_layouts.py) compares a layout with the variant run
# alone on each group's examples, so a variant that chooses something from
# all groups together (XSAM's probe) runs there with that choice fixed; the
# probe's agreement across groups is tested in test_devices.py.
LAYOUT_VARIANTS = [
    v if v.name != 'xsam' else Variant(
        'xsam_fixed_alpha', sam_optax.xsam,
        {'probe_every': None, 'alpha': 0.7})
    for v in VARIANTS
]
