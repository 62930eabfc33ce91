"""What a task of the benchmark study gives the runner (bench_tasks.py).

A task is one file in this folder that defines ``TASK = Task(...)``. The
runner owns everything else: the optimizers, the seeds, the training loop
(``lax.scan`` over steps inside one jitted function), the timing and the
tables. A task owns its data, its model and its metric.

The training loop the runner writes, for every optimizer alike::

  data = task.load(size, seed)                    # numpy arrays, once
  params, model_state = task.init(key_init, size)
  for step t:                                      # inside lax.scan
    key_t = jax.random.fold_in(key_train, t)
    batch = task.sample_batch(data_train, key_t, size)   # jit-able
    (loss, model_state_new), g0 = value_and_grad(task.loss, has_aux=True)(
        params, batch=batch, model_state=model_state, key=key_t)
    updates, opt_state = tx.update(g0, opt_state, params, batch=batch,
                                   model_state=model_state, key=key_t)
    params = apply_updates(params, updates); model_state = model_state_new
  task.metric(params, model_state, data, 'val' | 'test', size)  # a float

``task.loss`` is handed to the sharpness-aware transformation as its
``loss_fn`` with ``has_aux=True``: the perturbed pass sees the same batch,
the same BatchNorm statistics and the same dropout key as the clean pass,
and its new statistics are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping

Size = Literal['quick', 'full']


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of the study.

  Attributes:
    name: short name, e.g. ``'noisy-cnn'``.
    description: one paragraph for the results page (data, model, size).
    metric_name: e.g. ``'test accuracy %'`` or ``'test loss (nats/char)'``.
    higher_is_better: True for accuracy, False for a loss.
    base: ``'sgd'`` (SGD with momentum 0.9, cosine decay) or ``'adamw'``
      (AdamW, linear warm-up then cosine).
    learning_rate: the base optimizer's peak learning rate, picked once on
      the validation split (``lr_sweep`` records the sweep).
    weight_decay: AdamW's weight decay (ignored for SGD).
    warmup_fraction: fraction of the steps spent warming up (AdamW only).
    lr_grid: learning rates tried for ``learning_rate``.
    rho_grid: SAM radii tried on the validation split (>= 4 values).
    steps: number of training steps, per size: ``{'quick': .., 'full': ..}``.
    num_data: number of training examples (bSAM's ``num_data``), per size.
    load: ``(size, seed) -> data``; numpy arrays with the train, val and
      test splits; ``seed`` is the run's seed (label noise may depend on
      it; the split and the generator should not).
    init: ``(key, size) -> (params, model_state)``; ``model_state`` is ``()``
      when the model has none (no BatchNorm).
    sample_batch: ``(data, key, size) -> batch``; jit-able, draws a training
      minibatch (with augmentation if the task has it) from ``data``, the
      dict of device arrays ``load`` returned.
    loss: ``(params, *, batch, model_state, key) -> (loss, new_model_state)``;
      ``key`` drives dropout; the mean loss over the batch.
    metric: ``(params, model_state, data, split, size) -> float`` with
      ``split`` in ``('val', 'test')``; evaluation mode (no dropout,
      BatchNorm running statistics).
  """

  name: str
  description: str
  metric_name: str
  higher_is_better: bool
  base: Literal['sgd', 'adamw']
  learning_rate: float
  lr_grid: tuple[float, ...]
  rho_grid: tuple[float, ...]
  steps: Mapping[str, int]
  num_data: Mapping[str, int]
  load: Callable[[Size, int], Mapping[str, Any]]
  init: Callable[[Any, Size], tuple[Any, Any]]
  sample_batch: Callable[[Mapping[str, Any], Any, Size], Any]
  loss: Callable[..., tuple[Any, Any]]
  metric: Callable[[Any, Any, Mapping[str, Any], str, Size], float]
  weight_decay: float = 0.0
  warmup_fraction: float = 0.0
