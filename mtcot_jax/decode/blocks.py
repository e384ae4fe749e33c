"""How a block is drafted, cut and accepted: small pure functions the loop steps share."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mtcot_jax import sampling
from mtcot_jax.decode import markers as markers_
from mtcot_jax.model import api
from mtcot_jax.model.heads import Projection


def sample_head_chain(head: Projection, params, head_state, sources, x1_B, keys,
                      s: sampling.Sampling, lengths_B, with_dists: bool = False, *,
                      go_B=None, stop_ids: tuple[int, ...] = (), tau: float = 0.0,
                      markers: markers_.Markers = (), tail_BxM=None):
  """The head's k = len(keys) chained samples x[t+2..t+k+1] after the main token x1.

  sources: the head's source residuals (B, D) at t = lengths_B - 1; head_state:
  the head's decode state (`heads.py`). Depth j+1 runs one chain element (token
  x[t+1+j]) through the head, which reads the earlier ones from the chain's own
  KV cache. Work follows what can be kept: the chain stops once no row needs
  another draft, a row needing none after its first stop token (`stop_ids`),
  after the last token of an answer marker (`markers`, begun in the row's
  committed `tail_BxM` (B, M-1), in x1 or in the drafts), after a head token of
  probability below `tau` (adaptive blocks), or at all where not `go_B`. Depths
  not drafted hold token 0 and log-prob -inf (the block is cut before them).
  Returns (B, k) tokens and log-probs; with `with_dists` also the (B, k, V)
  log-probabilities of the distributions they were drawn from (q, for
  verifying; 0 where not drafted).
  """
  B, k, V = x1_B.shape[0], len(keys), head.cfg.model.vocab_size
  go_B = jnp.ones((B,), bool) if go_B is None else go_B
  stops = lambda tok: functools.reduce(  # noqa: E731
      jnp.logical_or, [tok == i for i in stop_ids], jnp.zeros(tok.shape, bool))

  draft = params.get("draft")   # api.with_draft_vocab
  # The row's last M committed-or-drafted tokens, to see a marker end (M = 0: none).
  window = (jnp.concatenate([tail_BxM, x1_B[:, None]], 1) if markers
            else jnp.zeros((B, 0), jnp.int32))

  def ends(tok, window):
    return stops(tok) | (markers_.ends_with_marker(window, markers) if markers else False)

  def body(c):
    j, tok, go, window, chain, toks, lps, dists = c
    feats_BxD, chain = head.chain_step(params, head_state, chain, tok, j)
    logits_BxV = api.head_logits(head.cfg, params, feats_BxD)   # (B, N): a draft vocabulary
    tok, lp = sampling.sample(keys[j], logits_BxV, s)
    if with_dists:
      q = sampling.process_logits(logits_BxV, s)
      if draft is not None:   # q over the whole vocabulary: 0 outside the draft's
        q = jnp.full((B, V), -jnp.inf, q.dtype).at[:, draft["ids"]].set(q)
      dists = dists.at[:, j].set(q)
    if draft is not None:
      tok = draft["ids"][tok]
    window = jnp.concatenate([window[:, 1:], tok[:, None]], 1) if markers else window
    go = go & ~ends(tok, window) & ((lp >= np.log(tau)) if tau > 0 else True)
    return j + 1, tok, go, window, chain, toks.at[:, j].set(tok), lps.at[:, j].set(lp), dists

  init = (0, x1_B, go_B & ~ends(x1_B, window), window,
          head.chain_start(params, head_state, sources, lengths_B, k),
          jnp.zeros((B, k), jnp.int32), jnp.full((B, k), -jnp.inf, jnp.float32),
          jnp.zeros((B, k, V) if with_dists else (), jnp.float32))
  _, _, _, _, _, toks, lps, dists = jax.lax.while_loop(
      lambda c: (c[0] < k) & jnp.any(c[2]), body, init)
  return (toks, lps, dists) if with_dists else (toks, lps)


def adaptive_keep(lps_BxT, force_B, tau: float):
  """Adaptive blocks: the main token and the head tokens while their probability
  is >= tau (the whole block where tau = 0 or the CoT is being closed by force)."""
  B, T = lps_BxT.shape
  if T == 1 or tau <= 0:
    return jnp.full((B,), T, jnp.int32)
  sure = jnp.cumprod((lps_BxT[:, 1:] >= np.log(tau)).astype(jnp.int32), axis=1)
  return jnp.where(force_B, T, 1 + jnp.sum(sure, axis=1)).astype(jnp.int32)


def cut_block(block_BxT, keep_B, limit_B, active_B, stop_ids: tuple[int, ...],
              stop_upto_B, stop_at_BxT=None):
  """How many tokens of a block are committed: through the first stop (a token
  of `stop_ids`, or a position where `stop_at_BxT` holds: an answer marker's
  last token) among the first `keep` tokens at a position <= stop_upto,
  else min(keep, limit); at least 1 for an active row and 0 for another.
  The CoT passes stop_upto = limit = its thinking budget (a marker's last token
  just after the budget's last token is allowed), the answer stop_upto = limit - 1
  (an EOS is one of the answer's tokens). Returns (n_valid, ended: a stop token was
  committed, the token at the first stop)."""
  pos = jnp.arange(block_BxT.shape[1])[None, :]
  at = jnp.zeros(block_BxT.shape, bool) if stop_at_BxT is None else stop_at_BxT
  stop = functools.reduce(jnp.logical_or, [block_BxT == i for i in stop_ids], at)
  stop = stop & (pos <= stop_upto_B[:, None]) & (pos < keep_B[:, None])
  has_stop = jnp.any(stop, axis=1)
  first = jnp.argmax(stop, axis=1)
  n_valid = jnp.where(has_stop, first + 1, jnp.minimum(keep_B, limit_B))
  n_valid = jnp.where(active_B, jnp.maximum(n_valid, 1), 0).astype(jnp.int32)
  stop_tok = jnp.take_along_axis(block_BxT, first[:, None], 1)[:, 0]
  return n_valid, active_B & has_stop, stop_tok


def speculative_accept(key, p_logp_BxKxV, q_logp_BxKxV, drafts_BxK, greedy):
  """Verification of k drafts d_1..d_k against the main model.

  p_logp[:, j-1] is the main model's (sampling) log-distribution at draft d_j's
  position, q_logp[:, j-1] the head's that d_j was drawn from. Greedy: d_j is
  kept while it is argmax p. Sampling: kept with probability min(1, p(d_j)/q(d_j)),
  and after the first rejection (at draft a+1) the replacement is drawn from
  normalise(max(0, p - q)) there, which makes the kept-then-replaced sequence
  p-distributed (Leviathan et al. 2023; Chen et al. 2023). `greedy` is a Python
  bool (one rule compiled) or a traced bool (`sampling.greedy_now` of traced
  settings: both rules computed, the one it names taken).
  Returns (kept drafts a (B,) int32, replacement token (B,) int32: meaningful
  only where a < k, and for greedy the argmax of p at draft a+1).
  """
  B, k, _ = p_logp_BxKxV.shape
  k_accept, k_resid = jax.random.split(key)
  d = drafts_BxK[..., None]
  fixed = not isinstance(greedy, jax.Array)
  ok_greedy = drafts_BxK == jnp.argmax(p_logp_BxKxV, axis=-1)
  if fixed and greedy:                         # q_logp is not read (may be None)
    ok = ok_greedy
  else:
    p_d = jnp.take_along_axis(p_logp_BxKxV, d, axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q_logp_BxKxV, d, axis=-1)[..., 0]
    u = jax.random.uniform(k_accept, (B, k), minval=jnp.finfo(jnp.float32).tiny)
    ok = jnp.log(u) < p_d - q_d
    ok = ok if fixed else jnp.where(greedy, ok_greedy, ok)
  a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
  at = jnp.minimum(a, k - 1)[:, None, None]
  p_a = jnp.take_along_axis(p_logp_BxKxV, at, axis=1)[:, 0]          # (B, V)
  argmax_a = jnp.argmax(p_a, axis=-1).astype(jnp.int32)
  if fixed and greedy:
    return a, argmax_a
  q_a = jnp.take_along_axis(q_logp_BxKxV, at, axis=1)[:, 0]
  resid = jnp.maximum(jnp.exp(p_a) - jnp.exp(q_a), 0.0)
  # p == q leaves no residual mass; a rejection is then impossible, but guard it.
  resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, jnp.exp(p_a))
  logr = jnp.where(resid > 0, jnp.log(jnp.maximum(resid, 1e-38)), sampling.NEG_INF)
  tok = jax.random.categorical(k_resid, logr, axis=-1).astype(jnp.int32)
  return a, (tok if fixed else jnp.where(greedy, argmax_a, tok))
