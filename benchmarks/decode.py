"""Decoding throughput: the k-token CoT loop, the answer loop, and where a CoT iteration's time goes.

    .venv/bin/python benchmarks/decode.py                 # 25m, 25m-ctx, demo; batch 1 and 8 (long)
    .venv/bin/python benchmarks/decode.py --quick         # tiny sizes, both heads (~2 min)
    .venv/bin/python benchmarks/decode.py --models 25m 25m-ctx --batch 1 --ks 0 5
    .venv/bin/python benchmarks/decode.py --models 25m-ctx --batch 1 --ks 0 5 --pass-costs-only

Models: `25m` (d=512, 8 layers, the projection head of width 256), `25m-ctx`
(the same main model with the demo's head with context: head.context=-1, 2
layers, width 256, 4 heads), `demo` (configs/demo.yaml), `tiny` / `tiny-ctx`.

Every row is also printed as a fraction of its memory-bandwidth bound: the bytes
one pass reads (every main weight once, the KV cache at that context, k times the
head's weights) over the bandwidth of a jitted mat-vec measured in the same run
(`common.memory_bandwidth`); on a GPU we know, also over its nominal bandwidth
(H200: 4.8 TB/s). `--contexts` times k=0 per token at several context lengths.

Random weights, greedy sampling. Every piece timed is the decoder's own code:
a `mtcot_jax.decode.Decoder` built for the row's settings (`row_decoder`:
`decode.decoder(decode.decode_config(cfg, ...))`), its methods jitted alone
where a piece is timed apart from the loop. What is measured, per (model, batch):

* CoT phase, for each k: `Decoder.run_cot` (the jitted prefill + CoT
  `while_loop`) alone, warm, ended by `block_until_ready`, median
  of `--repeats`. The EOS id given to the loop is `vocab_size` (never sampled),
  so random weights cannot end a sequence; they rarely emit `</think>` (id 5),
  so the CoT runs to `--max-cot` and is budget-forced. CoT tokens are counted
  from the loop's own output (`phase == 0`, the forced `</think>` included;
  every one of them cost a main pass or rode in a block). The prefill
  (`Decoder.prefill` jitted alone: one main pass over the prompt, and for a
  head with context at k > 0 the head's memory of it) is subtracted:
  CoT tok/s = CoT tokens / (t_run_cot - t_prefill).
* Answer phase: a no-CoT prompt ending in `</think>`, so `run_cot` stops after
  the prefill; `Decoder.run_answer` alone is timed (one token per main pass,
  `--max-answer` tokens, an EOS id the model never produces).
* One CoT iteration, split: a main pass (`Decoder.main_pass`: the cached pass
  and, for a head with context at k > 0, the head's memory of the new
  positions) over a (B, k+1) block and over a (B, 1) block, on the prefill's
  cache (the loop's capacity) filled to prompt + max_cot/2, timed as 16 passes
  in a jitted fori_loop that carries the cache in place as the decode loops do
  (`_main_passes_fn`); the head's chain of k samples as the CoT loop draws it
  (`decode.blocks.sample_head_chain(dec.head, ...)`: depth j runs the head over
  the chain prefix it reads). "other" = the loop's measured time per
  iteration - main(k+1) - head chain: sampling, cutting, buffer writes and the
  while_loop's own overhead.
* A naive Python loop over a jitted one-token step (`Decoder.main_pass` +
  argmax, cache donated) after `Decoder.prefill`, k=0 equivalent.
* Per-pass costs (issue 30; `pass_costs`, skipped by --no-pass-costs), per
  (model, batch), at each of --contexts and each k, microseconds per item: the
  main pass alone over (B, 1) and (B, k+1) tokens, one chain step
  (`head.chain_step` + `api.head_logits` + `sampling.sample`), the whole k-step
  chain (`sample_head_chain`), the head's memory update (`head.remember` of k+1
  positions; 0 for the projection head), sampling alone on (B, V) logits, and
  (chain + memory update) / main(1). Each piece jitted alone and run 16 times in
  a fori_loop whose carry is donated (dispatch amortised, nothing copied).
  Where the native kernel applies, the main passes again with it (it implements
  only the main model's pass: the head always runs through XLA).
* Head FLOPs and bytes per block as a fraction of one main pass over 1 token,
  analytic (`head_cost`, batch 1; the formulas in the docstrings of
  `main_pass_flops`, `head_step_flops`, ... ), printed beside each model: the
  figure that carries to accelerators, where a pass over k+1 tokens costs about
  one over 1. The JSON (--json) holds both ("pass_costs", "head_cost").
* Hugging Face transformers' `LlamaForCausalLM.generate` on the same Llama
  configuration (random weights, greedy, batch 1, the same number of new
  tokens), when torch and transformers are importable (an optional extra).

On a CPU with a C++ compiler (unless --no-native), per (model, batch): every
k's CoT loop and the answer loop again with decode.cpu_kernel=native (the main
passes of at most 8 rows in mtcot_jax.native's kernel), side by side with XLA's
rows, and the long-context rows for both kernels.

Also, per (model, batch): the answer loop and the k=0 loop with the other
decode.weights_layout (prepared once, `decode.prepare_params`, whose time is
printed), side by side; at batch 1 the main weights' mat-vecs alone, chained
(`_floor_fn`: a reference floor for a loop built from XLA's mat-vecs).

Fractions of the bound divide a median loop time into the best of 30 probe
calls (`common.memory_bandwidth`): conservative on a shared machine.

Targets (batch 1): k=5 CoT tok/s >= 2x k=0 on a 2-core CPU (>= 5x on a GPU);
issue 13: the k=0 and answer loops at >= 0.8 of the bound, k=0 >= 3x HF
generate, 2,048 tokens of context <= 1.5x the per-token time at 128.

`--no-ynn` sets XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= before jax
starts: XLA:CPU then runs multi-row dots with its own kernels instead of
YNNPACK fusions (see the findings printed by the breakdown).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEMO = "configs/demo.yaml"
# ~25M parameters in the main model (+1.5M in the head).
M25 = ["model.vocab_size=1024", "model.d_model=512", "model.num_layers=8",
       "model.num_heads=8", "model.num_kv_heads=4", "model.mlp_dim=1376",
       "head.k=5", "head.width=256", "head.num_heads=4", "head.num_layers=1"]
TINY = ["model.vocab_size=128", "model.d_model=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.mlp_dim=128", "head.k=5", "head.width=32",
        "head.num_heads=2", "head.num_layers=1"]
# The head with context as the demo has it (configs/demo.yaml: head.context=-1, 2
# layers, SwiGLU at 4 x width) on the same main models: 25m-ctx at the 25m row's head
# width 256 and 4 heads (head dim 64), tiny-ctx at tiny's width 32.
CTX = ["head.context=-1", "head.num_layers=2"]
MODELS = {"25m": (None, M25), "25m-ctx": (None, M25 + CTX), "demo": (DEMO, []),
          "tiny": (None, TINY), "tiny-ctx": (None, TINY + CTX)}


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS),
                 help="default: 25m 25m-ctx demo (tiny tiny-ctx with --quick)")
  p.add_argument("--batch", nargs="+", type=int, default=None, help="default: 1 8")
  p.add_argument("--ks", nargs="+", type=int, default=None, help="default: 0 1 3 5")
  p.add_argument("--max-cot", type=int, default=None, help="CoT budget (default 128)")
  p.add_argument("--max-answer", type=int, default=None, help="answer tokens (default 128)")
  p.add_argument("--prompt-len", type=int, default=8)
  p.add_argument("--repeats", type=int, default=None, help="timed runs per row (median; default 3)")
  p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
  p.add_argument("--no-breakdown", action="store_true", help="skip the per-iteration split")
  p.add_argument("--no-ynn", action="store_true",
                 help="XLA:CPU without YNNPACK dot fusions (sets XLA_FLAGS before jax starts)")
  p.add_argument("--contexts", nargs="+", type=int, default=None,
                 help="k=0 per-token time (25m, batch 1) and the per-pass costs at these "
                      "context lengths (default 128 2048)")
  p.add_argument("--no-native", action="store_true",
                 help="skip the decode.cpu_kernel=native rows (CPU only; they need a C++ compiler)")
  p.add_argument("--no-pass-costs", action="store_true",
                 help="skip the per-pass cost breakdown (main passes, chain step, chain, "
                      "memory update, sampling at each of --contexts)")
  p.add_argument("--pass-costs-only", action="store_true",
                 help="only the head/main counts and the per-pass cost breakdown")
  p.add_argument("--json", default="", help="also write the rows to this file")
  p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
  a = p.parse_args(argv)
  q = a.quick
  a.models = a.models or (["tiny", "tiny-ctx"] if q else ["25m", "25m-ctx", "demo"])
  a.batch = a.batch or ([1] if q else [1, 8])
  a.ks = a.ks or ([0, 2] if q else [0, 1, 3, 5])
  a.max_cot = a.max_cot or (16 if q else 128)
  a.max_answer = a.max_answer or (16 if q else 128)
  a.repeats = a.repeats or (1 if q else 3)
  a.contexts = a.contexts or ([64, 256] if q else [128, 2048])
  if q:
    a.no_hf = True
  return a


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None and ARGS.no_ynn:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_experimental_ynn_fusion_type=").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import cpu_info, memory_bandwidth, nominal_bandwidth, time_fn  # noqa: E402

import mtcot_jax as mt  # noqa: E402
from mtcot_jax import decode, native, sampling  # noqa: E402
from mtcot_jax.decode import blocks  # noqa: E402
from mtcot_jax.model import api  # noqa: E402
from mtcot_jax.model.transformer import KVCache  # noqa: E402
from mtcot_jax.tokens import BOS_ID, THINK_END_ID, THINK_ID  # noqa: E402


def load(name: str) -> mt.Config:
  path, overrides = MODELS[name]
  return mt.load_config(path, overrides)


def n_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def prompts(cfg: mt.Config, B: int, P: int, seed: int, no_cot: bool):
  """B random prompts of length P: BOS, random ids >= 6, then `<think>` (4) or `<think> </think>`."""
  rng = np.random.default_rng(seed)
  V = cfg.model.vocab_size
  body = rng.integers(6, V, size=(B, P))
  body[:, 0] = BOS_ID
  body[:, -1] = THINK_END_ID if no_cot else THINK_ID
  if no_cot:
    body[:, -2] = THINK_ID
  return jnp.asarray(body, jnp.int32), jnp.full((B,), P, jnp.int32)


def timed(fn, *args, repeats: int):
  """(median seconds, last output) of warm calls of fn(*args)."""
  out = jax.block_until_ready(fn(*args))   # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


# ----------------------------------------------------------------------------- pieces

def row_decoder(cfg: mt.Config, k: int, max_cot: int, max_answer: int, eos_id: int,
                think_end_id: int = THINK_END_ID, verify: str = "none") -> decode.Decoder:
  """The real decode loop object for a row's settings: `decode.decoder` of
  `decode.decode_config(cfg, ...)` (greedy, fixed blocks, unverified unless
  `verify` says otherwise; cfg's weights_layout, weights_dtype and cpu_kernel),
  its stop ids then replaced.
  The rows pass eos_id = vocab_size, an id never sampled, so that random weights
  cannot end a sequence: decode_config rightly refuses it, the dataclass takes any int."""
  dec = decode.decoder(decode.decode_config(
      cfg, k=k, max_cot_tokens=max_cot, max_answer_tokens=max_answer, temperature=0.0,
      top_k=0, top_p=1.0, head_threshold=0.0, verify=verify))
  return dataclasses.replace(dec, eos_id=eos_id, markers=((think_end_id,),))


@functools.lru_cache(maxsize=None)
def _prefill_fn(dec: decode.Decoder):
  """`Decoder.prefill`, jitted alone: the prompt's main pass (and the head's memory
  of it, for a head with context at k > 0) into a cache of the loop's capacity, as
  `run_cot` starts."""
  return jax.jit(dec.prefill)


@functools.lru_cache(maxsize=None)
def _main_pass_fn(dec: decode.Decoder):
  """`Decoder.main_pass`, jitted alone: one pass over a (B, T) block (all T real)."""
  @jax.jit
  def main_pass(params, cache, head_state, block_BxT):
    B, T = block_BxT.shape
    return dec.main_pass(params, cache, block_BxT, jnp.full((B,), T, jnp.int32), head_state)
  return main_pass


PASSES = 16   # main passes per timed call of _main_passes_fn


@functools.lru_cache(maxsize=None)
def _main_passes_fn(dec: decode.Decoder):
  """PASSES of `Decoder.main_pass` over one (B, T) block, in a fori_loop that
  carries the cache (and the head's decode state) as the decode loops do (updated
  in place; a jitted single pass instead returns a copy of the whole cache). Each
  pass writes at the same slots (lengths restored) and adds its logits and
  sources to the carry, so that none of its work is dead code; the head state is
  returned for the same reason. Per-pass time = call / PASSES (which includes
  1/PASSES of one copy of the cache and head state, the call's inputs, which are
  not donated)."""
  @jax.jit
  def passes(params, cache, head_state, block_BxT):
    B, T = block_BxT.shape
    n_B = jnp.full((B,), T, jnp.int32)

    def body(_, carry):
      c, hs, acc = carry
      out = dec.main_pass(params, c, block_BxT, n_B, hs)
      acc = acc + out.logits[:, -1].sum() + sum(s[:, -1].sum() for s in out.sources)
      return out.cache.replace(lengths=c.lengths), out.head_state, acc
    _, hs, acc = jax.lax.fori_loop(0, PASSES, body,
                                   (cache, head_state, jnp.zeros((), jnp.float32)))
    return acc, hs
  return passes


@functools.lru_cache(maxsize=None)
def _head_chain_fn(dec: decode.Decoder):
  """The head's chain of k samples as the CoT loop draws it:
  `decode.blocks.sample_head_chain(dec.head, ...)` with the loop's sampling."""
  @jax.jit
  def head_chain(params, head_state, sources, x1_B, lengths_B, key):
    return blocks.sample_head_chain(dec.head, params, head_state, sources, x1_B,
                                    jax.random.split(key, dec.k), dec.sample, lengths_B)
  return head_chain


