"""One-process GPU benchmark of a ~1B-parameter Llama-shaped model: what
benchmarks/gpu.sh runs on one H100 or H200 with only jax (CUDA), flax, optax,
orbax and chex installed (nothing here imports the data stack).

    python3 benchmarks/gpu.py --out gpu.jsonl            # the ~1B model, ~7 minutes
    python3 benchmarks/gpu.py --quick --out quick.jsonl  # tiny sizes on a CPU, < 2 minutes

Each measurement is appended to --out as one JSON line {"section": ..., ...} the
moment it is made (flushed): a run stopped by its time limit keeps what it
measured. Random weights throughout. Sections, in order:

  env     the device, its nominal peaks by device_kind (dense bf16 FLOP/s, HBM
          bytes/s; "unknown" elsewhere), versions, a measured mat-vec bandwidth.
  train   the real SFT step (forward, backward, AdamW): bf16 compute, float32
          parameters, scanned layers, remat dots, the head (k=5) at
          head.train_positions; model.attention=xla, then =cudnn, where the config
          has that field. Step time, tokens/s, MFU = 6 N tokens/s / peak (N: the main
          model's matrix entries, the tied unembedding's included) and the MFU of the
          counted FLOPs (3 x forward.flop_count: causal attention, the head's chains).
  decode  k=0 greedy decoding (Decoder.run_cot: bf16 weights and KV cache, a short
          prompt, max_cot tokens, an EOS never sampled; the prefill subtracted) at each
          batch: ms per pass (a token per row) and the fraction of the HBM bound: the
          main weights and the KV cache at the mean filled context, read once a pass,
          over the bandwidth (nominal where known, else the measured one).
  verify  verified k=5 (decode.verify=all) and unverified k=5 at batch 1: ms per
          pass, tokens per pass, tokens/s and the ratio to k=0's. With random weights
          the main model almost never accepts a draft: verified tokens/pass ~ 1.
  share   the head's share of a CoT pass at batch 1 (decode.py's pass_costs): the
          k-step draft chain against a main pass over 1 and k+1 tokens, each jitted
          alone, 16 to a call, its carry donated; the analytic FLOP and byte fractions.

Time: each section but env ends by a cumulative deadline from the start; a
measurement past its section's is written as {"skipped": ...}, not run. The
shell's `timeout` in gpu.sh is the hard stop.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import decode as bench  # noqa: E402   (benchmarks/decode.py)
from common import memory_bandwidth, time_fn  # noqa: E402
from forward import flop_count  # noqa: E402
from train import synthetic_batch  # noqa: E402   (benchmarks/train.py)

import mtcot_jax as mt  # noqa: E402
from mtcot_jax.config import ModelConfig  # noqa: E402
from mtcot_jax.train import losses, optim  # noqa: E402
from mtcot_jax.train.step import create_state  # noqa: E402

# The ~1.1B model of configs/tpu_v5e_256.yaml (1.091B parameters, 1.011B in the main
# model), written out so that the presets can change without changing this benchmark:
# 20 layers of d 2048, 16 heads of 128, 8 kv heads, SwiGLU 5632, 32768 tokens, tied.
M1B = ("model.vocab_size=32768", "model.d_model=2048", "model.num_layers=20",
       "model.num_heads=16", "model.num_kv_heads=8", "model.mlp_dim=5632",
       "model.rope_theta=500000.0", "model.tie_embeddings=true", "head.k=5", "head.num_heads=16")
TINY = ("model.vocab_size=256", "model.d_model=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.mlp_dim=128", "head.k=5", "head.width=32",
        "head.num_heads=2", "head.mlp_dim=64", "head.num_layers=1")

# (device_kind contains, dense bf16 FLOP/s, HBM bytes/s): datasheet figures, first match wins.
PEAKS = (("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100 NVL", 835e12, 3.9e12),
         ("H100", 989e12, 3.35e12), ("A100", 312e12, 2.0e12))

HAS_ATTENTION = "attention" in {f.name for f in dataclasses.fields(ModelConfig)}


@dataclasses.dataclass(frozen=True)
class Mode:
  model: tuple[str, ...]
  train_batch: int
  seq: int
  head_positions: int            # head.train_positions of the training step
  remat: str                     # model.remat of the training step
  batches: tuple[int, ...]       # k=0 decode batches
  max_cot: int
  prompt: int
  repeats: int
  budgets: tuple[tuple[str, float], ...]   # seconds per section, in order


# The step at 8 x 2048 tokens with remat dots: ~46 GiB by mtcot_jax.tools.memory
# (full remat: ~34); halved where it runs out of memory (`train_fitting`).
FULL = Mode(M1B, train_batch=8, seq=2048, head_positions=256, remat="dots",
            batches=(1, 8, 64), max_cot=128, prompt=8, repeats=5,
            budgets=(("train", 205), ("decode", 80), ("verify", 65), ("share", 50)))
QUICK = Mode(TINY, train_batch=4, seq=64, head_positions=16, remat="dots",
             batches=(1, 8, 64), max_cot=16, prompt=4, repeats=2,
             budgets=(("train", 50), ("decode", 30), ("verify", 20), ("share", 20)))


def _clean(v):
  """JSON-ready: floats to 4 significant digits, nan/inf to None, numpy scalars to Python."""
  v = v.item() if isinstance(v, (np.floating, np.integer)) else v
  if isinstance(v, float):
    return float(f"{v:.4g}") if math.isfinite(v) else None
  if isinstance(v, dict):
    return {k: _clean(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_clean(x) for x in v]
  return v


class Log:
  """Appends one JSON line per record to `path` (flushed at once) and prints it."""

  def __init__(self, path: str, budgets, scale: float):
    self.f = open(path, "a")
    self.t0 = time.perf_counter()
    names, seconds = zip(*budgets)
    self.ends = dict(zip(names, itertools.accumulate(t * scale for t in seconds)))

  def left(self, section: str) -> float:
    """Seconds before `section`'s cumulative deadline (a section with no budget: none)."""
    return self.ends.get(section, math.inf) - (time.perf_counter() - self.t0)

  def write(self, section: str, **rec) -> None:
    line = json.dumps(_clean({"section": section,
                              "t_s": time.perf_counter() - self.t0, **rec}))
    self.f.write(line + "\n")
    self.f.flush()
    print(line, flush=True)

  def measure(self, section: str, fn, **labels):
    """`fn()`'s dict written under `labels`; skipped past the section's deadline. A
    failure (out of memory, a kernel this build lacks) is written as {"error"} and
    returns None: one failed measurement must not lose the others."""
    if self.left(section) <= 0:
      self.write(section, **labels, skipped=f"past the section's deadline "
                                              f"({self.ends[section]:.0f} s from the start)")
      return None
    t0 = time.perf_counter()
    try:
      rec = fn()
    except Exception as e:  # noqa: BLE001 -- written out, the run goes on
      self.write(section, **labels, error=f"{type(e).__name__}: {str(e)[:600]}",
                 wall_s=time.perf_counter() - t0)
      return None
    self.write(section, **{**labels, **rec, "wall_s": time.perf_counter() - t0})
    return rec


