"""The worked example of docs/design.md is a real variant (see variants.py).

The shared battery runs over it like over every shipped variant; here its
formula is checked against a hand-written reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from variants import design_doc_variant


def loss_fn(params, x):
  return jnp.sum(jnp.cos(x @ params['w']) + params['b'] ** 2)


def test_sign_sam_is_the_gradient_at_rho_sign_g_over_its_norm():
  params = {'w': jnp.asarray([0.3, -0.7, 1.1]), 'b': jnp.asarray([0.5, -2.0])}
  x = jnp.asarray([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
  rho = 0.2
  tx = optax.chain(design_doc_variant()(loss_fn, rho=rho), optax.sgd(0.1))
  g0 = jax.grad(loss_fn)(params, x)
  updates, _ = tx.update(g0, tx.init(params), params, x=x)
  sign = {k: np.sign(np.asarray(v)) for k, v in g0.items()}
  norm = np.sqrt(sum(np.sum(s ** 2) for s in sign.values()))
  point = {k: np.asarray(params[k]) + rho * sign[k] / norm for k in params}
  want = jax.grad(loss_fn)(point, x)
  for k in params:
    np.testing.assert_allclose(updates[k], -0.1 * want[k], rtol=1e-5)
