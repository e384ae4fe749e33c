"""The SFT loss: masked main cross-entropy + head.loss_weight x mean over depths of
the head's cross-entropy on CoT targets, with its metrics.

Sums and counts are kept apart so that gradient accumulation over micro-batches
gives exactly the full batch's gradient: each micro-batch's loss is its sums
divided by the *whole* batch's counts (`Counts`), computed from the masks alone.

The head's (B, T, k, V) logits are never materialised: each depth j is unembedded,
reduced to its loss and metrics, and rematerialised in the backward pass. With
train.vocab_chunks = n > 1 neither are the (B, T, V) logits of the main model or
of one depth: both are reduced over n vocabulary chunks (`chunked_ce`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtcot_jax.config import Config
from mtcot_jax.model import api
from mtcot_jax.sharding import Sharder
from mtcot_jax.train.chunked_ce import VocabStats, chunked_stats, full_stats
from mtcot_jax.train.step import make_train_step


class Counts(NamedTuple):
  main: jax.Array    # () targets with a main loss (CoT + answer)
  head: jax.Array    # (k,) head targets per depth


def head_target_mask(batch, k: int, answer: bool = False) -> jax.Array:
  """(B, T, k): 1 where the chain at source t has a CoT target at depth j, i.e.
  x[t+1+j] = targets[t+j] is a CoT token of the same packed segment (with
  `answer` (head.answer_targets): a CoT or answer token)."""
  cot, seg = batch["cot_mask"], batch["segment_ids"]
  if answer:
    cot = cot + batch["answer_mask"]
  masks = []
  for j in range(1, k + 1):
    shifted = jnp.pad(cot[:, j:], ((0, 0), (0, j)))
    same = jnp.pad(seg[:, j:], ((0, 0), (0, j))) == seg
    masks.append(shifted * same * (seg > 0))
  return jnp.stack(masks, axis=-1)


def shifted_targets(targets_BxT: jax.Array, k: int) -> jax.Array:
  """(B, T, k): the head's target at source t, depth j = targets[t + j] (PAD past the end)."""
  return jnp.stack([jnp.pad(targets_BxT[:, j:], ((0, 0), (0, j))) for j in range(1, k + 1)],
                   axis=-1)


def head_sources(cfg: Config, batch) -> jax.Array | None:
  """(B, P) source positions for the head's chains: those with a depth-1 CoT
  target first, in order (head.train_positions = P; None: every position)."""
  P = cfg.head.train_positions
  T = batch["cot_mask"].shape[1]
  if P == 0 or P >= T:
    return None
  has_target = head_target_mask(batch, 1, cfg.head.answer_targets)[..., 0] > 0
  order = jnp.argsort(~has_target, axis=1, stable=True)
  return order[:, :P].astype(jnp.int32)


def _gather(x_BxTx, pos_BxP):
  return x_BxTx if pos_BxP is None else jnp.take_along_axis(
      x_BxTx, pos_BxP.reshape(pos_BxP.shape + (1,) * (x_BxTx.ndim - 2)), axis=1)


def counts(cfg: Config, batch) -> Counts:
  """The normalisers: main targets, and head targets per depth at the chains run."""
  main = jnp.sum(batch["cot_mask"] + batch["answer_mask"])
  if not cfg.head.k:
    return Counts(main, jnp.zeros(0))
  mask = _gather(head_target_mask(batch, cfg.head.k, cfg.head.answer_targets),
                 head_sources(cfg, batch))
  return Counts(main, jnp.sum(mask, axis=(0, 1)))


def _main_stats(cfg: Config, params, out: api.ForwardOutput, targets_BxT,
                shard: Sharder) -> VocabStats:
  n = cfg.train.vocab_chunks
  if n == 1:
    return full_stats(out.logits, targets_BxT)
  return chunked_stats(api.final_hidden(cfg, params, out.residual), api.unembed_matrix(cfg, params),
                       targets_BxT, n, jnp.dtype(cfg.model.dtype), shard)


