"""Teacher-forced forward+backward throughput of the main model and the multi-token head.

    .venv/bin/python benchmarks/forward.py            # demo + ~50M configs (~4 min, 2 cores)
    .venv/bin/python benchmarks/forward.py --quick    # tiny sizes, a smoke test (~25 s)
    ... --variants   # + the ~50M model with a narrower head (head.width=128)
    ... --profile    # + per-op time of the ~50M step by model part and op kind

For each config it times one jitted `value_and_grad` of the SFT-style loss

    loss = CE(main logits) + mean_j CE(head_logits(head_features[:, :, j]))

and reports tokens/s, the FLOP/s achieved by an analytic matmul count (`flop_count`)
and by XLA's own count, and the ratio of the former to a large float32 matmul
measured around every timed step (other processes may share the cores). Each
config runs with and without the head, so the head's share of a step can be read off.
The ~50M model uses the library's default head (width = d_model, mlp 4x width);
the demo uses its preset's head (width 64).

FLOP counting (see `flop_count`): 2 FLOPs per multiply-add of every matmul; the
attention scores QK^T and the mix AV over the full T x T square (XLA computes
the masked half too; the causally needed half is printed alongside); backward
= 2x forward (dX and dW per matmul). Norms, RoPE, softmax, the embedding gather
and the losses' elementwise work are not counted (XLA's count includes them).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import (cpu_info, hlo_instructions, matmul_flops, op_times,  # noqa: E402
                    time_with_matmul_probe, xla_flops)

import mtcot_jax as mt  # noqa: E402
from mtcot_jax.model import api  # noqa: E402
from mtcot_jax.model.head import head_dims  # noqa: E402

DEMO = "configs/demo.yaml"
# ~50M parameters in the main model (the head adds ~5M at its default width D).
M50 = ["model.vocab_size=1024", "model.d_model=512", "model.num_layers=16",
       "model.num_heads=8", "model.num_kv_heads=4", "model.mlp_dim=1376"]


# ----------------------------------------------------------------------------- FLOPs

def flop_count(cfg: mt.Config, B: int, T: int, with_head: bool) -> dict[str, float]:
  """Forward matmul FLOPs of one teacher-forced pass of B sequences of length T.

  main_dense: per layer and token 2*D*(H+2K)*Dh (q, k, v) + 2*H*Dh*D (o) + 3*2*D*F (SwiGLU)
  attention:  per layer 2 * 2*B*H*T*T*Dh (QK^T and AV over the full square)
  unembed:    2*B*T*D*V
  head:       N = B*T chains of C = k tokens:
                2*N*S*D*W (w_r, once per chain) + 2*N*C*(W+D)*W (w_p)
              + per head layer: the same block terms at width W over C tokens,
                attention over the full C x C square
              + 2*N*C*W*D (w_o, only if W != D) + 2*N*C*D*V (k unembeddings in the loss)
  Also returns attention_causal: the attention term over the T(T+1)/2 needed pairs.
  """
  m, h = cfg.model, cfg.head
  D, H, K, Dh, F, V, L = m.d_model, m.num_heads, m.num_kv_heads, m.dh, m.mlp_dim, m.vocab_size, \
      m.num_layers
  tokens = B * T

  def block_dense(n_tok, D, H, K, Dh, F):
    return 2 * n_tok * (D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F)

  def attn(n_seq, T, H, Dh, causal=False):
    pairs = T * (T + 1) / 2 if causal else T * T
    return 2 * 2 * n_seq * H * pairs * Dh

  out = {
      "main_dense": L * block_dense(tokens, D, H, K, Dh, F),
      "attention": L * attn(B, T, H, Dh),
      "attention_causal": L * attn(B, T, H, Dh, causal=True),
      "unembed": 2 * tokens * D * V,
      "head": 0.0,
  }
  if with_head and h.k > 0:
    hd = head_dims(m, h)
    W, C, S = hd.d_model, h.k, len(h.source_layers)
    N = tokens
    head = 2 * N * S * D * W + 2 * N * C * (W + D) * W
    head += h.num_layers * (block_dense(N * C, W, hd.num_heads, hd.num_kv_heads, hd.head_dim,
                                        hd.mlp_dim) + attn(N, C, hd.num_heads, hd.head_dim))
    if W != D:
      head += 2 * N * C * W * D
    head += 2 * N * C * D * V
    out["head"] = head
  out["forward"] = out["main_dense"] + out["attention"] + out["unembed"] + out["head"]
  return out


def param_count(tree) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- loss

def _ce(logits_BxTxV, targets_BxT, mask_BxT):
  """Mean cross-entropy over the masked-in positions (float32)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  nll_BxT = -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
  return jnp.sum(nll_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def make_loss(cfg: mt.Config, with_head: bool):
  """loss(params, tokens) = CE(main) + mean over depths j of CE(head depth j)."""

  def loss(params, tokens_BxT):
    B, T = tokens_BxT.shape
    out = api.apply(cfg, params, tokens_BxT, with_head=with_head)
    pos = jnp.arange(T)
    # Main: logits at t predict x[t+1].
    total = _ce(out.logits[:, :-1], tokens_BxT[:, 1:],
                jnp.ones((B, T - 1), jnp.float32))
    if with_head and cfg.head.k > 0:
      head_losses = []
      for j in range(cfg.head.k):
        # Depth j at source t predicts x[t+2+j]; positions past the end are masked.
        shift = 2 + j
        logits_BxTxV = mt.head_logits(cfg, params, out.head_features[:, :, j])
        targets_BxT = jnp.take(tokens_BxT, jnp.minimum(pos + shift, T - 1), axis=1)
        mask_BxT = jnp.broadcast_to((pos + shift < T).astype(jnp.float32), (B, T))
        head_losses.append(_ce(logits_BxTxV, targets_BxT, mask_BxT))
      total = total + sum(head_losses) / len(head_losses)
    return total

  return loss


# ----------------------------------------------------------------------------- bench

@dataclasses.dataclass
class Row:
  name: str
  config: str
  params: int
  B: int
  T: int
  seconds: float
  flops: dict[str, float]
  xla: float | None
  times: list[float]
  mm: list[float]         # the matmul rate around each timed step
  cpu: list[float]        # CPU seconds of each timed step
  mm_cpu: list[float]     # matmul FLOP per CPU second around each timed step

  @property
  def tokens_per_s(self) -> float:
    return self.B * self.T / self.seconds

  @property
  def achieved(self) -> float:  # FLOP/s of forward+backward by the analytic count
    return 3 * self.flops["forward"] / self.seconds

  @property
  def ratio(self) -> float:  # median over steps of (achieved / the matmul rate around it)
    return statistics.median(3 * self.flops["forward"] / t / m for t, m in zip(self.times, self.mm))

  @property
  def cpu_ratio(self) -> float:  # the same with CPU time in place of wall time
    return statistics.median(3 * self.flops["forward"] / c / m
                             for c, m in zip(self.cpu, self.mm_cpu))


def bench(name: str, config: str, cfg: mt.Config, B: int, T: int, with_head: bool, repeats: int,
          params=None, mm_n: int = 2048) -> Row:
  params = mt.init_params(cfg, jax.random.key(0)) if params is None else params
  tokens = jax.random.randint(jax.random.key(1), (B, T), 1, cfg.model.vocab_size, jnp.int32)
  step = jax.jit(jax.value_and_grad(make_loss(cfg, with_head))).lower(params, tokens).compile()
  t = time_with_matmul_probe(step, params, tokens, warmup=1, repeats=repeats, n=mm_n)
  n = param_count(params) if with_head else param_count(params["main"])
  return Row(name, config, n, B, T, t["median"], flop_count(cfg, B, T, with_head), xla_flops(step),
             t["times"], t["mm"], t["cpu"], t["mm_cpu"])


def print_table(rows: list[Row]) -> None:
  hdr = (f"{'config':<26} {'params':>8} {'B x T':>8} {'tokens/s':>8} {'step ms':>8} "
         f"{'GFLOP/s':>8} {'XLA GFLOP/s':>11} {'mm GFLOP/s':>10} {'ratio':>6} {'cpu ratio':>9} "
         f"{'head %F':>7}")
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    xla_rate = f"{r.xla / r.seconds / 1e9:11.1f}" if r.xla else f"{'n/a':>11}"
    print(f"{r.name:<26} {r.params / 1e6:7.2f}M {f'{r.B}x{r.T}':>8} {r.tokens_per_s:8.0f} "
          f"{r.seconds * 1e3:8.1f} {r.achieved / 1e9:8.1f} {xla_rate} "
          f"{statistics.median(r.mm) / 1e9:10.1f} {r.ratio:6.3f} {r.cpu_ratio:9.3f} "
          f"{100 * r.flops['head'] / r.flops['forward']:6.1f}%")
  print("GFLOP/s: the analytic count (fwd+bwd) / median step time. mm GFLOP/s: the float32 "
        "n^3 matmul (n=2048)\nrate measured around each timed step (median). ratio: median over "
        "steps of GFLOP/s / mm GFLOP/s.\ncpu ratio: the same with process CPU seconds in "
        "place of wall seconds (steadier when other\nprocesses share the cores).")
  spread = max(max(r.mm) for r in rows) / min(min(r.mm) for r in rows)
  if spread > 1.3 or os.getloadavg()[0] > (os.cpu_count() or 1) + 0.5:
    print(f"WARNING: the matmul rate varied {spread:.1f}x during the run (load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): other processes share the "
          "cores,\nso wall-time ratios are unreliable; prefer the cpu ratio or rerun on an "
          "idle machine.")


def print_breakdown(rows: list[Row]) -> None:
  print("\nforward+backward GFLOP per step by component (analytic, 3x forward):")
  keys = ("main_dense", "attention", "unembed", "head")
  print(f"{'config':<22} " + " ".join(f"{k:>11}" for k in keys)
        + f" {'total':>9} {'XLA':>9} {'attn causal':>11}")
  for r in rows:
    xla = f"{r.xla / 1e9:9.2f}" if r.xla else f"{'n/a':>9}"
    print(f"{r.name:<22} " + " ".join(f"{3 * r.flops[k] / 1e9:11.2f}" for k in keys)
          + f" {3 * r.flops['forward'] / 1e9:9.2f} {xla} {3 * r.flops['attention_causal'] / 1e9:11.2f}")


def head_share(rows: list[Row]) -> None:
  print("\nhead's share of the step (time with head - time without) / time with head:")
  no_head = {r.config: r for r in rows if r.flops["head"] == 0}
  for r in rows:
    base = no_head.get(r.config)
    if r.flops["head"] > 0 and base is not None and (base.B, base.T) == (r.B, r.T):
      share = (r.seconds - base.seconds) / r.seconds
      print(f"  {r.name:<22} time {100 * share:5.1f}%   FLOPs "
            f"{100 * r.flops['head'] / r.flops['forward']:5.1f}%")


# ----------------------------------------------------------------------------- profile

def _scope(info, T: int) -> str:
  op_name = info["op_name"]
  where = ("bwd" if "transpose(jvp" in op_name else "fwd")
  if "MultiTokenHead" in op_name:
    part = "head"
  elif "Transformer" in op_name:
    if "/attn/" in op_name:
      # The T x T part (scores, mask, softmax, mix) vs the projections and RoPE.
      core = "bkgts" in op_name or any(len(sh) >= 2 and sh[-2:] == (T, T)
                                       for sh in info["shapes"])
      part = "main attn TxT" if core else "main attn proj"
    else:
      part = "main mlp" if "/mlp/" in op_name else "main other"
  else:
    part = "loss+unembed"
  return f"{part} {where}"


def _kind(info) -> str:
  if info["dot_flops"] > 0:
    return "matmul"
  if "transpose" in info["kinds"] or "copy" in info["kinds"]:
    return "transpose/copy"
  if "gather" in info["kinds"] or "scatter" in info["kinds"]:
    return "gather/scatter"
  return "elementwise/reduce"


def profile(cfg: mt.Config, B: int, T: int, with_head: bool, params) -> None:
  """Per-op time of one step, grouped by model part and op kind; matmul GFLOP/s per group."""
  tokens = jax.random.randint(jax.random.key(1), (B, T), 1, cfg.model.vocab_size, jnp.int32)
  compiled = jax.jit(jax.value_and_grad(make_loss(cfg, with_head))).lower(params, tokens).compile()
  instrs = hlo_instructions(compiled.as_text())
  times = {k: v for k, v in op_times(compiled, params, tokens).items() if k in instrs}
  total = sum(times.values())
  secs, flops = collections.Counter(), collections.Counter()
  for name, t in times.items():
    info = instrs[name]
    key = (_scope(info, T), _kind(info))
    secs[key] += t
    flops[key] += info["dot_flops"]
  kinds = collections.Counter()
  for (scope, kind), t in secs.items():
    kinds[kind] += t
  print(f"\nper-op profile, {B}x{T}, head={'on' if with_head else 'off'}: op time summed over "
        f"threads {total:.2f} s (ops of the two cores overlap, so this exceeds the wall time)")
  print("  by kind: " + ", ".join(f"{k} {100 * t / total:.1f}%" for k, t in kinds.most_common()))
  print(f"  {'part':<18} {'kind':<19} {'s':>7} {'share':>6} {'GFLOP':>7} {'GFLOP/s':>8}")
  for (scope, kind), t in sorted(secs.items(), key=lambda kv: -kv[1]):
    if t / total < 0.005:
      continue
    f = flops[(scope, kind)]
    rate = f"{f / t / 1e9:8.1f}" if f else ""
    print(f"  {scope:<18} {kind:<19} {t:7.3f} {100 * t / total:5.1f}% {f / 1e9:7.1f} {rate}")
  top = sorted(times.items(), key=lambda kv: -kv[1])[:8]
  print("  largest ops:")
  for name, t in top:
    info = instrs[name]
    f = info["dot_flops"]
    rate = f" {f / t / 1e9:6.1f} GFLOP/s" if f else ""
    print(f"    {t * 1e3:7.1f} ms {name:<26} {info['op_name'][:70]}{rate}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8, help="batch size of the ~50M config")
  p.add_argument("--seq", type=int, default=256, help="sequence length of the ~50M config")
  p.add_argument("--demo-batch", type=int, default=32, help="batch size of the demo config")
  p.add_argument("--demo-seq", type=int, default=128, help="sequence length of the demo config")
  p.add_argument("--repeats", type=int, default=3, help="timed steps per row (median)")
  p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
  p.add_argument("--skip-50m", action="store_true", help="only the demo config")
  p.add_argument("--variants", action="store_true",
                 help="also the ~50M model with a narrower head (head.width=128)")
  p.add_argument("--profile", action="store_true",
                 help="per-op time breakdown of the ~50M step with its head")
  args = p.parse_args(argv)

  m50, narrow = list(M50), ["head.width=128", "head.num_heads=2"]
  mm_n = 2048
  if args.quick:
    args.batch, args.seq, args.demo_batch, args.demo_seq, args.repeats = 2, 32, 4, 32, 2
    m50 = m50[:1] + ["model.d_model=128", "model.num_layers=2", "model.num_heads=4",
                     "model.num_kv_heads=2", "model.mlp_dim=256"]
    narrow, mm_n = ["head.width=32", "head.num_heads=2"], 512

  print(cpu_info(), f"; load average {os.getloadavg()[0]:.1f}")
  mm = matmul_flops(mm_n)
  print(f"float32 matmul {mm_n}^3 (jitted, best of 5) at the start: {mm / 1e9:.1f} GFLOP/s\n")

  # (row name, group: rows of one main model and shape, cfg, B, T, with_head)
  demo = mt.load_config(DEMO)
  runs = [("demo", "demo", demo, args.demo_batch, args.demo_seq, True),
          ("demo", "demo", demo, args.demo_batch, args.demo_seq, False)]
  if not args.skip_50m:
    # The library's default head (width = d_model, 4 heads, mlp 4x), not the demo's.
    big = mt.load_config(None, m50)
    runs += [("50M", "50M", big, args.batch, args.seq, True),
             ("50M", "50M", big, args.batch, args.seq, False)]
    if args.variants:
      w = mt.load_config(None, m50 + narrow)
      runs.append((f"50M head W={w.head.resolved_width(w.model)}", "50M", w, args.batch,
                   args.seq, True))
  rows, params = [], {}
  for name, group, cfg, B, T, with_head in runs:
    if cfg not in params:
      params = {cfg: mt.init_params(cfg, jax.random.key(0))}  # one model in memory at a time
    label = f"{name} {'k=%d +head' % cfg.head.k if with_head else 'no head'}"
    rows.append(bench(label, group, cfg, B, T, with_head, args.repeats, params[cfg], mm_n))
    print(f"  {label}: {rows[-1].seconds:.2f} s/step", flush=True)

  print()
  print_table(rows)
  print_breakdown(rows)
  head_share(rows)
  if args.profile and not args.skip_50m:
    profile(big, args.batch, args.seq, True, mt.init_params(big, jax.random.key(0)))
  print(f"\nfloat32 matmul at the end: {matmul_flops(mm_n) / 1e9:.1f} GFLOP/s; "
        f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
