"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping, a
weight-decay mask, per-module learning-rate multipliers and frozen modules."""

from __future__ import annotations

import jax
import optax

from mtcot_jax.config import Config


def schedule(cfg: Config) -> optax.Schedule:
  """The learning rate at each optimizer update. RL takes rl.updates_per_batch
  updates per step, so its warmup and decay span steps x updates_per_batch
  updates (train.steps and train.warmup_steps still count steps)."""
  t = cfg.train
  per = cfg.rl.updates_per_batch if t.stage == "rl" else 1
  warmup = min(t.warmup_steps, max(t.steps - 1, 0)) * per
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
      decay_steps=max(t.steps * per, warmup + 1), end_value=t.learning_rate * t.min_lr_ratio)


def module_labels(params, frozen: tuple[str, ...] = ()):
  """'main' / 'head' per leaf, or 'frozen' for the modules in `frozen`."""
  return {part: jax.tree.map(lambda _, p=part: "frozen" if p in frozen else p, sub)
          for part, sub in params.items()}


def decay_mask(params):
  """Weight decay on matrices only (not on norm scales); a leading stacked-layers
  axis (model.scan_layers) does not count."""
  def is_matrix(path, x):
    stacked = any(getattr(k, "key", None) == "layers" for k in path)
    return x.ndim - int(stacked) >= 2
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: Config, frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """Gradients of frozen modules are zeroed before clipping (they do not count in
  the global norm) and their updates are zero (no weight decay either)."""
  t = cfg.train
  sched = schedule(cfg)

  def adamw(mult: float):
    return optax.adamw(lambda step: sched(step) * mult, b1=t.b1, b2=t.b2,
                       weight_decay=t.weight_decay, mask=decay_mask)

  labels = lambda params: module_labels(params, frozen)  # noqa: E731
  keep = {"main": optax.identity(), "head": optax.identity(), "frozen": optax.set_to_zero()}
  return optax.chain(
      optax.multi_transform(keep, labels),
      optax.clip_by_global_norm(t.grad_clip),
      optax.multi_transform({"main": adamw(t.lr_mult_main), "head": adamw(t.lr_mult_head),
                             "frozen": optax.set_to_zero()}, labels),
  )
