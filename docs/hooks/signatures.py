"""Griffe extension: a function's signature on the site is the one Python sees.

Griffe reads signatures from the source. A factory whose decorator adds
parameters (the keyword-only options every transformation takes:
``ascent_steps, has_aux, perturbation_mask, layout, track_cosine``) would
show only the parameters written in its ``def``. For every module-level
function, this extension imports the object and, where
``inspect.signature`` lists parameters that the source does not, rebuilds
Griffe's parameter list in the runtime order: the parameters of the source
as Griffe read them, the others from the runtime signature.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import griffe

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


def runtime_signature(module_path: str, name: str) -> inspect.Signature | None:
  """The signature Python reports for ``module_path.name``, if it has one."""
  try:
    obj = getattr(importlib.import_module(module_path), name)
    return inspect.signature(obj)
  except (ImportError, AttributeError, TypeError, ValueError):
    return None


def _annotation(parameter: inspect.Parameter) -> str | None:
  if parameter.annotation is inspect.Parameter.empty:
    return None
  if isinstance(parameter.annotation, str):
    return parameter.annotation
  return inspect.formatannotation(parameter.annotation)


def merged_parameters(
    static: griffe.Parameters, signature: inspect.Signature
) -> griffe.Parameters | None:
  """The runtime parameters, reusing Griffe's where the names match.

  None when the runtime signature adds nothing to the source's.
  """
  known = {parameter.name: parameter for parameter in static}
  if set(signature.parameters) <= set(known):
    return None
  merged = []
  for name, parameter in signature.parameters.items():
    if name in known:
      merged.append(known[name])
      continue
    default = parameter.default
    merged.append(griffe.Parameter(
        name,
        kind=_KINDS[parameter.kind],
        annotation=_annotation(parameter),
        default=None if default is inspect.Parameter.empty else repr(default),
    ))
  return griffe.Parameters(*merged)


class RuntimeSignatures(griffe.Extension):
  """Completes the signatures of decorated module-level functions."""

  def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
    del kwargs
    if not isinstance(func.parent, griffe.Module):
      return
    signature = runtime_signature(func.parent.path, func.name)
    if signature is None:
      return
    merged = merged_parameters(func.parameters, signature)
    if merged is not None:
      func.parameters = merged