@functools.lru_cache(maxsize=None)
def _step_fn(dec: decode.Decoder):
  """One greedy token: `Decoder.main_pass` over a (B, 1) block + argmax; the cache
  is donated (updated in place). k = 0: no head state."""
  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(params, cache, tok_B):
    out = dec.main_pass(params, cache, tok_B[:, None], None, ())
    return out.cache, jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
  return step


@functools.lru_cache(maxsize=None)
def _floor_fn(cfg: mt.Config, out_in: bool, passes: int):
  """`passes` batch-1 passes of the main weights' mat-vecs alone, in the decode
  order and layout, each on the last one's output: no attention over a cache,
  no norms, rope, sampling or cache writes. What a decode pass costs at best
  with XLA's mat-vecs on these matrices (unrolled layers only)."""
  m = cfg.model
  D, H, K = m.d_model, m.num_heads, m.num_kv_heads
  if out_in:   # (out, in) 2-D views, as Attention reads them with BlockDims.out_in
    mv = lambda x, w: jnp.einsum("bi,oi->bo", x, w)  # noqa: E731
    proj, out = (-1, D), (D, -1)
  else:
    mv = lambda x, w: x @ w  # noqa: E731
    proj, out = (D, -1), (-1, D)

  def one_pass(params, x):
    main = params["main"]
    for i in range(m.num_layers):
      a, f = main[f"layer_{i}"]["attn"], main[f"layer_{i}"]["mlp"]
      q, k, v = (mv(x, a[n].reshape(proj)) for n in "qkv")
      x = x + mv(q + jnp.tile(k + v, H // K), a["o"].reshape(out))
      x = x + mv(jax.nn.silu(mv(x, f["gate"])) * mv(x, f["up"]), f["down"])
    logits = x @ api.unembed_matrix(cfg, params)
    return x + 1e-6 * jnp.mean(logits)

  @jax.jit
  def run(params, x):
    return jax.lax.fori_loop(0, passes, lambda _, x: one_pass(params, x), x)
  return run


def weights_floor_ms(cfg: mt.Config, dp: decode.DecodeParams, repeats: int) -> float:
  """ms per pass of `_floor_fn` (64 chained passes, median of `repeats` runs)."""
  run = _floor_fn(cfg, dp.layout == "out_in", 64)
  x = jnp.ones((1, cfg.model.d_model), jnp.float32) * 0.01
  t, _ = timed(run, dp.params, x, repeats=repeats)
  return 1e3 * t / 64


def naive_loop(dec: decode.Decoder, dp: decode.DecodeParams, prompt, lens, n_tokens: int,
               repeats: int):
  """tokens/s of a Python loop over a jitted one-token step (k=0 equivalent): the
  loop's own prefill and main pass (`dec`, k = 0), driven from Python."""
  params = dp.params
  prefill = _prefill_fn(dec)
  step = _step_fn(dec)

  def run():
    st = prefill(params, prompt, lens, jax.random.key(0))
    cache, tok = st.cache, jnp.argmax(st.logits, axis=-1).astype(jnp.int32)
    jax.block_until_ready((cache, tok))
    t0 = time.perf_counter()
    for _ in range(n_tokens):
      cache, tok = step(params, cache, tok)
    jax.block_until_ready(tok)
    return time.perf_counter() - t0

  run()  # compile
  t = statistics.median(run() for _ in range(repeats))
  return prompt.shape[0] * n_tokens / t, t


# ----------------------------------------------------------------------------- the bound

def nbytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def kv_bytes(cfg: mt.Config, B: int, context: int) -> int:
  """Bytes of keys and values one pass reads at `context` filled slots."""
  m = cfg.model
  return 2 * m.num_layers * B * m.num_kv_heads * context * m.dh * jnp.dtype(m.dtype).itemsize


def bound_ms(cfg: mt.Config, params, B: int, context: int, bandwidth: float, k: int = 0,
             weights_dtype: str = "float32") -> float:
  """The memory-bandwidth bound of one pass: every main weight read once (at
  `weights_dtype`'s width: decode.weights_dtype, the float32 parameters narrowed;
  the few norm scales, which stay float32, counted narrowed too), the KV cache at
  `context`, and with k > 0 the head's weights once per chain step."""
  narrow = np.dtype(jnp.dtype(weights_dtype)).itemsize / 4
  read = (narrow * nbytes(params["main"]) + kv_bytes(cfg, B, context)
          + k * nbytes(params["head"]))
  return 1e3 * read / bandwidth


def prepared(cfg: mt.Config, params) -> tuple[decode.DecodeParams, float]:
  """`decode.prepare_params` (the weights in the decode loops' dtype and layout)
  and the seconds it takes (warm, median of 3): `generate` pays it once per call
  unless given the prepared parameters."""
  t, dp = timed(lambda: decode.prepare_params(cfg, params), repeats=3)
  return dp, t


def bench_contexts(kernels: dict, contexts, a) -> dict[str, dict[int, float]]:
  """{kernel: {context: ms per k=0 token (batch 1)}} for each (config, prepared
  parameters) of `kernels`: the loop's time for W more CoT tokens (32 + W against
  32), in a window of contexts centred on `context` (W = 256, or less where the
  context is too short to centre it; a pass's time is linear in the context, so the
  window's mean is the time at its centre). The prefill and the loop's fixed costs
  cancel; max_answer makes up the difference in max_cot, so that both runs have the
  same cache capacity. The window is wide because the prefill, the same in both
  runs, is most of a run at 2,048 tokens (~1.6 s on 2 cores) and its noise divided
  by a 64-token window was +-0.5 ms a token. The runs of every kernel and length
  alternate, 3 x --repeats rounds (medians), so that a shared machine's drift falls
  on all of them alike."""
  fns, windows = {}, {}
  for kern, (cfg, dp) in kernels.items():
    V = cfg.model.vocab_size
    for c in contexts:
      W = windows[c] = max(min(256, 2 * (c - 34)), 2)   # centred, with a prompt >= 2 tokens
      prompt, lens = prompts(cfg, 1, max(c - 32 - W // 2, 2), seed=7, no_cot=False)
      for n in (32, 32 + W):
        dec = row_decoder(cfg, 0, n, 64 + W - n, V, V)       # the same capacity
        args = (dp.params, prompt, lens, jax.random.key(0))
        jax.block_until_ready(dec.run_cot(*args))            # compile + warm-up
        fns[kern, c, n] = (dec.run_cot, args)
  times = {key: [] for key in fns}
  for _ in range(3 * a.repeats):
    for key, (fn, args) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[key].append(time.perf_counter() - t0)
  med = {key: statistics.median(ts) for key, ts in times.items()}
  return {kern: {c: 1e3 * (med[kern, c, 32 + windows[c]] - med[kern, c, 32]) / windows[c]
                 for c in contexts}
          for kern in kernels}


# ----------------------------------------------------------------------------- analytic counts
#
# Per sequence (batch 1), from the config alone. FLOPs = 2 x the multiply-adds of
# the matrix products and attention dots; norms, RoPE, softmax and sampling (a
# few operations per element) are not counted. Bytes = what a pass must read:
# weights at decode.weights_dtype (read once per pass at batch 1, by a CPU or an
# accelerator alike), keys and values at model.dtype; writes are not counted.
# Attention is counted over the filled slots (`context`), not over the cache's
# capacity that XLA's masked dots also run over. Notation: D d_model, L layers,
# H / K heads / kv heads of dh, F mlp_dim, V vocab; the head: W width (its heads
# x head dim = W), F_h its SwiGLU width, L_h layers, S = len(head.source_layers).

def _wbytes(cfg: mt.Config) -> int:
  return np.dtype(jnp.dtype(cfg.decode.weights_dtype)).itemsize


def _abytes(cfg: mt.Config) -> int:
  return np.dtype(jnp.dtype(cfg.model.dtype)).itemsize


def main_layer_weights(cfg: mt.Config) -> int:
  """Matrix entries of one main layer: D H dh (q) + 2 D K dh (k, v) + H dh D (o)
  + 3 D F (SwiGLU)."""
  m = cfg.model
  D, H, K, dh = m.d_model, m.num_heads, m.num_kv_heads, m.dh
  return D * H * dh + 2 * D * K * dh + H * dh * D + 3 * D * m.mlp_dim


def main_pass_flops(cfg: mt.Config, T: int, context: int) -> float:
  """One main pass over T new tokens after `context` filled slots:
  T x 2 (L x main_layer_weights + D V) (the layers' matrices and the unembedding,
  logits at every new position) + sum over the block's tokens i = 0..T-1 of
  L x 2 x 2 H dh (context + i + 1) (scores and weighted values over the cache)."""
  m = cfg.model
  mats = 2 * T * (m.num_layers * main_layer_weights(cfg) + m.d_model * m.vocab_size)
  keys = T * context + T * (T + 1) // 2
  return float(mats + m.num_layers * 4 * m.num_heads * m.dh * keys)


def main_pass_bytes(cfg: mt.Config, context: int) -> float:
  """Bytes one main pass reads: every main matrix once, (L x main_layer_weights +
  V D) x weight bytes (the unembedding; the T embedding rows not counted), + the
  KV cache at `context`: 2 L K dh context x activation bytes."""
  m = cfg.model
  weights = (m.num_layers * main_layer_weights(cfg) + m.vocab_size * m.d_model) * _wbytes(cfg)
  return float(weights + 2 * m.num_layers * m.num_kv_heads * m.dh * context * _abytes(cfg))


def head_step_weights(cfg: mt.Config) -> int:
  """Head matrix entries one chain step reads: w_p (W + D) W + L_h (4 W^2 (q, k, v,
  o) + 3 W F_h (SwiGLU)) + w_o W D (where W != D); the projection head also
  recomputes its source r_t = W_r . sources at every step: + S D W."""
  m, h = cfg.model, cfg.head
  W, D = h.resolved_width(m), m.d_model
  n = (W + D) * W + h.num_layers * (4 * W * W + 3 * W * h.resolved_mlp_dim(m))
  n += W * D if W != D else 0
  return n + (0 if h.context else len(h.source_layers) * D * W)


def head_step_flops(cfg: mt.Config, k: int, context: int) -> float:
  """One chain step (one chain element x[t+1+j] through the head, and its logits):
  2 head_step_weights + 2 D V (the logits through the main model's unembedding:
  often the biggest term) + L_h x 2 x 2 W (k + context) (attention over the
  chain's k cached slots, all of which the step's masked dot runs over, and, for
  the head with context, over its memory of the `context` past positions)."""
  m, h = cfg.model, cfg.head
  W = h.resolved_width(m)
  mem = context if h.context else 0
  return float(2 * head_step_weights(cfg) + 2 * m.d_model * m.vocab_size
               + h.num_layers * 4 * W * (k + mem))


def head_memory_flops(cfg: mt.Config, k: int) -> float:
  """The head with context's memory work per block (0 for the projection head):
  the memory update of the block's k+1 new positions, (k+1) x 2 (S D W (W_r) +
  L_h 2 W^2 (each layer's keys and values)), + the chain's start, its source's
  memory entry: 2 S D W."""
  m, h = cfg.model, cfg.head
  if not h.context:
    return 0.0
  W, S = h.resolved_width(m), len(h.source_layers)
  return float((k + 1) * 2 * (S * m.d_model * W + h.num_layers * 2 * W * W)
               + 2 * S * m.d_model * W)


def head_block_flops(cfg: mt.Config, k: int, context: int) -> float:
  """The head's work per block: k x head_step_flops + head_memory_flops."""
  return k * head_step_flops(cfg, k, context) + head_memory_flops(cfg, k)


def head_step_bytes(cfg: mt.Config, k: int, context: int) -> float:
  """Bytes one chain step reads: (head_step_weights + V D (the unembedding)) x
  weight bytes, + the chain's KV cache, 2 L_h W k, and for the head with context
  its memory's keys and values at `context`, 2 L_h W context (x activation bytes)."""
  m, h = cfg.model, cfg.head
  W = h.resolved_width(m)
  mem = context if h.context else 0
  return float((head_step_weights(cfg) + m.vocab_size * m.d_model) * _wbytes(cfg)
               + 2 * h.num_layers * W * (k + mem) * _abytes(cfg))


def head_memory_bytes(cfg: mt.Config, k: int) -> float:
  """Bytes the head with context's memory work reads per block (0 for the
  projection head): W_r twice (the memory update and the chain's start, S D W
  each) + every layer's key and value matrices (L_h 2 W^2), x weight bytes."""
  m, h = cfg.model, cfg.head
  if not h.context:
    return 0.0
  W, S = h.resolved_width(m), len(h.source_layers)
  return float((2 * S * m.d_model * W + h.num_layers * 2 * W * W) * _wbytes(cfg))


def head_block_bytes(cfg: mt.Config, k: int, context: int) -> float:
  """Bytes the head reads per block: k x head_step_bytes + head_memory_bytes."""
  return k * head_step_bytes(cfg, k, context) + head_memory_bytes(cfg, k)


def head_cost(cfg: mt.Config, k: int, context: int) -> dict:
  """The head's FLOPs and bytes per block (k chain steps + the memory update) and
  one main pass's over 1 token, at `context`, batch 1; *_frac = head / main(1)."""
  hf, hb = head_block_flops(cfg, k, context), head_block_bytes(cfg, k, context)
  mf, mb = main_pass_flops(cfg, 1, context), main_pass_bytes(cfg, context)
  return {"k": k, "context": context, "head_flops": hf, "head_bytes": hb,
          "main1_flops": mf, "main1_bytes": mb,
          "main_block_flops": main_pass_flops(cfg, k + 1, context),
          "flops_frac": hf / mf, "bytes_frac": hb / mb}


# ----------------------------------------------------------------------------- per-pass costs
#
# Each piece is jitted alone and run PASSES times in a fori_loop whose carry (the
# KV cache, the chain, the head's memory, the logits) is donated: every call takes
# the last call's carry, updated in place, never copied (`time_carried`). Each
# iteration reads a value the last one produced, so none of its work is dead or
# loop-invariant (XLA could hoist it out of the loop).

def time_carried(fn, params, carry, *rest, repeats: int) -> float:
  """Median seconds of `fn(params, carry, *rest) -> (out, carry)`, the carry
  donated: each call gets the last call's carry."""
  box = [carry]

  def call():
    out, box[0] = fn(params, box[0], *rest)
    return out
  return time_fn(call, repeats=repeats)["median"]


@functools.lru_cache(maxsize=None)
def _main_carried_fn(dec: decode.Decoder):
  """PASSES of `Decoder.main_pass` alone (no head memory: head_state ()) over
  one (B, T) block, the cache carried (lengths restored after each pass, so that
  every pass appends at the same context). The block's tokens read the last
  pass's logits (a no-op), so that no layer's work is loop-invariant."""
  @functools.partial(jax.jit, donate_argnums=(1,))
  def passes(params, cache, block_BxT):
    def body(_, carry):
      c, acc = carry
      blk = block_BxT + (acc > 3e38).astype(jnp.int32)
      out = dec.main_pass(params, c, blk, None, ())
      return out.cache.replace(lengths=c.lengths), acc + out.logits[:, -1, 0].sum()
    cache, acc = jax.lax.fori_loop(0, PASSES, body, (cache, jnp.zeros((), jnp.float32)))
    return acc, cache
  return passes


@functools.lru_cache(maxsize=None)
def _chain_steps_fn(dec: decode.Decoder):
  """PASSES chain steps, each as `blocks.sample_head_chain` runs one:
  `head.chain_step` + `api.head_logits` + `sampling.sample`, the step's token the
  last step's sample. Step i is depth i mod k (each depth costs the same: the
  step's dots run over all k slots of the chain's cache, masked). The head's
  memory is the same at every step, as within one chain. Carry: (the chain, the
  token)."""
  head, k = dec.head, dec.k

  @functools.partial(jax.jit, donate_argnums=(1,))
  def steps(params, carry, head_state, key):
    def body(i, c):
      chain, tok, acc = c
      feats_BxD, chain = head.chain_step(params, head_state, chain, tok, i % k)
      tok, lp = sampling.sample(jax.random.fold_in(key, i),
                                api.head_logits(dec.cfg, params, feats_BxD), dec.sample)
      return chain, tok, acc + lp.sum()
    chain, tok, acc = jax.lax.fori_loop(0, PASSES, body,
                                        (*carry, jnp.zeros((), jnp.float32)))
    return acc, (chain, tok)
  return steps


@functools.lru_cache(maxsize=None)
def _chains_fn(dec: decode.Decoder):
  """PASSES whole chains of k samples, `blocks.sample_head_chain` as the CoT
  loop calls it (chain_start included), each after the last chain's final token
  (x1). As in the loop, where every main pass adds to the head's memory, each
  chain reads a memory the last iteration wrote to (one entry nudged by 1e-30 x
  the last log-probs: no change in value), so that no per-chain work on it is
  hoisted out of the loop; its sources are nudged likewise. Carry: (x1 (B,),
  the head state)."""
  @functools.partial(jax.jit, donate_argnums=(1,))
  def chains(params, carry, sources, lengths_B, key):
    keys = jax.random.split(key, dec.k)

    def body(_, c):
      x1, hs, acc = c
      nudge = 1e-30 * acc
      hs = tuple((hk.at[:, 0].add(nudge.astype(hk.dtype)), hv) for hk, hv in hs)
      src = tuple(s + nudge.astype(s.dtype) for s in sources)
      toks, lps = blocks.sample_head_chain(dec.head, params, hs, src, x1, keys, dec.sample,
                                           lengths_B)
      return toks[:, -1], hs, acc + lps.sum()
    x1, hs, acc = jax.lax.fori_loop(0, PASSES, body, (*carry, jnp.zeros((), jnp.float32)))
    return acc, (x1, hs)
  return chains


@functools.lru_cache(maxsize=None)
def _remember_fn(dec: decode.Decoder):
  """PASSES memory updates, `head.remember` of a block's T new positions at the
  same slots, the head's memory carried; the sources nudged by one entry the
  last update wrote (1e-30 x it). Carry: the head state."""
  @functools.partial(jax.jit, donate_argnums=(1,))
  def remember(params, head_state, sources_BxTxD, slots_BxT):
    def body(_, c):
      hs, acc = c
      src = tuple(s + (1e-30 * acc).astype(s.dtype) for s in sources_BxTxD)
      hs = dec.head.remember(params, hs, src, slots_BxT)
      keys = hs[0][0]
      return hs, acc + jax.lax.dynamic_index_in_dim(keys[0], slots_BxT[0, 0], 0, False)[0, 0]
    hs, acc = jax.lax.fori_loop(0, PASSES, body, (head_state, jnp.zeros((), jnp.float32)))
    return acc, hs
  return remember


@functools.lru_cache(maxsize=None)
def _sample_fn(s: sampling.Sampling):
  """PASSES of `sampling.sample` on (B, V) logits, each writing its log-prob into
  the logits the next one samples from (one entry). Carry: the logits."""
  @functools.partial(jax.jit, donate_argnums=(1,))
  def run(_, logits_BxV, key):
    def body(i, c):
      logits, acc = c
      tok, lp = sampling.sample(jax.random.fold_in(key, i), logits, s)
      return logits.at[:, 0].set(lp), acc + tok.sum()
    logits, acc = jax.lax.fori_loop(0, PASSES, body, (logits_BxV, jnp.zeros((), jnp.int32)))
    return acc, logits
  return run


@dataclasses.dataclass
class PassCostRow:
  """Microseconds per item at one (model, batch, context, k); nan where not measured."""
  model: str
  B: int
  context: int
  k: int
  main1_us: float           # Decoder.main_pass alone over (B, 1)
  main_block_us: float      # ... over (B, k+1)
  step_us: float            # one chain step + head logits + sampling
  chain_us: float           # sample_head_chain, k steps
  memory_us: float          # head.remember of k+1 positions (0: the projection head)
  sample_us: float          # sampling.sample on (B, V)
  native_main1_us: float = float("nan")
  native_main_block_us: float = float("nan")

  @property
  def ratio(self) -> float:
    """(chain + memory update) / main(1)."""
    return (self.chain_us + self.memory_us) / self.main1_us if self.k else float("nan")


def pass_costs(name: str, cfg: mt.Config, dp: decode.DecodeParams, B: int, ks, contexts, a,
               native_dp: decode.DecodeParams | None = None) -> list[PassCostRow]:
  """The per-pass cost breakdown of one (model, batch): at each context, for each
  k, the pieces of a CoT iteration timed apart (`time_carried`, PASSES per call,
  median of max(5, 3 x repeats) calls). The cache is empty but for its lengths
  (the context; a pass's time does not depend on the values it reads), its
  capacity context + max(k) + 1; the head's memory likewise (zeros, the same
  capacity); the sources random. XLA's masked dots (the main attention, the
  head's memory attention) run over the whole capacity, so the decode loops,
  whose capacity adds max_cot + max_answer + k + 2 slots to the prompt, pay for
  their empty slots too. With `native_dp`, the main passes again with
  decode.cpu_kernel=native (its prepared parameters). The head's pieces run
  through XLA whatever decode.cpu_kernel says."""
  m, params = cfg.model, dp.params
  reps = max(5, 3 * a.repeats)
  cfg_n = native_config(cfg) if native_dp is not None else None
  rng = np.random.default_rng(B)
  sources = tuple(jnp.asarray(rng.standard_normal((B, m.d_model)), m.dtype)
                  for _ in cfg.head.source_layers)
  key = jax.random.key(0)
  rows = []
  for c in contexts:
    cap = c + max(ks) + 1
    lengths = jnp.full((B,), c, jnp.int32)

    def cache():
      return KVCache.empty(m, B, cap).replace(lengths=jnp.copy(lengths))   # donated

    def main_us(T, conf=cfg, prm=params):
      dec = row_decoder(conf, 0, a.max_cot, a.max_answer, m.vocab_size)   # main_pass alone
      return 1e6 / PASSES * time_carried(_main_carried_fn(dec), prm, cache(),
                                         jnp.ones((B, T), jnp.int32), repeats=reps)
    main1 = main_us(1)
    native1 = main_us(1, cfg_n, native_dp.params) if cfg_n else float("nan")
    dec0 = row_decoder(cfg, 0, a.max_cot, a.max_answer, m.vocab_size)
    logits = jnp.asarray(rng.standard_normal((B, m.vocab_size)), jnp.float32)
    sample = 1e6 / PASSES * time_carried(_sample_fn(dec0.sample), None, logits, key,
                                         repeats=reps)
    for k in ks:
      if k == 0:
        rows.append(PassCostRow(name, B, c, 0, main1, main1, float("nan"), float("nan"),
                                float("nan"), sample, native1, native1))
        continue
      dec = row_decoder(cfg, k, a.max_cot, a.max_answer, m.vocab_size)
      head = dec.head
      main_blk = main_us(k + 1)
      native_blk = main_us(k + 1, cfg_n, native_dp.params) if cfg_n else float("nan")
      # fresh (donated), every array its own (decode_state shares one zeros array)
      state = lambda: jax.tree.map(jnp.copy, head.decode_state(B, cap))  # noqa: E731
      start = jax.jit(functools.partial(head.chain_start, k=k))
      # copied: the projection head's chain holds the sources themselves, and it is donated
      chain0 = jax.tree.map(jnp.copy, start(params, state(), sources, lengths))
      tok = lambda: jnp.full((B,), 7, jnp.int32)  # noqa: E731   (donated)
      step = 1e6 / PASSES * time_carried(_chain_steps_fn(dec), params, (chain0, tok()), state(),
                                         key, repeats=reps)
      chain = 1e6 / PASSES * time_carried(_chains_fn(dec), params, (tok(), state()), sources,
                                          lengths, key, repeats=reps)
      if cfg.head.context:   # the head with context: a memory to update
        src_T = tuple(jnp.asarray(rng.standard_normal((B, k + 1, m.d_model)), m.dtype)
                      for _ in cfg.head.source_layers)
        slots = lengths[:, None] + jnp.arange(k + 1, dtype=jnp.int32)
        memory = 1e6 / PASSES * time_carried(_remember_fn(dec), params, state(), src_T, slots,
                                             repeats=reps)
      else:
        memory = 0.0
      rows.append(PassCostRow(name, B, c, k, main1, main_blk, step, chain, memory, sample,
                              native1, native_blk))
  return rows


# ----------------------------------------------------------------------------- rows

@dataclasses.dataclass
class CotRow:
  model: str
  B: int
  k: int
  cot_tokens: int          # over the batch (phase == 0)
  iterations: int          # while_loop iterations (main passes after the prefill)
  forced: int              # sequences budget-forced
  t_run_cot: float         # s, prefill included
  t_prefill: float         # s
  main_block_ms: float = float("nan")   # one main pass over (B, k+1)
  main_one_ms: float = float("nan")     # one main pass over (B, 1)
  head_ms: float = float("nan")         # the head chain as the CoT loop draws it

  @property
  def t_cot(self) -> float:
    return max(self.t_run_cot - self.t_prefill, 1e-9)

  @property
  def tok_s(self) -> float:
    return self.cot_tokens / self.t_cot

  @property
  def iter_ms(self) -> float:
    return 1e3 * self.t_cot / max(self.iterations, 1)

  @property
  def other_ms(self) -> float:
    head = self.head_ms if self.k > 0 else 0.0
    return self.iter_ms - self.main_block_ms - head


def bench_cot(name, cfg, dp: decode.DecodeParams, B, k, a) -> CotRow:
  V = cfg.model.vocab_size
  P = a.prompt_len
  params = dp.params
  dec = row_decoder(cfg, k, a.max_cot, a.max_answer, V)
  prompt, lens = prompts(cfg, B, P, seed=B, no_cot=False)
  key = jax.random.key(0)
  t, st = timed(dec.run_cot, params, prompt, lens, key, repeats=a.repeats)
  # The raw loop state: slots at or past n_out hold a cut block's leftovers.
  written = np.arange(st.phase.shape[1])[None, :] < np.asarray(st.n_out)[:, None]
  cot_tokens = int(((np.asarray(st.phase) == 0) & written).sum())
  iterations = int(np.asarray(st.passes).max()) - 1
  prefill = _prefill_fn(dec)
  t_pre, st0 = timed(prefill, params, prompt, lens, key, repeats=a.repeats + 2)
  row = CotRow(name, B, k, cot_tokens, iterations, int(np.asarray(st.forced).sum()), t, t_pre)

  if not a.no_breakdown:
    # The prefill's cache (the loop's capacity) and head state, filled to mid-CoT.
    mid = jnp.full((B,), P + a.max_cot // 2, jnp.int32)
    cache, head_state = st0.cache.replace(lengths=mid), st0.head_state
    mps = _main_passes_fn(dec)
    reps = max(5, 3 * a.repeats)
    row.main_block_ms = 1e3 / PASSES * time_fn(
        mps, params, cache, head_state, jnp.ones((B, k + 1), jnp.int32), repeats=reps)["median"]
    row.main_one_ms = 1e3 / PASSES * time_fn(
        mps, params, cache, head_state, jnp.ones((B, 1), jnp.int32), repeats=reps)["median"]
    if k > 0:   # the chain at h after one more pass, as the loop's next iteration draws it
      out = _main_pass_fn(dec)(params, cache, head_state, jnp.ones((B, 1), jnp.int32))
      sources = tuple(s[:, -1] for s in out.sources)
      x1 = jnp.full((B,), 7, jnp.int32)
      row.head_ms = 1e3 * time_fn(_head_chain_fn(dec), params, out.head_state, sources, x1,
                                  mid + 1, key, repeats=reps)["median"]
  return row


def bench_answer(name, cfg, dp: decode.DecodeParams, B, a):
  """(tokens/s, tokens, seconds) of run_answer alone after a no-CoT prefill."""
  V = cfg.model.vocab_size
  params = dp.params
  dec = row_decoder(cfg, 0, a.max_cot, a.max_answer, V)
  prompt, lens = prompts(cfg, B, a.prompt_len, seed=100 + B, no_cot=True)
  st = jax.block_until_ready(dec.run_cot(params, prompt, lens, jax.random.key(0)))
  assert bool(np.all(np.asarray(st.cot_done))), "a no-CoT prompt should skip the CoT loop"
  t, res = timed(dec.run_answer, params, st, repeats=a.repeats)
  n = int((np.asarray(res.phase) == 1).sum())
  return n / t, n, t


def bench_hf(cfg: mt.Config, n_new: int, P: int, repeats: int):
  """tokens/s of transformers' LlamaForCausalLM.generate (greedy, batch 1), or a skip reason."""
  try:
    import torch
    import transformers
  except ImportError:
    return None, "skipped: pip install torch transformers"
  m = cfg.model
  hf_cfg = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads, head_dim=m.dh, rms_norm_eps=m.norm_eps,
      rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
      max_position_embeddings=max(2048, P + n_new), bos_token_id=1, eos_token_id=2,
      pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  ids = torch.tensor(np.asarray(prompts(cfg, 1, P, seed=1, no_cot=False)[0]), dtype=torch.long)
  mask = torch.ones_like(ids)

  def run():
    with torch.inference_mode():
      t0 = time.perf_counter()
      out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, pad_token_id=0)
      dt = time.perf_counter() - t0
    assert out.shape[1] - P == n_new, out.shape
    return dt

  run()
  t = statistics.median(run() for _ in range(repeats))
  info = (f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {sum(p.numel() for p in model.parameters())/1e6:.1f}M params")
  return n_new / t, info


# ----------------------------------------------------------------------------- main

def native_config(cfg: mt.Config) -> mt.Config:
  """`cfg` with the main passes in mtcot_jax.native's kernel (decode.cpu_kernel)."""
  return cfg.replace(decode={"cpu_kernel": "native", "weights_layout": "out_in"})


def print_head_cost(name: str, cfg: mt.Config, ks, contexts, results) -> None:
  """The head's FLOPs and bytes per block against one main pass over 1 token
  (`head_cost`: analytic, batch 1), for each k > 0 and context; into results["head_cost"]."""
  for k in ks:
    if k == 0:
      continue
    for c in contexts:
      r = head_cost(cfg, k, c)
      print(f"head/main FLOPs {r['flops_frac']:.2f}, bytes {r['bytes_frac']:.2f} (k={k}, context "
            f"{c}; the head per block {r['head_flops']/1e6:.2f} MFLOP, {r['head_bytes']/1e6:.2f} MB"
            f"; main(1) {r['main1_flops']/1e6:.2f} MFLOP, {r['main1_bytes']/1e6:.2f} MB)")
      results.setdefault("head_cost", []).append({"model": name, **r})


def print_pass_costs(name: str, cfg: mt.Config, params, dp: decode.DecodeParams, B: int, ks, a,
                     native_ok: bool, results) -> None:
  """`pass_costs` at --contexts, printed as one table (microseconds per item) with
  the analytic head/main fractions beside each row; into results["pass_costs"]."""
  native_dp = prepared(native_config(cfg), params)[0] if native_ok else None
  rows = pass_costs(name, cfg, dp, B, ks, a.contexts, a, native_dp)
  kind = "the head with context" if cfg.head.context else "the projection head"
  print(f"\n### {name}, batch {B}: per-pass costs, us per item ({kind}; XLA"
        + ("; native = the main passes with decode.cpu_kernel=native" if native_ok else "") + ")")
  print(f"{'context':>7} {'k':>2} {'main(1)':>8} {'main(k+1)':>9} {'step':>7} {'chain':>8} "
        f"{'chain/k':>7} {'memory':>7} {'sample':>6} {'(ch+mem)/main(1)':>16} | "
        f"{'head/main FLOPs':>15} {'bytes':>5}"
        + (f" | {'native main(1)':>14} {'main(k+1)':>9}" if native_ok else ""))
  f = lambda x, w: f"{'-':>{w}}" if x != x else f"{x:>{w}.0f}"  # noqa: E731
  for r in rows:
    an = head_cost(cfg, r.k, r.context) if r.k else None
    per_step = r.chain_us / r.k if r.k else float("nan")
    line = (f"{r.context:>7} {r.k:>2} {r.main1_us:>8.0f} {r.main_block_us:>9.0f} "
            f"{f(r.step_us, 7)} {f(r.chain_us, 8)} {f(per_step, 7)} "
            f"{f(r.memory_us, 7)} {r.sample_us:>6.1f} "
            + (f"{r.ratio:>16.2f}" if r.k else f"{'-':>16}") + " | "
            + (f"{an['flops_frac']:>15.2f} {an['bytes_frac']:>5.2f}" if an
               else f"{'-':>15} {'-':>5}"))
    if native_ok:
      line += f" | {r.native_main1_us:>14.0f} {r.native_main_block_us:>9.0f}"
    print(line)
    results.setdefault("pass_costs", []).append(
        {**dataclasses.asdict(r), "ratio": r.ratio,
         "head_flops_frac": an["flops_frac"] if an else 0.0,
         "head_bytes_frac": an["bytes_frac"] if an else 0.0})
  print("# main(1), main(k+1): Decoder.main_pass alone (no head memory) over a (B, 1) / (B, k+1)"
        " block at the context; step: one chain step as the draft loop runs it (head.chain_step +"
        " api.head_logits over the main unembedding + sampling.sample); chain: the whole k-step"
        " chain (decode.blocks.sample_head_chain, its start included); memory: head.remember of"
        " the block's k+1 new positions (the head with context; 0 for the projection head);"
        " sample: sampling.sample on (B, V) logits. Each jitted alone, 16 in a fori_loop, the"
        " carry donated; median. Caches (main and head memory) of capacity context + max k + 1"
        " (XLA's masked attention runs over the whole capacity). head/main FLOPs, bytes:"
        " analytic, batch 1 (head_cost: k steps + the memory update, over one main pass over 1"
        " token)."
        + (" native: the same main passes in mtcot_jax.native's kernel, which implements only the"
           " main model's pass (its Llama layers over the main KV cache; passes over more than"
           f" {native.MAX_ROWS} rows, B x T, go to XLA): the head's step, chain, memory update and"
           " sampling run through XLA with either decode.cpu_kernel, so the kernel's speed-up does"
           " not carry to them." if native_ok else ""))


def main(a) -> None:
  t_start = time.perf_counter()
  gpu = jax.default_backend() == "gpu"
  # decode.cpu_kernel=native rows: on a CPU backend with a C++ compiler, unless --no-native
  native_ok = jax.default_backend() == "cpu" and not a.no_native and native.compiler() is not None
  target = 5.0 if gpu else 2.0
  print(f"# decode benchmark: {cpu_info()}")
  print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  max_cot={a.max_cot} "
        f"max_answer={a.max_answer} prompt_len={a.prompt_len} repeats={a.repeats} greedy")
  results = {"backend": jax.default_backend(), "cot": [], "answer": [], "naive": [], "hf": None}
  k0_b1 = {}
  for name in a.models:
    cfg = load(name)
    ks = [k for k in a.ks if k <= cfg.head.k]
    params = api.init_params(cfg, jax.random.key(0))
    m = cfg.model
    print(f"\n## model {name}: d_model={m.d_model} layers={m.num_layers} heads={m.num_heads}/"
          f"{m.num_kv_heads} kv mlp={m.mlp_dim} vocab={m.vocab_size} | head width="
          f"{cfg.head.resolved_width(m)} layers={cfg.head.num_layers} k<={cfg.head.k} | "
          f"params main {n_params(params['main'])/1e6:.2f}M head "
          f"{n_params(params['head'])/1e6:.2f}M ("
          + ("the head with context)" if cfg.head.context else "the projection head)"))
    print_head_cost(name, cfg, ks, a.contexts, results)
    bw = memory_bandwidth(nbytes(params["main"]))
    nominal = nominal_bandwidth()
    print(f"memory bandwidth (jitted mat-vec over {nbytes(params['main'])/1e6:.1f} MB, the main "
          f"weights' size): {bw/1e9:.1f} GB/s" + (f"; nominal {nominal[0]}: "
                                                   f"{nominal[1]/1e12:.2f} TB/s" if nominal else ""))
    results.setdefault("bandwidth", {})[name] = bw
    dp, t_prep = prepared(cfg, params)
    print(f"decode.prepare_params (decode.weights_layout={cfg.decode.weights_layout} -> "
          f"{dp.layout}): {1e3*t_prep:.1f} ms per call (generate pays it per call unless given "
          "the prepared parameters; the rows below time the loops on prepared parameters)")
    results.setdefault("prepare_ms", {})[name] = 1e3 * t_prep
    for B in a.batch:
      if a.pass_costs_only:
        print_pass_costs(name, cfg, params, dp, B, ks, a, native_ok, results)
        continue
      rows = [bench_cot(name, cfg, dp, B, k, a) for k in ks]
      base = next((r for r in rows if r.k == 0), None)
      print(f"\n### {name}, batch {B}: CoT phase (run_cot, prefill subtracted)")
      print(f"{'k':>2} {'CoT tok':>7} {'iters':>5} {'forced':>6} {'run_cot ms':>10} {'prefill':>7} "
            f"{'tok/s':>8} {'vs k=0':>6} | {'ms/iter':>7} {'bound':>6} {'of bnd':>6} "
            f"{'main(k+1)':>9} {'main(1)':>7} {'ratio':>5} {'head':>6} {'other':>6}")
      mid = a.prompt_len + a.max_cot // 2
      for r in rows:
        ratio = r.tok_s / base.tok_s if base else float("nan")
        head = f"{r.head_ms:6.2f}" if r.k else f"{'-':>6}"
        bnd = bound_ms(cfg, params, B, mid, bw, r.k)
        print(f"{r.k:>2} {r.cot_tokens:>7} {r.iterations:>5} {r.forced:>3}/{B:<2} "
              f"{1e3*r.t_run_cot:>10.1f} {1e3*r.t_prefill:>7.2f} {r.tok_s:>8.1f} {ratio:>5.2f}x | "
              f"{r.iter_ms:>7.2f} {bnd:>6.2f} {bnd/r.iter_ms:>6.2f} "
              f"{r.main_block_ms:>9.2f} {r.main_one_ms:>7.2f} "
              f"{r.main_block_ms/r.main_one_ms:>4.2f}x {head} {r.other_ms:>6.2f}")
        results["cot"].append({**dataclasses.asdict(r), "tok_s": r.tok_s, "vs_k0": ratio,
                               "iter_ms": r.iter_ms, "other_ms": r.other_ms,
                               "bound_ms": bnd, "of_bound": bnd / r.iter_ms})
      if base is not None:   # the same k=0 loop reading bfloat16 weights (decode.weights_dtype)
        cfg16 = cfg.replace(decode={"weights_dtype": "bfloat16"})
        r16 = bench_cot(name, cfg16, prepared(cfg16, params)[0], B, 0,
                        argparse.Namespace(**{**vars(a), "no_breakdown": True}))
        bnd16 = bound_ms(cfg, params, B, mid, bw, weights_dtype="bfloat16")
        print(f"k=0, decode.weights_dtype=bfloat16: {r16.iter_ms:.2f} ms/iter, {r16.tok_s:.1f} tok/s "
              f"({r16.tok_s / base.tok_s:.2f}x float32's; its bound {bnd16:.2f} ms: "
              f"{bnd16 / r16.iter_ms:.2f} of it)")
        results.setdefault("bf16", []).append({"model": name, "B": B, "iter_ms": r16.iter_ms,
                                               "tok_s": r16.tok_s, "bound_ms": bnd16})
      ans_tps, ans_n, ans_t = bench_answer(name, cfg, dp, B, a)
      prompt, lens = prompts(cfg, B, a.prompt_len, seed=B, no_cot=False)
      naive_dec = row_decoder(cfg, 0, a.max_cot, a.max_answer, m.vocab_size)
      naive_tps, naive_t = naive_loop(naive_dec, dp, prompt, lens, a.max_cot, a.repeats)
      ans_pass = 1e3 * ans_t / max(ans_n // B - 1, 1)
      ans_bnd = bound_ms(cfg, params, B, a.prompt_len + a.max_answer // 2, bw)
      print(f"answer phase (run_answer): {ans_n} tokens in {1e3*ans_t:.1f} ms = {ans_tps:.1f} tok/s"
            f" ({ans_pass:.2f} ms/pass; bound {ans_bnd:.2f} ms: {ans_bnd/ans_pass:.2f} of it)")
      print(f"naive Python loop of a jitted 1-token step: {B*a.max_cot} tokens in "
            f"{1e3*naive_t:.1f} ms = {naive_tps:.1f} tok/s"
            + (f" (k=0 while_loop: {base.tok_s:.1f}, {base.tok_s/naive_tps:.2f}x)" if base else ""))
      if nominal:   # the same passes against the device's nominal bandwidth
        parts = [f"k={r.k} {bound_ms(cfg, params, B, mid, nominal[1], r.k) / r.iter_ms:.3f}"
                 for r in rows]
        parts.append(f"answer {bound_ms(cfg, params, B, a.prompt_len + a.max_answer // 2, nominal[1]) / ans_pass:.3f}")
        print(f"of the {nominal[0]}'s nominal {nominal[1]/1e12:.2f} TB/s bound: " + ", ".join(parts))
      other = "in_out" if dp.layout == "out_in" else "out_in"   # the other layout, same run
      cfg_o = cfg.replace(decode={"weights_layout": other})
      dp_o = prepared(cfg_o, params)[0]
      o_tps, o_n, o_t = bench_answer(name, cfg_o, dp_o, B, a)
      o_pass = 1e3 * o_t / max(o_n // B - 1, 1)
      print(f"answer phase, decode.weights_layout={other}: {o_pass:.2f} ms/pass "
            f"({ans_bnd/o_pass:.2f} of the bound; {dp.layout} is {o_pass/ans_pass:.2f}x as fast)")
      if base is not None:
        r_o = bench_cot(name, cfg_o, dp_o, B, 0, argparse.Namespace(**{**vars(a),
                                                                       "no_breakdown": True}))
        bnd0 = bound_ms(cfg, params, B, mid, bw)
        print(f"k=0 CoT loop, decode.weights_layout={other}: {r_o.iter_ms:.2f} ms/iter "
              f"({bnd0 / r_o.iter_ms:.2f} of the bound; {dp.layout} is "
              f"{r_o.iter_ms / base.iter_ms:.2f}x as fast)")
        results.setdefault("k0_other_layout", []).append(
            {"model": name, "B": B, "layout": other, "iter_ms": r_o.iter_ms, "bound_ms": bnd0})
      if B == 1 and not cfg.model.scan_layers:
        bnd_w = 1e3 * nbytes(params["main"]) / bw
        floors = {d.layout: weights_floor_ms(cfg, d, a.repeats) for d in (dp, dp_o)}
        print("the main weights' mat-vecs alone, chained (no attention, norms or sampling): "
              + ", ".join(f"{lay} {ms:.2f} ms/pass ({bnd_w / ms:.2f} of the weights' bound)"
                          for lay, ms in floors.items()))
        results.setdefault("weights_floor_ms", {})[name] = floors
      if native_ok:   # the same loops with the main passes in mtcot_jax.native's kernel
        cfg_n = native_config(cfg)
        dp_n = prepared(cfg_n, params)[0]
        quick_rows = argparse.Namespace(**{**vars(a), "no_breakdown": True})
        for r in rows:
          r_n = bench_cot(name, cfg_n, dp_n, B, r.k, quick_rows)
          bnd = bound_ms(cfg, params, B, mid, bw, r.k)
          print(f"k={r.k} CoT loop, decode.cpu_kernel=native: {r_n.iter_ms:.2f} ms/iter, "
                f"{r_n.tok_s:.1f} tok/s ({bnd / r_n.iter_ms:.2f} of the bound; "
                f"{r.iter_ms / r_n.iter_ms:.2f}x xla's {r.iter_ms:.2f})")
          results.setdefault("native_cot", []).append(
              {"model": name, "B": B, "k": r.k, "iter_ms": r_n.iter_ms, "tok_s": r_n.tok_s,
               "bound_ms": bnd, "xla_iter_ms": r.iter_ms})
        n_tps, n_n, n_t = bench_answer(name, cfg_n, dp_n, B, a)
        n_pass = 1e3 * n_t / max(n_n // B - 1, 1)
        print(f"answer phase, decode.cpu_kernel=native: {n_pass:.2f} ms/pass "
              f"({ans_bnd / n_pass:.2f} of the bound; {ans_pass / n_pass:.2f}x xla's "
              f"{ans_pass:.2f})")
        results.setdefault("native_answer", []).append(
            {"model": name, "B": B, "ms_pass": n_pass, "bound_ms": ans_bnd,
             "xla_ms_pass": ans_pass})
        if base is not None:   # the kernel reading bfloat16 weights (half the bytes)
          cfg_n16 = cfg_n.replace(decode={"weights_dtype": "bfloat16"})
          r_n16 = bench_cot(name, cfg_n16, prepared(cfg_n16, params)[0], B, 0, quick_rows)
          bnd16 = bound_ms(cfg, params, B, mid, bw, weights_dtype="bfloat16")
          print(f"k=0 CoT loop, decode.cpu_kernel=native, decode.weights_dtype=bfloat16: "
                f"{r_n16.iter_ms:.2f} ms/iter, {r_n16.tok_s:.1f} tok/s ({bnd16 / r_n16.iter_ms:.2f} "
                f"of its bound {bnd16:.2f} ms; {base.iter_ms / r_n16.iter_ms:.2f}x xla float32's)")
          results.setdefault("native_bf16", []).append(
              {"model": name, "B": B, "iter_ms": r_n16.iter_ms, "tok_s": r_n16.tok_s,
               "bound_ms": bnd16})
      results["answer"].append({"model": name, "B": B, "tok_s": ans_tps, "tokens": ans_n,
                                "seconds": ans_t, "ms_pass": ans_pass, "bound_ms": ans_bnd,
                                "of_bound": ans_bnd / ans_pass, "layout": dp.layout,
                                f"ms_pass_{other}": o_pass})
      results["naive"].append({"model": name, "B": B, "tok_s": naive_tps, "seconds": naive_t})
      best = max(rows, key=lambda r: r.k)
      if base and best.k > 0:
        ok = best.tok_s / base.tok_s >= target
        print(f"target k={best.k}/k=0 >= {target:.0f}x: {best.tok_s/base.tok_s:.2f}x "
              f"{'MET' if ok else 'NOT MET'}")
      if base and B == 1:
        k0_b1[name] = base.tok_s
      if not a.no_pass_costs:
        print_pass_costs(name, cfg, params, dp, B, ks, a, native_ok, results)

  if a.contexts and not a.pass_costs_only:
    name = "tiny" if a.quick else "25m"
    cfg = load(name)
    params = api.init_params(cfg, jax.random.key(0))
    # the run's one probe of this model's weights (a second probe read 60 and 91 GB/s
    # in one run: the best of 30 calls still moves on a shared machine)
    bw = results.get("bandwidth", {}).get(name) or memory_bandwidth(nbytes(params["main"]))
    dp, _ = prepared(cfg, params)
    print(f"\n## long context: {name}, k=0, batch 1, ms per token at a context of "
          f"(bandwidth {bw/1e9:.1f} GB/s)")
    kernels = {"xla": (cfg, dp)}
    if native_ok:
      cfg_n = native_config(cfg)
      kernels["native"] = (cfg_n, prepared(cfg_n, params)[0])
    per_kernel = bench_contexts(kernels, a.contexts, a)
    lo, hi = min(a.contexts), max(a.contexts)
    for kern, per in per_kernel.items():
      print(f"decode.cpu_kernel={kern}:")
      for c in a.contexts:
        bnd = bound_ms(cfg, params, 1, c, bw)
        print(f"{c:>6} tokens: {per[c]:.2f} ms/token (bound {bnd:.2f} ms: {bnd/per[c]:.2f} of it)")
      r = per[hi] / per[lo]
      print(f"{hi} / {lo}: {r:.2f}x (target <= 1.5x: {'MET' if r <= 1.5 else 'NOT MET'}; "
            f"the bound's own ratio "
            f"{bound_ms(cfg, params, 1, hi, bw)/bound_ms(cfg, params, 1, lo, bw):.2f}x)")
    results["context"] = {kern: {str(c): v for c, v in per.items()}
                          for kern, per in per_kernel.items()}

  if a.pass_costs_only:
    pass
  elif not a.no_hf and "25m" in a.models:
    cfg = load("25m")
    tps, info = bench_hf(cfg, a.max_cot, a.prompt_len, a.repeats)
    print(f"\n## Hugging Face LlamaForCausalLM.generate, 25m config, batch 1, {a.max_cot} new tokens")
    if tps is None:
      print(info)
    else:
      print(f"{tps:.1f} tok/s ({info})")
      results["hf"] = {"tok_s": tps, "info": info}
      if "25m" in k0_b1:
        r = k0_b1["25m"] / tps
        print(f"k=0 while_loop / HF generate: {r:.2f}x (target >= 3x: {'MET' if r >= 3 else 'NOT MET'})")
      native_b1 = [row["tok_s"] for row in results.get("native_cot", [])
                   if row["model"] == "25m" and row["B"] == 1 and row["k"] == 0]
      if native_b1:
        r = native_b1[0] / tps
        print(f"k=0 while_loop, decode.cpu_kernel=native / HF generate: {r:.2f}x "
              f"(target >= 3x: {'MET' if r >= 3 else 'NOT MET'})")
  elif a.no_hf:
    print("\nHF comparison: skipped (--no-hf or --quick)")
  print("\n# columns: tok/s = CoT tokens / (run_cot - prefill); ms/iter = that time / iterations;"
        " bound = the bytes a pass reads (main weights, KV cache at mid-CoT, k x the head's weights)"
        " / the measured bandwidth (best of 30 probe calls); of bnd = bound / ms/iter (a median);"
        " main(k+1), main(1) = one Decoder.main_pass over a (B, k+1) / (B, 1) block, cache carried"
        " in place (16 in a fori_loop); ratio = their"
        " quotient; head = the head chain as the loop draws it (decode.blocks.sample_head_chain);"
        " other = ms/iter - main(k+1) - head")
  print(f"# total {time.perf_counter() - t_start:.0f}s")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(ARGS)