# ----------------------------------------------------------------------------- env

def device_peaks() -> tuple[str, float | None, float | None]:
  """(device_kind, dense bf16 FLOP/s, HBM bytes/s) of the first device; None where unknown."""
  kind = getattr(jax.devices()[0], "device_kind", "") or jax.devices()[0].platform
  for name, flops, bw in PEAKS:
    if name in kind:
      return kind, flops, bw
  return kind, None, None


def env_info(matvec_bytes: int) -> dict:
  """The device, its nominal peaks, versions, and a mat-vec's bandwidth over that many bytes."""
  kind, flops, bw = device_peaks()
  stats = jax.devices()[0].memory_stats() or {}
  measured = memory_bandwidth(matvec_bytes)
  return {"device_kind": kind, "platform": jax.default_backend(), "devices": len(jax.devices()),
          "peak_bf16_flops": flops if flops else "unknown",
          "hbm_bytes_per_s": bw if bw else "unknown", "measured_matvec_bytes_per_s": measured,
          "memory_gb": stats.get("bytes_limit", 0) / 1e9 or None,
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "python": platform.python_version(), "model_attention_field": HAS_ATTENTION,
          "compilation_cache": getattr(jax.config, "jax_compilation_cache_dir", None),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


# ----------------------------------------------------------------------------- train

def train_config(mode: Mode, attention: str | None, batch: int) -> mt.Config:
  """The training step's config; `attention` sets model.attention (None: the build's
  default). Raises where the build has no such field."""
  cfg = mt.load_config(None, list(mode.model) + [
      "model.dtype=bfloat16", "model.param_dtype=float32", "model.scan_layers=true",
      f"model.remat={mode.remat}", f"data.seq_len={mode.seq}", f"train.batch_size={batch}",
      f"head.train_positions={mode.head_positions}"])
  if attention is None:
    return cfg
  if not HAS_ATTENTION:
    raise ValueError("fused attention: not available in this build (no model.attention)")
  return cfg.replace(model={"attention": attention})


def matrix_params(cfg: mt.Config) -> int:
  """N of 6 N: the main model's matrix entries, the layers' and the unembedding's."""
  return cfg.model.num_layers * bench.main_layer_weights(cfg) + \
      cfg.model.d_model * cfg.model.vocab_size


def train_step(cfg: mt.Config, repeats: int, peak: float | None) -> dict:
  """Times `losses.make_sft_step` on synthetic batches (benchmarks/train.py's)."""
  B, T = cfg.train.batch_size, cfg.data.seq_len
  opt = optim.make_optimizer(cfg)
  holder = {"state": create_state(cfg, opt, None)}
  n_params = {part: int(sum(x.size for x in jax.tree.leaves(holder["state"].params[part])))
              for part in ("main", "head")}
  step = losses.make_sft_step(cfg, None, opt)
  batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg, B, T))

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    return holder["state"], metrics

  t0 = time.perf_counter()
  _, metrics = jax.block_until_ready(run())
  first = time.perf_counter() - t0
  t = time_fn(run, warmup=1, repeats=repeats)["median"]
  loss = float(metrics["loss"])
  stats = jax.devices()[0].memory_stats() or {}
  f = flop_count(cfg, B, T, with_head=True)
  P = cfg.head.train_positions
  counted = 3 * (f["main_dense"] + f["attention_causal"] + f["unembed"]
                 + f["head"] * (min(P, T) / T if P else 1.0))
  tok_s = B * T / t
  six_n = 6 * matrix_params(cfg) * tok_s
  return {"batch": B, "seq": T, "remat": cfg.model.remat, "params_main": n_params["main"],
          "params_head": n_params["head"], "first_call_s": first, "step_ms": 1e3 * t,
          "tokens_per_s": tok_s, "model_tflops_6n": six_n / 1e12,
          "counted_tflops": counted / t / 1e12, "mfu": six_n / peak if peak else None,
          "mfu_counted": counted / t / peak if peak else None,
          "peak_gb_so_far": stats.get("peak_bytes_in_use", 0) / 1e9 or None, "loss": loss}