def _head_stats(cfg: Config, params, feat_BxPxD, tgt_BxP, shard: Sharder) -> VocabStats:
  n = cfg.train.vocab_chunks
  if n == 1:
    return full_stats(api.head_logits(cfg, params, feat_BxPxD), tgt_BxP)
  return chunked_stats(feat_BxPxD, api.head_unembed(cfg, params), tgt_BxP, n,
                       jnp.dtype(cfg.model.dtype), shard)


def loss_and_metrics(cfg: Config, params, batch, total: Counts,
                     shard: Sharder = Sharder()) -> tuple[jax.Array, dict]:
  """Loss of one (micro-)batch, normalised by the whole batch's `total` counts.

  Returns (loss, sums): `sums` holds metric numerators (summed over micro-batches
  by the caller, then divided by `total`).
  """
  # head.loss_weight=0 (the main model trained alone): the head is not run at all.
  k = cfg.head.k if cfg.head.loss_weight > 0 else 0
  sources = head_sources(cfg, batch) if k else None
  out = api.apply(cfg, params, batch["inputs"], positions=batch["positions"],
                  segment_ids=batch["segment_ids"], head_positions=sources, with_head=k > 0,
                  logits=cfg.train.vocab_chunks == 1, shard=shard)
  mask = batch["cot_mask"] + batch["answer_mask"]
  main = _main_stats(cfg, params, out, batch["targets"], shard)
  main_pred = main.argmax
  sums = {"main_loss": jnp.sum(main.ce * mask),
          "main_acc": jnp.sum((main_pred == batch["targets"]) * mask)}
  loss = sums["main_loss"] / jnp.maximum(total.main, 1.0)
  if k == 0:
    return loss, sums

  head_mask = _gather(head_target_mask(batch, k, cfg.head.answer_targets), sources)  # (B,P,k)
  head_tgt = _gather(shifted_targets(batch["targets"], k), sources)
  # The main model's own greedy token for x[t+1+j] (teacher-forced): acceptance.
  main_next = _gather(shifted_targets(main_pred, k), sources)

  def depth_stats(feat_BxPxD, tgt_BxP, mask_BxP, main_BxP):
    st = _head_stats(cfg, params, feat_BxPxD, tgt_BxP, shard)
    return (jnp.sum(st.ce * mask_BxP), jnp.sum((st.argmax == tgt_BxP) * mask_BxP),
            jnp.sum((st.argmax == main_BxP) * mask_BxP))

  if cfg.train.vocab_chunks == 1:
    # One depth's (B, P, V) logits, recomputed in the backward pass (the chunks'
    # scan is rematerialised already).
    depth_stats = jax.checkpoint(depth_stats)

  head_loss, head_acc, head_accept = [], [], []
  for j in range(k):
    l, a, c = depth_stats(out.head_features[:, :, j], head_tgt[..., j], head_mask[..., j],
                          main_next[..., j])
    head_loss.append(l)
    head_acc.append(a)
    head_accept.append(c)
  sums["head_loss"] = jnp.stack(head_loss)
  sums["head_acc"] = jnp.stack(head_acc)
  sums["head_accept"] = jnp.stack(head_accept)
  per_depth = sums["head_loss"] / jnp.maximum(total.head, 1.0)
  loss = loss + cfg.head.loss_weight * jnp.mean(per_depth)
  return loss, sums


def finalize(sums: dict, total: Counts) -> dict:
  """Metric numerators -> means: main_loss, main_acc, head_loss/acc/accept per depth."""
  m = {"main_loss": sums["main_loss"] / jnp.maximum(total.main, 1.0),
       "main_acc": sums["main_acc"] / jnp.maximum(total.main, 1.0)}
  for name in ("head_loss", "head_acc", "head_accept"):
    if name in sums:
      m[name] = sums[name] / jnp.maximum(total.head, 1.0)
  return m


def make_sft_step(cfg: Config, mesh, optimizer, shardings=None):
  """The jitted SFT step `step(state, batch) -> (state, metrics)` (see make_train_step)."""
  return make_train_step(cfg, mesh, optimizer,
                         lambda p, b, total, shard: loss_and_metrics(cfg, p, b, total, shard),
                         lambda b: counts(cfg, b), finalize, shardings)
