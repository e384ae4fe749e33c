"""Two-phase decoding: the k-token CoT loop, then the filtered one-token answer loop.

Prefill (1 main pass) fills the KV cache and gives h, the main model's logits and
head sources at each prompt's last position. Then:

CoT loop (one `lax.while_loop` iteration = one main forward pass):
  1. x[t+1] ~ main(h);  2. x[t+2..t+k+1] ~ head chain from h's sources;
  3. cut the block after the first `</think>` (or EOS, which ends the sequence),
     and at the CoT budget; 4. one main pass appends the block and gives the new h.
  A sequence whose CoT has ended waits, masked. One that spends
  `max_cot_tokens` without `</think>` gets `</think>` as a one-token block from
  the main model (budget forcing).
Answer loop (one main pass per token, the head not run) until EOS or
`max_answer_tokens`.

Verified phases (`verify`: "answer" verifies the answer phase, "all" the CoT too):
an iteration samples the main model's token x1 from h, lets the head draft k
tokens after it, and runs one main pass over the block [x1, d1..dk]. That pass
gives the main model's distribution p_j at every block position: draft d_j is
kept while d_j == argmax p_{j-1} (greedy), or with probability
min(1, p_{j-1}(d_j) / q_j(d_j)) when sampling (q_j: the head's distribution);
after the first rejected draft the next iteration's x1 is drawn from
normalise(max(0, p - q)) at that position, else from p after the last kept
token. The committed tokens are x1 and the kept drafts (cut at a stop token and
at the length limits as in the other loops); the cache's length moves past them
only, so the rejected positions are overwritten by the next block. The output
is k=0's, token for token (greedy), or has k=0's distribution (sampling).

forward_passes = 1 + CoT blocks + (answer length - 1), per sequence (an EOS
that ends a sequence is never fed back, in either phase). In a verified phase
every iteration costs one pass except one whose own token x1 ends the sequence
(an EOS, or the answer's last allowed token): the pass that checks the drafts is
counted even where it only verified them.
Both loops compile once per (batch, prompt length, limits, k, sampling settings, verify).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mtcot_jax import native, sampling
from mtcot_jax import sharding as shd
from mtcot_jax.config import Config
from mtcot_jax.model import api
from mtcot_jax.model.transformer import KVCache

PAD_ID, EOS_ID, THINK_END_ID = 0, 2, 5  # the ids mtcot_jax's tokenizers use
VERIFY = ("none", "answer", "all")


class GenerateResult(NamedTuple):
  """Per sequence, the generated tokens after the prompt (padded to L)."""
  tokens: jax.Array          # (B, L) int32, PAD past `lengths`
  source: jax.Array          # (B, L) 0 main model, j head depth j, -1 padding
  phase: jax.Array           # (B, L) 0 CoT (incl. </think>), 1 answer, -1 padding
  logprobs: jax.Array        # (B, L) log-prob under the distribution sampled from
  #                            (in a verified phase: the main model's, whoever drafted it)
  lengths: jax.Array         # (B,) generated tokens
  forward_passes: jax.Array  # (B,) main-model calls, prefill included
  finished: jax.Array        # (B,) ended with EOS (False: a length limit was hit)
  cot_forced: jax.Array      # (B,) the CoT hit max_cot_tokens and was closed by force
  accepted: jax.Array        # (B,) head drafts kept by verification (0 where verify="none")


@flax.struct.dataclass
class _State:
  cache: KVCache
  logits: jax.Array       # (B, V) main logits at the last processed position (h)
  sources: tuple          # (B, D) head sources at that position
  tokens: jax.Array       # (B, L) output buffers
  source: jax.Array
  phase: jax.Array
  logprobs: jax.Array
  n_out: jax.Array        # (B,) tokens written
  n_think: jax.Array      # (B,) CoT tokens before </think>
  cot_done: jax.Array     # (B,) bool
  done: jax.Array         # (B,) bool: EOS written
  passes: jax.Array       # (B,) main forward passes
  forced: jax.Array       # (B,) bool
  last: jax.Array         # (B,) the last answer token (the answer loop's next input)
  key: jax.Array
  pend: jax.Array         # (B,) verified phases: the next x1, drawn from the residual
  #                         after a rejected draft; -1: draw it from `logits`
  accepted: jax.Array     # (B,) drafts kept by verification
  hmem: tuple | None = None  # head with context: per layer (keys, values) (B, S, H, Dh)


def sample_head_chain(cfg: Config, params, sources, x1_B, keys, s: sampling.Sampling,
                      shard: shd.Sharder = shd.Sharder(), hmem=None, lengths_B=None,
                      with_dists: bool = False):
  """The head's k = len(keys) chained samples x[t+2..t+k+1] after the main token x1.

  sources: the head's source residuals (B, D) at t. Depth j runs the head over
  the chain prefix x[t+1..t+j] it reads. The head with context also reads its
  memory cache `hmem` (per layer keys, values) up to t = lengths_B - 1.
  Returns (B, k) tokens and log-probs; with `with_dists` also the (B, k, V)
  log-probabilities of the distributions they were drawn from (q, for verifying).
  """
  k = len(keys)
  chain = jnp.zeros((x1_B.shape[0], k), jnp.int32).at[:, 0].set(x1_B)
  toks, lps, dists = [], [], []
  for j in range(k):   # depth j+1 predicts x[t+2+j] from chain x[t+1..t+1+j]
    if cfg.head.context:
      feats_BxJxD = api.context_chain(cfg, params, sources, chain[:, : j + 1], hmem, lengths_B)
    else:
      feats_BxJxD = api.run_head(cfg, params, sources, chain[:, : j + 1], shard)
    logits_BxV = api.head_logits(cfg, params, feats_BxJxD[:, j])
    tok, lp = sampling.sample(keys[j], logits_BxV, s)
    if j + 1 < k:
      chain = chain.at[:, j + 1].set(tok)
    toks.append(tok)
    lps.append(lp)
    if with_dists:
      dists.append(sampling.process_logits(logits_BxV, s))
  out = jnp.stack(toks, 1), jnp.stack(lps, 1)
  return out + (jnp.stack(dists, 1),) if with_dists else out


def speculative_accept(key, p_logp_BxKxV, q_logp_BxKxV, drafts_BxK, greedy: bool):
  """Verification of k drafts d_1..d_k against the main model.

  p_logp[:, j-1] is the main model's (sampling) log-distribution at draft d_j's
  position, q_logp[:, j-1] the head's that d_j was drawn from. Greedy: d_j is
  kept while it is argmax p. Sampling: kept with probability min(1, p(d_j)/q(d_j)),
  and after the first rejection (at draft a+1) the replacement is drawn from
  normalise(max(0, p - q)) there, which makes the kept-then-replaced sequence
  p-distributed (Leviathan et al. 2023; Chen et al. 2023).
  Returns (kept drafts a (B,) int32, replacement token (B,) int32: meaningful
  only where a < k, and for greedy the argmax of p at draft a+1).
  """
  B, k, _ = p_logp_BxKxV.shape
  k_accept, k_resid = jax.random.split(key)
  d = drafts_BxK[..., None]
  if greedy:                                   # q_logp is not read (may be None)
    ok = drafts_BxK == jnp.argmax(p_logp_BxKxV, axis=-1)
  else:
    p_d = jnp.take_along_axis(p_logp_BxKxV, d, axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q_logp_BxKxV, d, axis=-1)[..., 0]
    u = jax.random.uniform(k_accept, (B, k), minval=jnp.finfo(jnp.float32).tiny)
    ok = jnp.log(u) < p_d - q_d
  a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
  at = jnp.minimum(a, k - 1)[:, None, None]
  p_a = jnp.take_along_axis(p_logp_BxKxV, at, axis=1)[:, 0]          # (B, V)
  if greedy:
    return a, jnp.argmax(p_a, axis=-1).astype(jnp.int32)
  q_a = jnp.take_along_axis(q_logp_BxKxV, at, axis=1)[:, 0]
  resid = jnp.maximum(jnp.exp(p_a) - jnp.exp(q_a), 0.0)
  # p == q leaves no residual mass; a rejection is then impossible, but guard it.
  resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, jnp.exp(p_a))
  logr = jnp.where(resid > 0, jnp.log(jnp.maximum(resid, 1e-38)), sampling.NEG_INF)
  return a, jax.random.categorical(k_resid, logr, axis=-1).astype(jnp.int32)


def cut_block(block_BxT, keep_B, limit_B, active_B, stop_ids: tuple[int, ...],
              stop_upto_B):
  """How many tokens of a block are committed: through the first stop token
  (one of `stop_ids`) among the first `keep` tokens at a position <= stop_upto,
  else min(keep, limit); at least 1 for an active row and 0 for another.
  The CoT passes stop_upto = limit = its thinking budget (a `</think>` after the
  budget's last token is allowed), the answer stop_upto = limit - 1 (an EOS is
  one of the answer's tokens). Returns (n_valid, ended: a stop token was
  committed, the stop token)."""
  pos = jnp.arange(block_BxT.shape[1])[None, :]
  stop = functools.reduce(jnp.logical_or, [block_BxT == i for i in stop_ids])
  stop = stop & (pos <= stop_upto_B[:, None]) & (pos < keep_B[:, None])
  has_stop = jnp.any(stop, axis=1)
  first = jnp.argmax(stop, axis=1)
  n_valid = jnp.where(has_stop, first + 1, jnp.minimum(keep_B, limit_B))
  n_valid = jnp.where(active_B, jnp.maximum(n_valid, 1), 0).astype(jnp.int32)
  stop_tok = jnp.take_along_axis(block_BxT, first[:, None], 1)[:, 0]
  return n_valid, active_B & has_stop, stop_tok


@flax.struct.dataclass
class DecodeParams:
  """Parameters as the decode loops read them (`prepare_params`): matrices in
  decode.weights_dtype and the main blocks' in `layout` ("in_out" as stored, or
  "out_in": `api.to_out_in`). Pass to `generate` in place of the parameters to
  make this copy once for many calls."""
  params: dict
  layout: str = flax.struct.field(pytree_node=False, default="in_out")
  weights_dtype: str = flax.struct.field(pytree_node=False, default="float32")


@functools.lru_cache(maxsize=None)
def _prepare_fn(layout: str, weights_dtype: str, param_dtype: str, plain: bool):
  wdt = jnp.dtype(weights_dtype)

  @jax.jit
  def prepare(params):
    if wdt != jnp.dtype(param_dtype):   # norm scales and biases kept
      params = jax.tree.map(lambda w: w.astype(wdt) if w.ndim >= 2 else w, params)
    if plain and "layers" in params["main"]:   # the native kernel reads layer_{i}
      params = api.to_plain_layout(params)
    return api.to_out_in(params) if layout == "out_in" else params
  return prepare


def prepare_params(cfg: Config, params) -> DecodeParams:
  """The weights as the decode loops read them: decode.weights_dtype (every
  matrix cast; the layers still compute in model.dtype) and
  decode.weights_layout. A copy of the matrices where either differs from the
  stored parameters (~12 ms for 95 MB on a 2-core CPU); `generate` makes it per
  call unless given the result. Sharded parameters stay sharded (by propagation).
  Given a `DecodeParams`, returns it if it was prepared for this config."""
  if isinstance(params, DecodeParams):
    if (params.weights_dtype, params.layout) != (cfg.decode.weights_dtype,
                                                 cfg.decode.weights_layout):
      raise ValueError(
          f"params were prepared for weights_dtype={params.weights_dtype}, layout="
          f"{params.layout}; the config asks decode.weights_dtype={cfg.decode.weights_dtype}, "
          f"decode.weights_layout={cfg.decode.weights_layout}. Accepted: prepare_params with "
          "this config, or the parameters themselves")
    return params
  layout, wdt = cfg.decode.weights_layout, cfg.decode.weights_dtype   # validated by Config
  if layout == "in_out" and jnp.dtype(wdt) == jnp.dtype(cfg.model.param_dtype):
    return DecodeParams(params, layout, wdt)
  plain = cfg.decode.cpu_kernel == "native"
  return DecodeParams(_prepare_fn(layout, wdt, cfg.model.param_dtype, plain)(params), layout, wdt)


@functools.lru_cache(maxsize=None)
def _static(cfg: Config, k: int, sample: sampling.Sampling, max_cot: int, max_answer: int,
            eos_id: int, think_end_id: int, mesh: Mesh | None, tau: float = 0.0,
            verify: str = "none"):
  """The two jitted phases for one set of static settings (cached: compiled once).
  They read `prepare_params(cfg, ...).params` (decode.weights_layout's layout)."""
  shard = shd.sharder(cfg, mesh)
  out_in = cfg.decode.weights_layout == "out_in"
  if cfg.decode.cpu_kernel == "native":
    native.load()   # built on first use; registered before the loops are traced
    xla_cfg = cfg.replace(model={"scan_layers": False})   # prepare_params made it plain

    def extend(params, cache, block_BxT, n_B):
      xla = functools.partial(api.extend, xla_cfg, shard=shard, out_in=True)
      if block_BxT.shape[0] * block_BxT.shape[1] > native.MAX_ROWS:
        return xla(params, cache, block_BxT, n_B)
      fast = functools.partial(native.extend, cfg, source_layers=cfg.head.source_layers)
      return jax.lax.platform_dependent(params, cache, block_BxT, n_B, cpu=fast, default=xla)
  else:
    def extend(params, cache, block_BxT, n_B):
      return api.extend(cfg, params, cache, block_BxT, n_B, shard, out_in)
  L = max_cot + 1 + k + max_answer          # output buffer; k slots of slack for cut blocks

  def write(buf, idx_BxN, val_BxN):
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, idx_BxN].set(val_BxN.astype(buf.dtype), mode="drop")

  def take_last(x_BxTx, n_B):
    return jnp.take_along_axis(x_BxTx, (n_B - 1)[:, None, None], axis=1)[:, 0]

  def main_pass_all(params, cache, block_BxT, n_B, hmem=None):
    """One main pass over a block: the outputs at every block position."""
    out = extend(params, cache, block_BxT, n_B)
    if hmem is not None:   # the head's memory of every new position, at the same slots
      slots_BxT = cache.lengths[:, None] + jnp.arange(block_BxT.shape[1], dtype=jnp.int32)
      rows = jnp.arange(block_BxT.shape[0])[:, None]
      new = api.head_memory_kv(cfg, params, out.sources, slots_BxT)
      hmem = tuple((hk.at[rows, slots_BxT].set(nk.astype(hk.dtype), mode="drop"),
                    hv.at[rows, slots_BxT].set(nv.astype(hv.dtype), mode="drop"))
                   for (hk, hv), (nk, nv) in zip(hmem, new))
    return out, hmem

  def main_pass(params, cache, block_BxT, n_B, hmem=None):
    out, hmem = main_pass_all(params, cache, block_BxT, n_B, hmem)
    return (out.cache, take_last(out.logits, n_B), tuple(take_last(s, n_B) for s in out.sources),
            hmem)

  def prefill(params, prompt_BxP, lens_B, key):
    B, P = prompt_BxP.shape
    capacity = P + max_cot + 1 + (k + 1) + max_answer
    cache = KVCache.empty(cfg.model, B, capacity)
    spec = ("batch", "act_kv_heads", None, None)
    cache = cache.replace(k=tuple(shard(a, spec) for a in cache.k),
                          v=tuple(shard(a, spec) for a in cache.v))
    hmem = None
    if cfg.head.context and k > 0:
      hd = api.head_dims_of(cfg)
      zeros = jnp.zeros((B, capacity, hd.num_heads, hd.head_dim), jnp.dtype(cfg.model.dtype))
      hmem = tuple((zeros, zeros) for _ in range(cfg.head.num_layers))
    cache, logits, sources, hmem = main_pass(params, cache, prompt_BxP, lens_B, hmem)
    last_prompt = jnp.take_along_axis(prompt_BxP, (lens_B - 1)[:, None], axis=1)[:, 0]
    zeros = jnp.zeros((B, L), jnp.int32)
    return _State(
        cache=cache, logits=logits, sources=sources, tokens=zeros, source=zeros - 1,
        phase=zeros - 1, logprobs=jnp.zeros((B, L), jnp.float32),
        n_out=jnp.zeros((B,), jnp.int32), n_think=jnp.zeros((B,), jnp.int32),
        cot_done=last_prompt == think_end_id, done=jnp.zeros((B,), bool),
        passes=jnp.ones((B,), jnp.int32), forced=jnp.zeros((B,), bool),
        last=last_prompt, key=key, pend=jnp.full((B,), -1, jnp.int32),
        accepted=jnp.zeros((B,), jnp.int32), hmem=hmem)

  def cot_body(params, st: _State) -> _State:
    B = st.n_out.shape[0]
    key, step_key = jax.random.split(st.key)
    keys = jax.random.split(step_key, k + 1)
    active = ~st.cot_done & ~st.done
    x1, lp1 = sampling.sample(keys[0], st.logits, sample)
    if k > 0:
      head_toks, head_lps = sample_head_chain(cfg, params, st.sources, x1, keys[1:], sample,
                                              shard, st.hmem, st.cache.lengths)
      block = jnp.concatenate([x1[:, None], head_toks], 1)           # (B, k+1)
      lps = jnp.concatenate([lp1[:, None], head_lps], 1)
    else:
      block, lps = x1[:, None], lp1[:, None]
    src = jnp.broadcast_to(jnp.arange(k + 1, dtype=jnp.int32), block.shape)

    # Budget forcing: a sequence with no thinking budget left gets </think>.
    budget = max_cot - st.n_think                                    # (B,) >= 0
    force = budget <= 0
    forced_lp = sampling.logprobs_of(st.logits, jnp.full((B,), think_end_id), sample)
    block = jnp.where(force[:, None], block.at[:, 0].set(think_end_id), block)
    lps = jnp.where(force[:, None], lps.at[:, 0].set(forced_lp), lps)

    # Adaptive blocks: keep head tokens while their probability is >= tau.
    keep = jnp.full((B,), k + 1, jnp.int32)
    if k > 0 and tau > 0:
      sure = jnp.cumprod((lps[:, 1:] >= np.log(tau)).astype(jnp.int32), axis=1)
      keep = jnp.where(force, k + 1, 1 + jnp.sum(sure, axis=1))
    # Cut after the first </think> or EOS that falls within the budget and the block.
    pos = jnp.arange(k + 1)
    n_valid, ended, stop_tok = cut_block(block, keep, budget, active, (think_end_id, eos_id),
                                         budget)
    ends_cot = ended & (stop_tok == think_end_id)
    ends_seq = ended & (stop_tok == eos_id)

    idx = jnp.where(active[:, None], st.n_out[:, None] + pos[None, :], L)
    cache, logits, sources, hmem = main_pass(params, st.cache, block, jnp.maximum(n_valid, 1),
                                             st.hmem)
    keep = lambda new, old: jnp.where(  # noqa: E731
        active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return st.replace(
        cache=cache.replace(lengths=jnp.where(active, cache.lengths, st.cache.lengths)),
        logits=keep(logits, st.logits), sources=tuple(map(keep, sources, st.sources)),
        tokens=write(st.tokens, idx, block), source=write(st.source, idx, src),
        phase=write(st.phase, idx, jnp.zeros_like(block)), logprobs=write(st.logprobs, idx, lps),
        n_out=st.n_out + n_valid,
        n_think=st.n_think + n_valid - (ends_cot | ends_seq).astype(jnp.int32),
        cot_done=st.cot_done | ends_cot, done=st.done | ends_seq,
        # A block that ends the sequence (EOS) needs no pass: nothing reads its h.
        passes=st.passes + (active & ~ends_seq).astype(jnp.int32),
        forced=st.forced | (active & force),
        key=key, hmem=hmem)

  def verified_body(params, st: _State, answer_start=None) -> _State:
    """One verified iteration (see the module docstring); answer_start: None in
    the CoT phase, else n_out where the answer began."""
    B = st.n_out.shape[0]
    in_answer = answer_start is not None
    key, step_key = jax.random.split(st.key)
    keys = jax.random.split(step_key, k + 2)
    pos = jnp.arange(k + 1)
    x1, _ = sampling.sample(keys[0], st.logits, sample)
    x1 = jnp.where(st.pend >= 0, st.pend, x1)
    if in_answer:
      room = max_answer - (st.n_out - answer_start)                  # (B,) tokens left
      active = ~st.done & (room > 0)
      force = jnp.zeros((B,), bool)
    else:
      budget = max_cot - st.n_think
      active = ~st.cot_done & ~st.done
      force = budget <= 0                                            # budget forcing
      x1 = jnp.where(force, think_end_id, x1)
    lp1 = sampling.logprobs_of(st.logits, x1, sample)                # the main model's
    if sample.greedy:      # acceptance compares with the main model's argmax: no q needed
      drafts, _ = sample_head_chain(cfg, params, st.sources, x1, keys[1:k + 1], sample, shard,
                                    st.hmem, st.cache.lengths)
      q_logp = None
    else:
      drafts, _, q_logp = sample_head_chain(cfg, params, st.sources, x1, keys[1:k + 1], sample,
                                            shard, st.hmem, st.cache.lengths, with_dists=True)
    block = jnp.concatenate([x1[:, None], drafts], 1)                # (B, k+1)
    out, hmem = main_pass_all(params, st.cache, block, None, st.hmem)
    p_logp = sampling.process_logits(out.logits[:, :k], sample)      # (B, k, V) at d_1..d_k
    a, resid = speculative_accept(keys[k + 1], p_logp, q_logp, drafts, sample.greedy)
    a = jnp.where(force, 0, a)
    keep = 1 + a

    # Cut after the first stop token among the kept ones, and at the length limits.
    if in_answer:
      n_valid, ended, stop_tok = cut_block(block, keep, room, active, (eos_id,), room - 1)
    else:
      n_valid, ended, stop_tok = cut_block(block, keep, budget, active,
                                           (think_end_id, eos_id), budget)
    ends_cot = ended & (stop_tok == think_end_id) & (not in_answer)
    ends_seq = ended & (stop_tok == eos_id)
    # The next x1 comes from the residual only where the rejection ended the block.
    rejected = active & (a < k) & ~ended & (n_valid == keep)
    pend = jnp.where(rejected & (not sample.greedy), resid, -1)
    terminal_x1 = (x1 == eos_id) | (room <= 1 if in_answer else False)

    lps = jnp.concatenate(
        [lp1[:, None], jnp.take_along_axis(p_logp, drafts[..., None], -1)[..., 0]], 1)
    n_last = jnp.maximum(n_valid, 1)
    logits = take_last(out.logits, n_last)
    sources = tuple(take_last(s, n_last) for s in out.sources)
    idx = jnp.where(active[:, None], st.n_out[:, None] + pos[None, :], L)
    src = jnp.broadcast_to(pos.astype(jnp.int32), block.shape)
    keep_new = lambda new, old: jnp.where(  # noqa: E731
        active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    st = st.replace(
        cache=out.cache.replace(lengths=st.cache.lengths + n_valid),
        logits=keep_new(logits, st.logits), sources=tuple(map(keep_new, sources, st.sources)),
        tokens=write(st.tokens, idx, block), source=write(st.source, idx, src),
        phase=write(st.phase, idx, jnp.full_like(block, int(in_answer))),
        logprobs=write(st.logprobs, idx, lps),
        n_out=st.n_out + n_valid, done=st.done | ends_seq,
        passes=st.passes + (active & ~terminal_x1).astype(jnp.int32),
        accepted=st.accepted + jnp.maximum(n_valid - 1, 0),
        pend=jnp.where(active, pend, st.pend), key=key, hmem=hmem)
    if not in_answer:
      st = st.replace(n_think=st.n_think + n_valid - (ends_cot | ends_seq).astype(jnp.int32),
                      cot_done=st.cot_done | ends_cot, forced=st.forced | (active & force))
    return st

  def cot_cond(st: _State):
    return jnp.any(~st.cot_done & ~st.done)

  def answer_sample(st: _State, n_answer_B) -> _State:
    key, step_key = jax.random.split(st.key)
    active = ~st.done & (n_answer_B < max_answer)
    tok, lp = sampling.sample(step_key, st.logits, sample)
    idx = jnp.where(active, st.n_out, L)[:, None]
    return st.replace(
        tokens=write(st.tokens, idx, tok[:, None]), source=write(st.source, idx, 0 * tok[:, None]),
        phase=write(st.phase, idx, 1 + 0 * tok[:, None]), logprobs=write(st.logprobs, idx,
                                                                          lp[:, None]),
        n_out=st.n_out + active, done=st.done | (active & (tok == eos_id)),
        last=jnp.where(active, tok, st.last), key=key)

  verified = {"none": (), "answer": (1,), "all": (0, 1)}[verify] if k > 0 else ()

  @jax.jit
  def run_cot(params, prompt_BxP, lens_B, key):
    st = prefill(params, prompt_BxP, lens_B, key)
    body = verified_body if 0 in verified else cot_body
    return jax.lax.while_loop(cot_cond, functools.partial(body, params), st)

  @jax.jit
  def run_answer(params, st: _State):
    start = st.n_out

    def cond(s):
      return jnp.any(~s.done & (s.n_out - start < max_answer))

    if 1 in verified:
      st = jax.lax.while_loop(cond, lambda s: verified_body(params, s, start), st)
      return result(st)
    st = answer_sample(st, jnp.zeros_like(start))   # the first answer token: from h, no pass

    def body(s):
      needs = ~s.done & (s.n_out - start < max_answer)
      cache, logits, sources, hmem = main_pass(params, s.cache, s.last[:, None],
                                               needs.astype(jnp.int32), s.hmem)
      keep = lambda new, old: jnp.where(  # noqa: E731
          needs.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
      s = s.replace(cache=cache, logits=keep(logits, s.logits), hmem=hmem,
                    sources=tuple(map(keep, sources, s.sources)),
                    passes=s.passes + needs.astype(jnp.int32))
      return answer_sample(s, s.n_out - start)

    return result(jax.lax.while_loop(cond, body, st))

  def result(st: _State) -> GenerateResult:
    valid = jnp.arange(L)[None, :] < st.n_out[:, None]
    return GenerateResult(
        tokens=jnp.where(valid, st.tokens, PAD_ID), source=jnp.where(valid, st.source, -1),
        phase=jnp.where(valid, st.phase, -1), logprobs=jnp.where(valid, st.logprobs, 0.0),
        lengths=st.n_out, forward_passes=st.passes, finished=st.done, cot_forced=st.forced,
        accepted=st.accepted)

  return run_cot, run_answer


def _validate(cfg: Config, prompt, lens, k: int, max_cot: int, max_answer: int) -> None:
  if prompt.ndim != 2:
    raise ValueError(f"prompt_tokens must be (batch, length); got shape {prompt.shape}")
  if lens.shape != (prompt.shape[0],):
    raise ValueError(f"prompt_lengths must be ({prompt.shape[0]},); got shape {lens.shape}")
  if prompt.shape[1] == 0 or np.any(lens < 1):
    raise ValueError(f"empty prompt: prompt_lengths={lens.tolist()}; accepted: every "
                     "prompt has at least one token (BOS)")
  if np.any(lens > prompt.shape[1]):
    raise ValueError(f"prompt_lengths={lens.tolist()} exceed the prompt array's length "
                     f"{prompt.shape[1]}")
  V = cfg.model.vocab_size
  real = np.arange(prompt.shape[1])[None, :] < lens[:, None]
  bad = real & ((prompt < 0) | (prompt >= V))
  if np.any(bad):
    b, t = np.argwhere(bad)[0]
    raise ValueError(f"prompt token id {int(prompt[b, t])} at [{b}, {t}] is outside the "
                     f"vocabulary; accepted: ids in [0, model.vocab_size={V})")
  if not 0 <= k <= cfg.head.k:
    raise ValueError(f"k={k} is not accepted: an int in [0, head.k={cfg.head.k}] (the head "
                     f"was built for head.k={cfg.head.k} tokens)")
  if max_cot < 1 or max_answer < 1:
    raise ValueError(f"max_cot_tokens={max_cot}, max_answer_tokens={max_answer}: both must "
                     "be >= 1")
  limit = cfg.decode.max_len
  need = prompt.shape[1] + max_cot + 1 + (k + 1) + max_answer
  if limit and need > limit:
    raise ValueError(
        f"a prompt of length {prompt.shape[1]} does not fit the cache: prompt + "
        f"max_cot_tokens + 1 + (k+1) + max_answer_tokens = {need} > decode.max_len={limit}; "
        "accepted: a shorter prompt, smaller limits or a larger decode.max_len")


def generate(cfg: Config, params, prompt_tokens, prompt_lengths, key: jax.Array, *,
             k: int | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, max_cot_tokens: int | None = None,
             max_answer_tokens: int | None = None, eos_id: int | None = None,
             think_end_id: int | None = None, mesh: Mesh | None = None,
             head_threshold: float | None = None, verify: str | None = None) -> GenerateResult:
  """Two-phase generation for a batch of left-aligned prompts.

  Args:
    params: the parameters, or `prepare_params(cfg, params)`: the copy that
      decode.weights_dtype / decode.weights_layout ask for, made once for many calls.
    prompt_tokens: (B, P) int, each row `BOS question <think>` (or, with no CoT,
      `... <think> </think>`), padded after its length.
    prompt_lengths: (B,) int, tokens per prompt (>= 1).
    key: a PRNG key (split inside; never reused).
    k: head tokens per CoT block, 0..head.k (default decode.k, -1 meaning head.k).
    temperature/top_k/top_p, max_cot_tokens/max_answer_tokens: default from cfg.decode.
    mesh: decode with the batch sharded over the data axes and the params as the rules say.
    head_threshold: adaptive blocks (default decode.head_threshold): a block is cut
      before the first head token whose probability is below it; 0: k head tokens.
      It applies to unverified CoT blocks only.
    verify: "none" | "answer" | "all" (default decode.verify): which phases the
      main model verifies the head's drafts in ("answer": the answer phase, "all":
      the CoT too, a lossless CoT). A verified phase writes k=0's tokens (greedy)
      or samples k=0's distribution, in fewer passes when drafts are kept.
  Returns:
    GenerateResult (see its fields).
  """
  d = cfg.decode
  k = (d.k if d.k >= 0 else cfg.head.k) if k is None else k
  s = sampling.Sampling(temperature=d.temperature if temperature is None else temperature,
                        top_k=d.top_k if top_k is None else top_k,
                        top_p=d.top_p if top_p is None else top_p)
  max_cot = d.max_cot_tokens if max_cot_tokens is None else max_cot_tokens
  max_answer = d.max_answer_tokens if max_answer_tokens is None else max_answer_tokens
  prompt = np.asarray(prompt_tokens)
  lens = np.asarray(prompt_lengths)
  tau = d.head_threshold if head_threshold is None else float(head_threshold)
  verify = d.verify if verify is None else verify
  if eos_id is None:
    eos_id = d.eos_id if d.eos_id >= 0 else EOS_ID
  if think_end_id is None:
    think_end_id = d.think_end_id if d.think_end_id >= 0 else THINK_END_ID
  _validate(cfg, prompt, lens, k, max_cot, max_answer)
  if not 0.0 <= tau < 1.0:
    raise ValueError(f"head_threshold={tau} is not accepted: a number in [0, 1)")
  if verify not in VERIFY:
    raise ValueError(f"verify={verify!r} is not accepted: one of {', '.join(VERIFY)}")
  verify = verify if k > 0 else "none"       # nothing to verify without drafts
  if mesh is not None and d.cpu_kernel == "native":
    raise ValueError("decode.cpu_kernel=native runs on one CPU device and was given a mesh; "
                     "accepted: mesh=None, or decode.cpu_kernel=xla")
  prepared = prepare_params(cfg, params)
  run_cot, run_answer = _static(cfg, k, s, max_cot, max_answer, eos_id, think_end_id, mesh, tau,
                                verify)
  prompt = jnp.asarray(np.where(np.arange(prompt.shape[1])[None] < lens[:, None], prompt, 0),
                       jnp.int32)
  lens = jnp.asarray(lens, jnp.int32)
  if mesh is not None:
    batch = shd.sharder(cfg, mesh)
    prompt = jax.device_put(prompt, batch.sharding(("batch", None)))
    lens = jax.device_put(lens, batch.sharding(("batch",)))
  st = run_cot(prepared.params, prompt, lens, key)
  return run_answer(prepared.params, st)