def train_fitting(mode: Mode, attention: str | None, repeats: int, peak) -> dict:
  """`train_step` at mode.train_batch, halved (twice at most) while it runs out of memory."""
  B, failed = mode.train_batch, []
  while True:
    try:
      return {**train_step(train_config(mode, attention, B), repeats, peak),
              "out_of_memory_at_batch": failed}
    except Exception as e:  # noqa: BLE001 -- only out-of-memory is retried
      oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
      if not oom or B == 1 or len(failed) == 2:
        raise
    failed.append(B)    # out of the except clause: the failed step's arrays are released
    B //= 2
    gc.collect()


def train_section(log: Log, mode: Mode, repeats: int, peak) -> None:
  """The step with model.attention=xla, then =cudnn (fused); in a build without
  that field, the default attention and a line saying fused attention is not there."""
  for attention in ("xla", "cudnn"):
    if HAS_ATTENTION or attention == "xla":
      impl = attention if HAS_ATTENTION else None
      log.measure("train", lambda: train_fitting(mode, impl, repeats, peak), attention=impl
                  or "the build's default (no model.attention field)")
    else:
      log.write("train", attention=attention,
                skipped="fused attention: not available in this build (no model.attention)")


# ----------------------------------------------------------------------------- decode

def decode_config(mode: Mode) -> mt.Config:
  """bf16 weights (stored so: no copy by prepare_params), activations and KV cache;
  unrolled layers (a scanned model reads each layer's weights and cache through
  dynamic-slices: docs/scaling.md, "The decode KV cache on accelerators")."""
  return mt.load_config(None, list(mode.model) + [
      "model.dtype=bfloat16", "model.param_dtype=bfloat16", "decode.weights_dtype=bfloat16"])


