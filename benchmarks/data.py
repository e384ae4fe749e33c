"""Input pipeline throughput beside the rate at which a training step consumes batches.

    .venv/bin/python benchmarks/data.py                   # configs/demo.yaml (or the defaults)
    .venv/bin/python benchmarks/data.py data.pack=true    # any config overrides

Times, in one run: (1) batches/s of `make_train_iterator` for the config (padding
and packing, one host), after a warm-up; (2) steps/s of a jitted forward+backward
of `mt.forward` on those batches (main cross-entropy on the CoT and answer
targets plus the head's per-depth cross-entropy; no optimizer update), which is
what a training step costs at least. Prints the ratio pipeline / step: above 1
the pipeline keeps up with the step; the pipeline must not be the bottleneck.
The data and tokenizer are prepared on first use under the data directory.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import cpu_info, time_fn  # noqa: E402

import mtcot_jax as mt  # noqa: E402
from mtcot_jax import data as mdata  # noqa: E402

DEMO = "configs/demo.yaml"


def pipeline_rate(cfg, tok, seconds: float = 3.0) -> tuple[float, object]:
  """Batches/s of the training iterator (after 5 warm-up batches), and a batch."""
  t0 = time.perf_counter()
  it = mdata.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  setup = time.perf_counter() - t0
  for _ in range(5):
    batch = next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    batch = next(it)
    n += 1
  rate = n / (time.perf_counter() - t0)
  print(f"  pipeline pack={cfg.data.pack!s:5}  {rate:9.1f} batches/s  "
        f"({rate * cfg.train.batch_size:9.0f} sequences/s; setup {setup:.1f} s, "
        f"{it.num_skipped} of {it.num_examples} examples skipped as too long)")
  return rate, batch


def _ce(logits_BxTxV, targets_BxT, mask_BxT):
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def make_step(cfg):
  """Jitted value_and_grad of an SFT-style loss over one batch."""
  def loss(params, batch):
    out = mt.forward(cfg, params, batch["inputs"], positions=batch["positions"],
                     segment_ids=batch["segment_ids"])
    mask = batch["cot_mask"] + batch["answer_mask"]
    total = _ce(out.logits, batch["targets"], mask)
    if out.head_features is not None:
      # Depth j at position t predicts inputs[t+1+j], a CoT target where cot_mask[t+j] is 1.
      for j in range(1, cfg.head.k + 1):
        logits = mt.head_logits(cfg, params, out.head_features[:, :, j - 1])
        targets = jnp.roll(batch["targets"], -j, axis=1)
        head_mask = jnp.roll(batch["cot_mask"], -j, axis=1).at[:, -j:].set(0.0)
        total = total + cfg.head.loss_weight * _ce(logits, targets, head_mask) / cfg.head.k
    return total
  return jax.jit(jax.value_and_grad(loss))


def main(argv: list[str]) -> None:
  path = DEMO if os.path.exists(DEMO) else None
  cfg = mt.load_config(path, argv)
  print(f"{cpu_info()}\nconfig: {path or 'defaults'} {' '.join(argv)}\n"
        f"  task {cfg.data.task} {dict(cfg.data.task_args)}, batch {cfg.train.batch_size} x "
        f"seq_len {cfg.data.seq_len}, model d={cfg.model.d_model} L={cfg.model.num_layers} "
        f"V={cfg.model.vocab_size}, head k={cfg.head.k}")
  tok = mdata.tokenizer_for(cfg)
  if tok.vocab_size > cfg.model.vocab_size:
    raise SystemExit(f"tokenizer has {tok.vocab_size} pieces > model.vocab_size")
  rates = {}
  for pack in (cfg.data.pack, not cfg.data.pack):
    rates[pack], batch = pipeline_rate(cfg.replace(data={"pack": pack}), tok)
    if pack == cfg.data.pack:
      step_batch = {k: jnp.asarray(v) for k, v in batch.items()}
  params = mt.init_params(cfg, jax.random.key(0))
  step = make_step(cfg)
  seconds = time_fn(step, params, step_batch, warmup=2, repeats=10)["median"]
  step_rate = 1.0 / seconds
  print(f"  train step (fwd+bwd)  {step_rate:9.1f} steps/s    ({seconds * 1e3:.1f} ms/step)")
  for pack, rate in rates.items():
    print(f"  ratio pipeline/step, pack={pack!s:5}: {rate / step_rate:8.1f}x"
          + ("   <- the config's mode" if pack == cfg.data.pack else ""))
  if rates[cfg.data.pack] < step_rate:
    print("  WARNING: the pipeline is slower than the step; try data.num_workers > 0")


if __name__ == "__main__":
  main(sys.argv[1:])
