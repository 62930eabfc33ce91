"""sam_optax: sharpness-aware minimization as optax transformations.

Sharpness-aware training is a one-line change to an optax optimizer::

  tx = optax.chain(sam_optax.sam(loss_fn, rho=0.05), optax.sgd(0.1, 0.9))
  updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
"""

from sam_optax._src.core.accumulation import chunked_value_and_grad
from sam_optax._src.core.inject import inject_hyperparams
from sam_optax._src.core.masks import normalization_mask
from sam_optax._src.core.mesh import MeshChunks
from sam_optax._src.core.mesh import mesh_chunks
from sam_optax._src.core.mesh import shard_batch
from sam_optax._src.core.schedules import rho_proportional_to_lr
from sam_optax._src.core.validation import ScalarOrSchedule
from sam_optax._src.pipeline.layouts import Chunks
from sam_optax._src.pipeline.layouts import PerDevice
from sam_optax._src.pipeline.update import IgnoredKeywordWarning
from sam_optax._src.variants.asam import asam
from sam_optax._src.variants.ae_sam import AESAMState
from sam_optax._src.variants.ae_sam import ae_sam
from sam_optax._src.variants.esam import ESAMState
from sam_optax._src.variants.esam import esam
from sam_optax._src.variants.looksam import LookSAMState
from sam_optax._src.variants.looksam import looksam
from sam_optax._src.variants.msam import MSAMState
from sam_optax._src.variants.msam import msam
from sam_optax._src.variants.random_sam import RandomSAMState
from sam_optax._src.variants.random_sam import random_sam
from sam_optax._src.variants.bsam import BSAMState
from sam_optax._src.variants.bsam import bsam
from sam_optax._src.variants.friendly_sam import FriendlySAMState
from sam_optax._src.variants.friendly_sam import friendly_sam
from sam_optax._src.variants.gsam import gsam
from sam_optax._src.variants.sam import SAMState
from sam_optax._src.variants.sam import sam
from sam_optax._src.variants.vasso import VaSSOState
from sam_optax._src.variants.vasso import vasso
from sam_optax._src.variants.decoupled_wsam import DecoupledWSAMState
from sam_optax._src.variants.decoupled_wsam import WSAMState
from sam_optax._src.variants.decoupled_wsam import decoupled_wsam
from sam_optax._src.variants.wsam import wsam
from sam_optax._src.variants.xsam import XSAMState
from sam_optax._src.variants.xsam import xsam
from sam_optax import sharpness

__version__ = '0.2.0'

__all__ = (
    'AESAMState',
    'BSAMState',
    'Chunks',
    'DecoupledWSAMState',
    'ESAMState',
    'FriendlySAMState',
    'IgnoredKeywordWarning',
    'LookSAMState',
    'MSAMState',
    'MeshChunks',
    'PerDevice',
    'RandomSAMState',
    'SAMState',
    'ScalarOrSchedule',
    'VaSSOState',
    'WSAMState',
    'XSAMState',
    'ae_sam',
    'asam',
    'bsam',
    'chunked_value_and_grad',
    'decoupled_wsam',
    'esam',
    'friendly_sam',
    'gsam',
    'inject_hyperparams',
    'looksam',
    'mesh_chunks',
    'msam',
    'normalization_mask',
    'random_sam',
    'rho_proportional_to_lr',
    'sam',
    'shard_batch',
    'sharpness',
    'vasso',
    'wsam',
    'xsam',
)