def pass_bytes(cfg: mt.Config, dp, B: int, context: float, k: int) -> float:
  """What one pass must read: every main weight (as stored), the KV cache at
  `context` filled slots, and for k > 0 the head's k chain steps (its weights and
  the unembedding each step, decode.head_step_bytes)."""
  kv = bench.kv_bytes(cfg, B, 1) * context
  head = k * bench.head_step_bytes(cfg, k, int(context)) if k else 0.0
  return bench.nbytes(dp.params["main"]) + kv + head


def decode_run(cfg: mt.Config, dp, mode: Mode, B: int, k: int, verify: str, bw: float) -> dict:
  """Decoder.run_cot (prefill + CoT loop) minus the prefill alone, each the fastest of
  warm calls; counts from the loop's own output."""
  V = cfg.model.vocab_size
  dec = bench.row_decoder(cfg, k, mode.max_cot, 1, V, verify=verify)
  prompt, lens = bench.prompts(cfg, B, mode.prompt, seed=B, no_cot=False)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  st = jax.block_until_ready(dec.run_cot(dp.params, prompt, lens, key))   # compiles
  # Fastest of the warm calls, for both: a busy host's noise only adds time.
  t_run = time_fn(dec.run_cot, dp.params, prompt, lens, key, repeats=mode.repeats)["min"]
  t_pre = time_fn(bench._prefill_fn(dec), dp.params, prompt, lens, key,
                  repeats=mode.repeats + 2)["min"]
  if t_run <= t_pre:
    raise RuntimeError(f"the loop took no time beyond its prefill (run_cot {t_run:.2e} s, "
                       f"prefill {t_pre:.2e} s): too noisy to measure; more --repeats")
  written = np.arange(st.phase.shape[1])[None, :] < np.asarray(st.n_out)[:, None]
  cot = int(((np.asarray(st.phase) == 0) & written).sum())
  passes = int(np.asarray(st.passes).max()) - 1
  t = t_run - t_pre
  per_pass = t / max(passes, 1)
  context = mode.prompt + cot / B / 2
  bound = pass_bytes(cfg, dp, B, context, k) / bw
  return {"batch": B, "k": k, "verify": verify, "cot_tokens": cot, "passes": passes,
          "tokens_per_pass": cot / B / max(passes, 1), "ms_per_pass": 1e3 * per_pass,
          "tokens_per_s": cot / t, "tokens_per_s_per_row": cot / B / t,
          "accepted_drafts": int(np.asarray(st.accepted).sum()),
          "forced": int(np.asarray(st.forced).sum()), "prefill_ms": 1e3 * t_pre,
          "bound_ms_per_pass": 1e3 * bound, "frac_of_bound": bound / per_pass,
          "wall_incl_compile_s": time.perf_counter() - t0}


