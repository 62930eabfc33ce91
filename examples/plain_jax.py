"""SAM and ASAM on a plain-JAX MLP, with a schedule for rho and diagnostics.

Trains a small multi-layer perceptron written with nothing but ``jax.numpy``
on MNIST-1D (generated locally by the ``mnist1d`` package, no download), with
some of the training labels flipped at random, and compares plain SGD with
``sam_optax.sam`` and ``sam_optax.asam`` in front of the same SGD-with-momentum
optimizer. ``rho`` ramps up linearly from 0 over the first ``--rho-warmup``
steps (an optax schedule, evaluated on the transformation's own step count).

During training the example reads the diagnostics that every sharpness-aware
transformation keeps in its state -- the perturbed loss L(w + eps), the clean
gradient norm ||g0|| and the cosine between g0 and the gradient handed on --
with ``optax.tree.get(opt_state, 'perturbed_loss')``.

Run::

  python examples/plain_jax.py                       # SGD, SAM, ASAM
  python examples/plain_jax.py --methods sam --sam-rho 0.01,0.05,0.1,0.2
  python examples/plain_jax.py --quick               # a few seconds

``--sam-rho`` and ``--asam-rho`` take comma-separated lists: each value is
its own run, so one command is a small rho sweep.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import sam_optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mnist1d_common  # noqa: E402  (MNIST-1D, generated locally)

PROBE_RHO = 0.05  # radius of the sharpness figure reported for every run


# ----------------------------------------------------------------- data ----
def load_mnist1d(num_samples: int, label_noise: float, seed: int):
  """MNIST-1D generated locally; a fraction of the training labels resampled.

  Each training label is, with probability ``label_noise``, replaced by a
  class drawn uniformly from all ten (so about 10% of those keep their class).
  """
  data = mnist1d_common.load_data(num_samples, data_seed=seed)
  y_train = data['y']
  rng = np.random.default_rng(seed)
  flip = rng.random(len(y_train)) < label_noise
  y_train = np.where(flip, rng.integers(0, 10, len(y_train)), y_train)
  return (
      (data['x'], y_train.astype(np.int32)),
      (data['x_test'], data['y_test']),
  )


# ---------------------------------------------------------------- model ----
def init_mlp(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, Any]]:
  """He-initialised dense layers: a list of {'w', 'b'} dicts."""
  params = []
  for layer_key, fan_in, fan_out in zip(
      jax.random.split(key, len(sizes) - 1), sizes[:-1], sizes[1:]
  ):
    w = jax.random.normal(layer_key, (fan_in, fan_out)) * jnp.sqrt(
        2.0 / fan_in)
    params.append({'w': w, 'b': jnp.zeros(fan_out)})
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'])
  return x @ params[-1]['w'] + params[-1]['b']


def loss_fn(params, x, y):
  """Mean softmax cross-entropy; ``x`` and ``y`` come as keyword arguments."""
  logits = mlp(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(mlp(params, x), -1) == y)


@jax.jit
def sharpness(params, x, y):
  """L(w + eps) - L(w) at eps = PROBE_RHO g / ||g||, written out by hand."""
  loss, grad = jax.value_and_grad(loss_fn)(params, x, y)
  norm = optax.tree.norm(grad)
  eps = jax.tree.map(lambda g: PROBE_RHO * g / jnp.maximum(norm, 1e-12), grad)
  return loss_fn(optax.apply_updates(params, eps), x, y) - loss


# ------------------------------------------------------------- training ----
def make_optimizer(method: str, rho: float, args) -> optax.GradientTransformation:
  """SGD with momentum, behind sam / asam; rho warms up linearly from 0."""
  base = optax.sgd(args.lr, momentum=0.9)
  if method == 'sgd':
    return base
  if args.rho_warmup > 0:
    rho_schedule = optax.linear_schedule(0.0, rho, args.rho_warmup)
  else:
    rho_schedule = rho
  if method == 'sam':
    front = sam_optax.sam(loss_fn, rho=rho_schedule,
                          ascent_steps=args.ascent_steps, track_cosine=True)
  elif method == 'asam':
    front = sam_optax.asam(loss_fn, rho=rho_schedule, eta=args.eta,
                           ascent_steps=args.ascent_steps, track_cosine=True)
  else:
    raise ValueError(f'unknown method {method!r}; use sgd, sam or asam.')
  return optax.chain(front, base)


def diagnostics(opt_state) -> dict[str, jax.Array]:
  """The diagnostics of the sharpness-aware transformation in a chain.

  ``optax.tree.get`` finds a field by name anywhere in the (chained) state;
  ``opt_state[0].perturbed_loss`` would do the same here.
  """
  return {
      name: optax.tree.get(opt_state, name)
      for name in ('perturbed_loss', 'grad_norm', 'cosine')
  }


def train(method: str, rho: float, seed: int, data, args) -> dict[str, Any]:
  """One run; returns the figures and the per-step diagnostics."""
  (x_train, y_train), (x_test, y_test) = data
  key = jax.random.key(seed)
  params = init_mlp(key, [x_train.shape[1], args.hidden, args.hidden, 10])
  tx = make_optimizer(method, rho, args)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    # x and y are forwarded to loss_fn for the perturbed pass.
    updates, opt_state = tx.update(grads, opt_state, params, x=x, y=y)
    return optax.apply_updates(params, updates), opt_state, loss

  steps_per_epoch = len(x_train) // args.batch_size
  total = args.epochs * steps_per_epoch
  history = {'loss': [], 'perturbed_loss': [], 'grad_norm': [], 'cosine': []}
  rng = np.random.default_rng(seed)
  label = method if method == 'sgd' else f'{method} rho={rho:g}'
  start = None
  with tqdm.tqdm(total=total, desc=f'{label} seed={seed}', disable=args.no_progress) as bar:
    for _ in range(args.epochs):
      order = rng.permutation(len(x_train))
      for i in range(steps_per_epoch):
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        params, opt_state, loss = train_step(
            params, opt_state, x_train[idx], y_train[idx]
        )
        if start is None:  # do not count the compile
          jax.block_until_ready(loss)
          start = time.perf_counter()
        history['loss'].append(loss)
        if method != 'sgd':
          for name, value in diagnostics(opt_state).items():
            history[name].append(value)
        bar.update()
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  history = {k: np.asarray(v) for k, v in history.items()}
  return {
      'label': label,
      'method': method,
      'rho': 0.0 if method == 'sgd' else rho,
      'seed': seed,
      'test_acc': float(accuracy(params, x_test, y_test)),
      'train_loss': float(loss_fn(params, x_train, y_train)),
      'sharpness': float(sharpness(params, x_train, y_train)),
      'ms_per_step': 1e3 * seconds / max(total - 1, 1),
      'history': history,
      'params': params,
  }


def parse_floats(text: str) -> list[float]:
  values = [float(v) for v in text.split(',') if v.strip()]
  if not values or any(v < 0 for v in values):
    raise argparse.ArgumentTypeError(
        f'expected comma-separated numbers >= 0, got {text!r}'
    )
  return values


def parse_args(argv: Optional[Sequence[str]]):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--methods', default='sgd,sam,asam',
                      help='comma-separated subset of sgd,sam,asam')
  parser.add_argument('--sam-rho', type=parse_floats, default=[0.05],
                      help='rho of sam; a comma-separated list is a sweep')
  parser.add_argument('--asam-rho', type=parse_floats, default=[0.5],
                      help='rho of asam; a comma-separated list is a sweep')
  parser.add_argument('--rho-warmup', type=int, default=100,
                      help='steps over which rho ramps linearly up from 0 '
                      '(0: no warm-up)')
  parser.add_argument('--ascent-steps', type=int, default=1,
                      help='ascent steps k of sam and asam')
  parser.add_argument('--eta', type=float, default=0.01,
                      help='offset eta of asam')
  parser.add_argument('--epochs', type=int, default=30)
  parser.add_argument('--batch-size', type=int, default=100)
  parser.add_argument('--hidden', type=int, default=128)
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--num-samples', type=int, default=5000,
                      help='MNIST-1D examples in all (80%% train, 20%% test)')
  parser.add_argument('--label-noise', type=float, default=0.2,
                      help='fraction of training labels replaced at random')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the data set and its label noise')
  parser.add_argument('--seeds', default='0',
                      help='comma-separated seeds of initialisation and batch '
                      'order; the table shows the mean (and spread) over them')
  parser.add_argument('--plot', default=None,
                      help='write a PNG of the diagnostics to this path')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny run that takes a few seconds')
  args = parser.parse_args(argv)
  if args.quick:
    args.epochs, args.num_samples, args.hidden = 2, 500, 32
    args.batch_size, args.rho_warmup = 50, 4
  try:
    args.seeds = [int(v) for v in args.seeds.split(',') if v.strip()]
  except ValueError:
    parser.error(f'--seeds: expected comma-separated integers, got {args.seeds!r}')
  if not args.seeds:
    parser.error('--seeds: give at least one seed.')
  methods = [m.strip() for m in args.methods.split(',') if m.strip()]
  for m in methods:
    if m not in ('sgd', 'sam', 'asam'):
      parser.error(f'--methods: unknown method {m!r}; use sgd, sam, asam.')
  args.methods = methods
  return args


def plot(results, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
  for r in results:
    h = r['history']
    if r['method'] == 'sgd' or r['seed'] != results[0]['seed']:
      continue
    axes[0].plot(h['perturbed_loss'] - h['loss'], label=r['label'], lw=0.8)
    axes[1].plot(h['grad_norm'], label=r['label'], lw=0.8)
    axes[2].plot(h['cosine'], label=r['label'], lw=0.8)
  for ax, title in zip(axes, ('L(w + eps) - L(w)', '||g0||', 'cos(g0, g)')):
    ax.set_title(title)
    ax.set_xlabel('step')
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'wrote {path}')


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  data = load_mnist1d(args.num_samples, args.label_noise, args.seed)
  runs = []
  for method in args.methods:
    rhos = {'sgd': [0.0], 'sam': args.sam_rho, 'asam': args.asam_rho}[method]
    runs += [(method, rho) for rho in rhos]
  results = [
      train(method, rho, seed, data, args)
      for method, rho in runs
      for seed in args.seeds
  ]

  print(f'\nMNIST-1D, {len(data[0][0])} train examples, label noise '
        f'{args.label_noise:g}, {args.epochs} epochs, data seed {args.seed}, '
        f'seeds {",".join(map(str, args.seeds))}')
  header = (f'{"run":<15} {"test acc":>13} {"train loss":>13} '
            f'{"sharpness":>15} {"cos(g0,g)":>9} {"ms/step":>7}')
  print(header)
  print('-' * len(header))
  spread = len(args.seeds) > 1

  def cell(values, width, digits):
    mean = f'{np.mean(values):.{digits}f}'
    if spread:
      mean += f' ±{np.std(values):.{digits}f}'
    return f'{mean:>{width}}'

  for label in dict.fromkeys(r['label'] for r in results):
    rs = [r for r in results if r['label'] == label]
    cosines = [r['history']['cosine'][-50:].mean() for r in rs
               if len(r['history']['cosine'])]
    cos = f'{np.mean(cosines):9.3f}' if cosines else f'{"-":>9}'
    print(f'{label:<15} {cell([r["test_acc"] for r in rs], 13, 3)} '
          f'{cell([r["train_loss"] for r in rs], 13, 3)} '
          f'{cell([r["sharpness"] for r in rs], 15, 4)} {cos} '
          f'{np.median([r["ms_per_step"] for r in rs]):7.2f}')
  print(f'sharpness: L(w + eps) - L(w) on the training set at the end, '
        f'eps = {PROBE_RHO} g/||g||; cos: mean over the last 50 steps'
        + ('; mean ±std over seeds.' if spread else '.'))
  if args.plot:
    plot(results, args.plot)
  return results


if __name__ == '__main__':
  main()
