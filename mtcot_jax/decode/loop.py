"""The decode loop object: static settings as fields, one method per step.

`Decoder` is frozen and hashable; its jitted methods take it as a static
argument, so the two loops compile once per Decoder (settings) and shape.

Prefill (1 main pass) fills the KV cache and gives h, the main model's logits
and head sources at each prompt's last position. Then:

CoT loop (one `lax.while_loop` iteration = one main forward pass, `cot_step`):
  1. x[t+1] ~ main(h);  2. x[t+2..t+k+1] ~ head chain from h's sources;
  3. cut the block after the first answer marker's last token (`markers.py`:
     `</think>` by default, or token sequences such as "Answer:", begun in this
     block, an earlier one or the prompt; or EOS, which ends the sequence), at
     the CoT budget, and (adaptive blocks) before the first unsure head token;
     the head's chain stops drafting where a marker or EOS is complete;
  4. one main pass appends the block and gives the new h.
  A sequence whose CoT has ended waits, masked. One that spends `max_cot`
  tokens without completing a marker gets the first marker variant written
  for it (budget forcing): one token a pass, each a one-token block of the
  main model's (source 0, its log-prob the main model's), until a marker
  completes (at most the variant's m tokens: m passes, as k = 0 would spend).
  A pass budget B (decode.pass_budget) forces the marker the same way once a
  row has spent B CoT passes (its budget of thinking tokens lowered to what it
  has written), so that the CoT costs at most B passes plus the marker's m.
Answer loop (`answer_step`: one main pass per token, the head not run) until EOS
or `max_answer`. EOS is any id of `eos_id` (a tuple of stop ids).

Sampling: the Decoder's `sample` says only whether the loops are greedy (the
argmax program) or sample; the values (temperature, top_k, top_p) are an
argument of the loops (`State.sample`, scalar arrays), so a new value reuses the
compiled loops. A sampling Decoder given temperature 0 decodes greedily, token
for token as the greedy Decoder does (`sampling.py`), at the sampling program's cost.

Verified phases (`verified_step`; verify "answer": the answer phase, "all": the
CoT too): an iteration samples the main model's token x1 from h, lets the head
draft k tokens after it, and runs one main pass over the block [x1, d1..dk].
That pass gives the main model's distribution p_j at every block position;
`blocks.speculative_accept` keeps drafts while they are p's argmax (greedy) or
by the speculative-sampling rule; after a rejection the next x1 comes from
normalise(max(0, p - q)) there. The cache's length moves past the committed
tokens only, so rejected positions are overwritten by the next block. The
output is k=0's, token for token (greedy), or has k=0's distribution (sampling).

forward_passes = 1 + CoT blocks + (answer length - 1), per sequence, a forced
marker token being a CoT block of its own (an EOS that ends a sequence is never
fed back, in either phase). In a verified phase every iteration costs one pass
except one whose own token x1 ends the sequence.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mtcot_jax import sampling
from mtcot_jax import sharding as shd
from mtcot_jax.config import Config
from mtcot_jax.decode import backend, blocks
from mtcot_jax.decode import markers as markers_
from mtcot_jax.decode.state import (GenerateResult, PassOutput, State, advance, commit, result,
                                    take_at)
from mtcot_jax.model.heads import head_for
from mtcot_jax.model.transformer import KVCache

_jit = functools.partial(jax.jit, static_argnums=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decoder:
  """Two-phase decoding with one set of static settings (see the module docstring).

  `verify` is "none", "answer" or "all" ("none" where k = 0); `tau` the adaptive
  blocks' threshold (unverified CoT blocks only); `markers` the answer markers
  (token-id tuples; the CoT ends at the first one completed; budget forcing
  writes markers[0]); `eos_id` the stop ids (an int is taken as a tuple of one);
  `sample` the sampling settings whose `greedy` picks the program and whose values
  are the default of a call given none (`decoder` gives every Decoder the same
  values per mode, so that they share the compiled loops). Parameters come from
  `backend.prepare_params(cfg, ...).params`.
  """
  cfg: Config
  k: int
  sample: sampling.Sampling
  max_cot: int
  max_answer: int
  eos_id: tuple[int, ...]
  markers: markers_.Markers
  tau: float = 0.0
  verify: str = "none"
  pass_budget: int = 0
  mesh: Mesh | None = None

  def __post_init__(self):
    ids = (self.eos_id,) if isinstance(self.eos_id, (int, np.integer)) else self.eos_id
    object.__setattr__(self, "eos_id", tuple(int(i) for i in ids))
    if not self.eos_id:
      raise ValueError("eos_id=() is not accepted: one stop id or more")

  def _is_eos(self, tok):
    """tok is one of the stop ids (elementwise)."""
    return functools.reduce(jnp.logical_or, [tok == i for i in self.eos_id])

  def _s(self, st: State) -> sampling.Sampling:
    """The settings the steps read: the Decoder's own (numbers) where greedy, so
    that greedy compiles the argmax program; else the loop's arrays."""
    return self.sample if self.sample.greedy else st.sample

  def sample_values(self, sample: sampling.Sampling | None = None) -> sampling.Sampling:
    """The loops' sampling argument: `sample` (None: the Decoder's) as scalar arrays,
    float32/int32/float32 always (one compiled program for numbers and arrays alike)."""
    return (self.sample if sample is None else sample).traced()

  @property
  def out_len(self) -> int:
    """The output buffer's length: a CoT of at most max_cot + m tokens (m the forced
    marker's), the answer, and k slots of slack for blocks cut short."""
    return self.max_cot + len(self.markers[0]) + self.k + self.max_answer

  def capacity(self, prompt_len: int) -> int:
    """The KV cache's slots for a prompt of this length."""
    return prompt_len + self.max_cot + len(self.markers[0]) + (self.k + 1) + self.max_answer

  @functools.cached_property
  def _extend(self):
    return backend.extend_fn(self.cfg, self.mesh)

  @functools.cached_property
  def head(self):
    return head_for(self.cfg, shd.sharder(self.cfg, self.mesh))

  def main_pass(self, params, cache: KVCache, block_BxT, n_B, head_state,
                last_only: bool = False, aligned: bool = False) -> PassOutput:
    """One main pass over a (B, T) block (its first n_B tokens real; n_B None: all),
    the head's memory of every new position written at the same slots.
    `last_only`: the logits at each row's last real token only, (B, 1, V) (what
    `advance` reads: an unverified block needs no others). `aligned`: every row
    of the cache has the same length (the prefill's empty cache)."""
    at = None if not last_only or block_BxT.shape[1] == 1 else (
        jnp.maximum(n_B, 1) - 1).astype(jnp.int32)
    out = self._extend(params, cache, block_BxT, n_B, logits_at_B=at, aligned=aligned)
    if head_state:
      slots_BxT = cache.lengths[:, None] + jnp.arange(block_BxT.shape[1], dtype=jnp.int32)
      head_state = self.head.remember(params, head_state, out.sources, slots_BxT)
    return PassOutput(out.cache, out.logits, out.sources, head_state)

  def prefill(self, params, prompt_BxP, lens_B, key, sample=None) -> State:
    """The prompt's main pass: the first state, h at each prompt's last token;
    `sample` the sampling values (see `sample_values`)."""
    B, P = prompt_BxP.shape
    capacity = self.capacity(P)
    cache = backend.empty_cache(self.cfg, self.mesh, B, capacity)
    head_state = self.head.decode_state(B, capacity) if self.k > 0 else ()
    out = self.main_pass(params, cache, prompt_BxP, lens_B, head_state, aligned=True)
    # A prompt that ends with a marker has no CoT to write.
    window = markers_.prompt_window(prompt_BxP, lens_B, markers_.tail_len(self.markers) + 1)
    zeros_BxL, zeros_B = jnp.zeros((B, self.out_len), jnp.int32), jnp.zeros((B,), jnp.int32)
    return State(
        cache=out.cache, logits=take_at(out.logits, lens_B),
        sources=tuple(take_at(s, lens_B) for s in out.sources),
        head_state=out.head_state, tokens=zeros_BxL, source=zeros_BxL - 1, phase=zeros_BxL - 1,
        logprobs=jnp.zeros((B, self.out_len), jnp.float32), n_out=zeros_B, n_think=zeros_B,
        cap=zeros_B + self.max_cot,
        cot_done=markers_.ends_with_marker(window, self.markers), done=zeros_B.astype(bool),
        passes=zeros_B + 1, forced=zeros_B.astype(bool), last=window[:, -1],
        tail=window[:, 1:], key=key, pend=zeros_B - 1, accepted=zeros_B,
        sample=self.sample_values(sample))

  def _draft(self, params, st: State, x1_B, keys, go_B, cot: bool, tau=0.0, with_dists=False):
    """The head's drafts after x1 where `go_B` (rows whose drafts can be kept); the
    chain stops at EOS and, in the CoT, where a marker completes."""
    return blocks.sample_head_chain(self.head, params, st.head_state, st.sources, x1_B, keys,
                                    self._s(st), st.cache.lengths, with_dists, go_B=go_B,
                                    stop_ids=self.eos_id, tau=tau,
                                    markers=self.markers if cot else (), tail_BxM=st.tail)

  def _think_budget(self, st: State):
    """The CoT tokens each row may still write (<= 0: forced), its cap lowered to
    what it has written once it has spent the pass budget. Returns (state, budget)."""
    cap = st.cap
    if self.pass_budget:
      spent = st.passes - 1 >= self.pass_budget          # CoT passes (the prefill is 1)
      cap = jnp.where(spent, jnp.minimum(cap, st.n_think), cap)
    return st.replace(cap=cap), cap - st.n_think

  def _force(self, st: State, x1_B, force_B):
    """Budget forcing: a row with no thinking budget left writes the first marker's
    next token (n_think - cap of them written) in place of x1."""
    return jnp.where(force_B, markers_.forced_token(self.markers, st.n_think - st.cap), x1_B)

  def _cut_cot(self, st: State, block_BxT, keep_B, budget_B, active_B):
    """How much of a CoT block is committed (`blocks.cut_block`: through the first
    marker end or EOS, the budget allowing a marker's last token just after it; a
    forced row's one token). Returns (n_valid, ends_cot, ends_seq)."""
    n_valid, ended, stop_tok = blocks.cut_block(
        block_BxT, keep_B, jnp.maximum(budget_B, 1), active_B, self.eos_id,
        jnp.maximum(budget_B, 0), markers_.marker_hits(st.tail, block_BxT, self.markers))
    ends_seq = ended & self._is_eos(stop_tok)
    return n_valid, ended & ~ends_seq, ends_seq

  def _cot_counters(self, st: State, active_B, force_B, n_valid_B, ends_cot_B, ends_seq_B):
    return st.replace(
        n_think=st.n_think + n_valid_B - (ends_cot_B | ends_seq_B).astype(jnp.int32),
        cot_done=st.cot_done | ends_cot_B, forced=st.forced | (active_B & force_B))

  def cot_step(self, params, st: State) -> State:
    """One unverified CoT iteration: the main token, k head tokens, one pass."""
    k = self.k
    key, step_key = jax.random.split(st.key)
    keys = jax.random.split(step_key, k + 1)
    active = ~st.cot_done & ~st.done
    s = self._s(st)
    x1, lp1 = sampling.sample(keys[0], st.logits, s)
    # Budget forcing: a sequence with no thinking budget left gets a marker's token.
    st, budget = self._think_budget(st)                              # (B,) <= 0: forced
    force = budget <= 0
    x1 = self._force(st, x1, force)
    lp1 = jnp.where(force, sampling.logprobs_of(st.logits, x1, s), lp1)
    block, lps = x1[:, None], lp1[:, None]
    if k > 0:
      head_toks, head_lps = self._draft(params, st, x1, keys[1:], active & ~force, True,
                                        self.tau)
      block = jnp.concatenate([block, head_toks], 1)                # (B, k+1)
      lps = jnp.concatenate([lps, head_lps], 1)
    keep = jnp.where(force, 1, blocks.adaptive_keep(lps, force, self.tau))
    n_valid, ends_cot, ends_seq = self._cut_cot(st, block, keep, budget, active)
    out = self.main_pass(params, st.cache, block, jnp.maximum(n_valid, 1), st.head_state,
                         last_only=True)
    st = commit(st, active_B=active, block_BxT=block, phase=0, logprobs_BxT=lps, n_B=n_valid,
                source_BxT=jnp.broadcast_to(jnp.arange(k + 1, dtype=jnp.int32), block.shape),
                ends_seq_B=ends_seq, key=key, out=out,
                # A block that ends the sequence (EOS) needs no pass: nothing reads its h.
                passes_B=(active & ~ends_seq).astype(jnp.int32))
    return self._cot_counters(st, active, force, n_valid, ends_cot, ends_seq)

  def verified_step(self, params, st: State, answer_start=None) -> State:
    """One verified iteration; answer_start: None in the CoT phase, else the
    output offset where the answer began."""
    k, in_answer = self.k, answer_start is not None
    key, step_key = jax.random.split(st.key)
    keys = jax.random.split(step_key, k + 2)
    s = self._s(st)
    greedy = sampling.greedy_now(s)     # a bool, or traced where the values are
    x1, _ = sampling.sample(keys[0], st.logits, s)
    x1 = jnp.where(st.pend >= 0, st.pend, x1)
    if in_answer:
      room = self.max_answer - (st.n_out - answer_start)            # (B,) tokens left
      active, force = ~st.done & (room > 0), jnp.zeros_like(st.done)
    else:
      st, budget = self._think_budget(st)
      active, force = ~st.cot_done & ~st.done, budget <= 0          # budget forcing
      x1 = self._force(st, x1, force)
    lp1 = sampling.logprobs_of(st.logits, x1, s)                    # the main model's
    # Greedy acceptance compares with the main model's argmax: no q needed.
    drafted = self._draft(params, st, x1, keys[1:k + 1], active & ~force, not in_answer,
                          with_dists=not self.sample.greedy)
    drafts, q_logp = drafted[0], (drafted[2] if len(drafted) == 3 else None)
    block = jnp.concatenate([x1[:, None], drafts], 1)                # (B, k+1)
    out = self.main_pass(params, st.cache, block, None, st.head_state)
    p_logp = sampling.process_logits(out.logits[:, :k], s)          # (B, k, V) at d_1..d_k
    a, resid = blocks.speculative_accept(keys[k + 1], p_logp, q_logp, drafts, greedy)
    a = jnp.where(force, 0, a)
    keep = 1 + a
    if in_answer:   # cut after the first stop token kept, and at the length limits
      n_valid, ended, stop_tok = blocks.cut_block(block, keep, room, active, self.eos_id,
                                                  room - 1)
      ends_cot, ends_seq = jnp.zeros_like(ended), ended & self._is_eos(stop_tok)
    else:
      n_valid, ends_cot, ends_seq = self._cut_cot(st, block, keep, budget, active)
    # The next x1 comes from the residual only where the rejection ended the block
    # (greedy: the argmax at h, which is the residual's token, drawn again).
    rejected = active & ~force & (a < k) & ~ends_cot & ~ends_seq & (n_valid == keep)
    pend = jnp.where(rejected & jnp.logical_not(greedy), resid, -1)
    terminal_x1 = self._is_eos(x1) | (room <= 1 if in_answer else False)
    lps = jnp.concatenate(
        [lp1[:, None], jnp.take_along_axis(p_logp, drafts[..., None], -1)[..., 0]], 1)
    st = commit(st, active_B=active, block_BxT=block, phase=int(in_answer), logprobs_BxT=lps,
                n_B=n_valid, source_BxT=jnp.broadcast_to(jnp.arange(k + 1, dtype=jnp.int32),
                                                         block.shape),
                ends_seq_B=ends_seq, passes_B=(active & ~terminal_x1).astype(jnp.int32),
                key=key, out=out)
    st = st.replace(accepted=st.accepted + jnp.maximum(n_valid - 1, 0),
                    pend=jnp.where(active, pend, st.pend))
    return st if in_answer else self._cot_counters(st, active, force, n_valid, ends_cot,
                                                   ends_seq)

  def answer_step(self, params, st: State, answer_start, first: bool = False) -> State:
    """One answer token from the main model; unless `first` (sampled from h), a
    main pass over the previous answer token gives its h."""
    active = ~st.done & (st.n_out - answer_start < self.max_answer)
    if not first:
      n = active.astype(jnp.int32)
      out = self.main_pass(params, st.cache, st.last[:, None], n, st.head_state)
      st = advance(st, active, n, out).replace(passes=st.passes + n)
    key, step_key = jax.random.split(st.key)
    tok, lp = sampling.sample(step_key, st.logits, self._s(st))
    return commit(st, active_B=active, block_BxT=tok[:, None], phase=1,
                  source_BxT=jnp.zeros_like(tok)[:, None], logprobs_BxT=lp[:, None],
                  n_B=active.astype(jnp.int32), ends_seq_B=active & self._is_eos(tok),
                  passes_B=0, key=key)

  def _verified(self, phase: int) -> bool:
    return self.k > 0 and phase in {"none": (), "answer": (1,), "all": (0, 1)}[self.verify]

  @_jit
  def run_cot(self, params, prompt_BxP, lens_B, key, sample=None) -> State:
    """Prefill, then the CoT loop until every row has ended its CoT. `sample`:
    the sampling values (`sample_values`; None: the Decoder's), an argument."""
    step = self.verified_step if self._verified(0) else self.cot_step
    return jax.lax.while_loop(lambda s: jnp.any(~s.cot_done & ~s.done),
                              functools.partial(step, params),
                              self.prefill(params, prompt_BxP, lens_B, key, sample))

  @_jit
  def run_answer(self, params, st: State) -> GenerateResult:
    """The answer loop, from the state `run_cot` left, to the result."""
    start = st.n_out

    def cond(s):
      return jnp.any(~s.done & (s.n_out - start < self.max_answer))
    if self._verified(1):
      return result(jax.lax.while_loop(cond, lambda s: self.verified_step(params, s, start), st))
    st = self.answer_step(params, st, start, first=True)
    return result(jax.lax.while_loop(cond, lambda s: self.answer_step(params, s, start), st))

  def __call__(self, params, prompt_BxP, lens_B, key, sample=None) -> GenerateResult:
    """Both loops; `sample`: a `sampling.Sampling` of numbers or scalar (traced) arrays,
    None: the Decoder's own. Checked here, outside the compiled loops."""
    if self.sample.greedy and sample is not None and not sample.greedy:
      raise ValueError(
          f"this Decoder is greedy (its loops compute the argmax) and was given "
          f"temperature={sample.temperature!r}; accepted: the number 0, or a sampling "
          "Decoder (decode.decoder(cfg, greedy=False)), which also decodes greedily where "
          "an array temperature is 0")
    sample = self.sample_values(sample)
    return self.run_answer(params, self.run_cot(params, prompt_BxP, lens_B, key, sample))
