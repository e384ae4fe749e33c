"""GRPO on two-phase rollouts: the main model and the head trained jointly.

A rollout batch holds G samples per prompt from `generate` (with the head
writing k tokens per CoT block). Each generated token's log-probability is
recomputed by teacher forcing *by the module that wrote it* (`source`): main
tokens from the main logits at the previous position, head tokens of depth j
from the head's chain at their block's source position p - j - 1. The loss is
the clipped-ratio objective with group-normalised advantages, minus beta x the
k3 estimate of KL to a frozen reference, averaged over generated tokens; its
gradient reaches the main model through its own tokens and, through the
residual stream r_t, through the head's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtcot_jax import sampling
from mtcot_jax.config import Config
from mtcot_jax.decode import GenerateResult
from mtcot_jax.model import api
from mtcot_jax.sharding import Sharder
from mtcot_jax.train.step import make_train_step


class Rollouts(NamedTuple):
  """Teacher-forcing inputs built from prompts + generations, (B, T) each."""
  tokens: np.ndarray       # int32 prompt then generated tokens, left-aligned, PAD after
  source: np.ndarray       # int32 writer of token t (0 main, j head depth j), -1 if not generated
  old_logprobs: np.ndarray  # float32 the decoder's log-probs (0 where not generated)


def build_rollouts(prompt: np.ndarray, lengths: np.ndarray, res: GenerateResult) -> Rollouts:
  """Prompt (B, P) + generation (B, L) -> (B, P + L) sequences with per-token writers."""
  B, P = prompt.shape
  L = res.tokens.shape[1]
  tokens = np.zeros((B, P + L), np.int32)
  source = np.full((B, P + L), -1, np.int32)
  old = np.zeros((B, P + L), np.float32)
  for b in range(B):
    p, n = int(lengths[b]), int(res.lengths[b])
    tokens[b, :p] = prompt[b, :p]
    tokens[b, p:p + n] = res.tokens[b, :n]
    source[b, p:p + n] = res.source[b, :n]
    old[b, p:p + n] = res.logprobs[b, :n]
  return Rollouts(tokens, source, old)


def token_logits(cfg: Config, params, tokens_BxT, source_BxT, shard: Sharder = Sharder()):
  """(B, T, V) logits of the distribution each token was drawn from, and (B, T, V)
  main logits at the previous position (for acceptance). Position t's entry is
  the prediction *of* token t; t = 0 is never generated."""
  k = cfg.head.k
  out = api.apply(cfg, params, tokens_BxT, with_head=k > 0, shard=shard)
  B, T = tokens_BxT.shape
  prev = jnp.pad(out.logits[:, :-1], ((0, 0), (1, 0), (0, 0)))      # main at t-1 predicts t
  if k == 0:
    return prev, prev
  j = jnp.clip(source_BxT, 1, k)                                    # head depth (where > 0)
  src_pos = jnp.clip(jnp.arange(T)[None, :] - j - 1, 0, T - 1)     # the block's source
  feats = out.head_features[jnp.arange(B)[:, None], src_pos, j - 1]   # (B, T, D)
  head = api.head_logits(cfg, params, feats)
  return jnp.where((source_BxT > 0)[..., None], head, prev), prev


def token_logprobs(cfg: Config, params, tokens_BxT, source_BxT, s: sampling.Sampling,
                   shard: Sharder = Sharder()):
  """Teacher-forced log-probs (B, T) of each token under its writer's sampling distribution."""
  logits, _ = token_logits(cfg, params, tokens_BxT, source_BxT, shard)
  return sampling.logprobs_of(logits, tokens_BxT, s)


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-4) -> np.ndarray:
  """(r - group mean) / (group std (ddof=1) + eps); rollouts of a prompt are adjacent."""
  r = rewards.reshape(-1, group_size)
  adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)
  return adv.reshape(-1).astype(np.float32)


class Totals(NamedTuple):
  tokens: jax.Array        # () generated tokens in the batch
  head_tokens: jax.Array   # (k,) generated tokens per head depth


def counts(cfg: Config, batch) -> Totals:
  gen = batch["source"] >= 0
  depths = jnp.arange(1, cfg.head.k + 1)
  per_depth = jnp.sum(batch["source"][..., None] == depths, axis=(0, 1))
  return Totals(jnp.sum(gen), per_depth)


def grpo_loss(cfg: Config, params, batch, total: Totals, s: sampling.Sampling,
              shard: Sharder = Sharder()):
  """Token-averaged GRPO loss of a (micro-)batch; returns (loss, metric sums).

  batch: tokens, source (B, T) int32; old_logprobs, ref_logprobs (B, T) float32;
  advantages (B,) float32.
  """
  r = cfg.rl
  logits, prev = token_logits(cfg, params, batch["tokens"], batch["source"], shard)
  lp = sampling.logprobs_of(logits, batch["tokens"], s)
  mask = (batch["source"] >= 0).astype(jnp.float32)
  ratio = jnp.exp(lp - batch["old_logprobs"])
  adv = batch["advantages"][:, None]
  clipped = jnp.clip(ratio, 1 - r.epsilon, 1 + r.epsilon)
  objective = jnp.minimum(ratio * adv, clipped * adv)
  d = batch["ref_logprobs"] - lp
  kl = jnp.exp(d) - d - 1.0                                             # k3 estimator
  n = jnp.maximum(total.tokens, 1)
  loss = jnp.sum((-objective + r.beta * kl) * mask) / n
  main_greedy = jnp.argmax(prev, axis=-1)
  depths = jnp.arange(1, cfg.head.k + 1)
  per_depth = batch["source"][..., None] == depths
  accept = (main_greedy == batch["tokens"])[..., None] & per_depth
  sums = {"kl": jnp.sum(kl * mask), "ratio": jnp.sum(ratio * mask),
          "clip_frac": jnp.sum((jnp.abs(ratio - 1) > r.epsilon) * mask),
          "head_accept": jnp.sum(accept, axis=(0, 1)).astype(jnp.float32)}
  return loss, sums


def finalize(sums, total: Totals) -> dict:
  n = jnp.maximum(total.tokens, 1)
  return {"kl": sums["kl"] / n, "ratio": sums["ratio"] / n, "clip_frac": sums["clip_frac"] / n,
          "head_accept": sums["head_accept"] / jnp.maximum(total.head_tokens, 1)}


def make_grpo_step(cfg: Config, mesh, optimizer, s: sampling.Sampling, shardings=None):
  """The jitted GRPO step `step(state, batch) -> (state, metrics)` (see make_train_step)."""
  return make_train_step(cfg, mesh, optimizer,
                         lambda p, b, total, shard: grpo_loss(cfg, p, b, total, s, shard),
                         lambda b: counts(cfg, b), finalize, shardings)
