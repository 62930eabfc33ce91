"""The decorator names a variant after its factory; a variant declares a name only where the two differ."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from sam_optax._src.pipeline import transformation
from sam_optax._src.pipeline import variant as variant_lib
from sam_optax._src.variants import sam as sam_lib
from variants import design_doc_variant


def loss_fn(params, batch):
  return jnp.mean((batch * params['w']) ** 2)


@transformation.transformation
def renamed_sam(rho=0.05, **common):
  return variant_lib.Variant(hyperparams={'rho': rho}, state=sam_lib.SAMState,
                             name='public_name')


def test_the_factory_names_the_variant_in_its_errors():
  sign_sam = design_doc_variant()  # declares no name
  with pytest.raises(ValueError, match=r'^sign_sam: rho must be'):
    sign_sam(loss_fn, rho=-1.0)


def test_a_declared_name_wins_over_the_factory_name():
  with pytest.raises(ValueError, match=r'^public_name: rho must be'):
    renamed_sam(loss_fn, rho=-1.0)


def test_a_variant_built_without_the_decorator_must_be_named():
  unnamed = variant_lib.Variant(hyperparams={'rho': 0.05},
                                state=sam_lib.SAMState)
  with pytest.raises(TypeError, match=r"needs a name: pass name='\.\.\.'"):
    transformation.build(unnamed, loss_fn)
  named = transformation.build(unnamed.named('by_hand'), loss_fn)
  assert callable(named.update)