def decode_sections(log: Log, mode: Mode, bw: float, bw_source: str) -> None:
  """The decode, verify and share sections on one set of bf16 weights."""
  model = {}

  def build():
    cfg = model["cfg"] = decode_config(mode)
    dp = model["dp"] = mt.prepare_params(cfg, mt.init_params(cfg, jax.random.key(0)))
    return {"params_main": sum(x.size for x in jax.tree.leaves(dp.params["main"])),
            "weight_bytes": bench.nbytes(dp.params["main"]), "bandwidth": bw,
            "bandwidth_source": bw_source}
  if log.measure("decode", build, what="setup") is None:
    return
  cfg, dp = model["cfg"], model["dp"]
  k0 = {}
  for B in mode.batches:
    k0[B] = log.measure("decode", lambda: decode_run(cfg, dp, mode, B, 0, "none", bw),
                        what="k0", batch=B)
  base = (k0.get(1) or {}).get("tokens_per_s")
  for verify in ("all", "none"):
    rec = log.measure("verify", lambda: decode_run(cfg, dp, mode, 1, cfg.head.k, verify, bw),
                      what=f"k{cfg.head.k}", batch=1)
    if rec and base:
      log.write("verify", what=f"k{cfg.head.k} vs k0", verify=verify, batch=1,
                speedup_tokens_per_s=rec["tokens_per_s"] / base)
  log.measure("share", lambda: head_share(cfg, dp, mode, 1), what="head share", batch=1)


def head_share(cfg: mt.Config, dp, mode: Mode, B: int) -> dict:
  """benchmarks/decode.py's per-pass costs at k = head.k, one context (mid-CoT)."""
  k, context = cfg.head.k, mode.prompt + mode.max_cot // 2
  a = argparse.Namespace(repeats=mode.repeats, max_cot=mode.max_cot, max_answer=1)
  row = [r for r in bench.pass_costs("gpu", cfg, dp, B, [k], [context], a) if r.k == k][0]
  an = bench.head_cost(cfg, k, context)
  return {"k": k, "context": context, "main1_us": row.main1_us,
          "main_block_us": row.main_block_us, "chain_us": row.chain_us,
          "chain_step_us": row.step_us, "sample_us": row.sample_us,
          "head_share_of_pass": row.chain_us / (row.chain_us + row.main_block_us),
          "chain_over_main1": row.ratio, "analytic_flops_frac": an["flops_frac"],
          "analytic_bytes_frac": an["bytes_frac"]}


# ----------------------------------------------------------------------------- main

def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test, < 2 min)")
  p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "gpu_results"), "gpu.jsonl"),
                 help="JSON lines appended here (default $OUT/gpu.jsonl)")
  p.add_argument("--budget-scale", type=float, default=1.0,
                 help="multiplies every section's time budget (default 1)")
  p.add_argument("--repeats", type=int, default=0, help="timed calls per row (0: the mode's)")
  a = p.parse_args(argv)
  if a.budget_scale <= 0 or a.repeats < 0:
    p.error(f"--budget-scale must be > 0 (got {a.budget_scale}) and --repeats >= 0 "
            f"(got {a.repeats})")
  return a


def main(argv=None) -> None:
  a = parse(argv)
  mode = QUICK if a.quick else FULL
  if a.repeats:
    mode = dataclasses.replace(mode, repeats=a.repeats)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  log = Log(a.out, mode.budgets, a.budget_scale)
  env = log.measure("env", lambda: env_info(16 << 20 if a.quick else 256 << 20),
                    mode="quick" if a.quick else "full")
  kind, peak, bw = device_peaks()
  if not bw:   # an unknown device: the bound over the mat-vec bandwidth measured in env
    bw = (env or {}).get("measured_matvec_bytes_per_s") or memory_bandwidth(16 << 20)
    bw_source = "measured mat-vec"
  else:
    bw_source = f"nominal ({kind})"
  train_section(log, mode, mode.repeats, peak)
  decode_sections(log, mode, bw, bw_source)
  log.write("done", total_s=time.perf_counter() - log.t0)


if __name__ == "__main__":
  main()
