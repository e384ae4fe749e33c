"""Every decode mode on SmolLM2-135M-Instruct with its self-distilled heads (issue 26), in one run.

    .venv/bin/python benchmarks/llm.py                  # runs/smollm2/heads -> runs/smollm2/bench
    .venv/bin/python benchmarks/llm.py --quick --workdir /tmp/bench_heads --out /tmp/bench

The model is the GGUF (`make smollm2`); the heads are `train/distill.py`'s, in
WORKDIR/heads/{context,projection}. Prompts: held-out chat prompts, the last
problems of a GSM8K-format file (`jsonl`, split validation; the distillation
read the train split's first ones), or generated word problems from seed 10**6
when the file is missing. Greedy throughout.

Rows: k=0 (the main model alone); verified (verify=all) at each of --ks per head;
the CoT unverified and the answer verified (verify=answer, k=max(ks), tau=0); the
CoT unverified at k=max(ks) for each tau of --taus (head_threshold). Per row:
* acc: the task's grade of the answer-phase text (after the `Answer:` marker);
* same: the fraction of outputs token-identical to k=0's;
* tok/pass: sum(lengths) / sum(forward_passes) (the prefill counted as a pass);
  passes/k0: the row's passes over k=0's, on the same prompts;
* tok/s at batch 1 (the first --b1-prompts prompts) and at --batch (all
  --prompts): generated tokens over the wall time of warm `mt.generate` calls
  (each shape compiled by a call before; params prepared once per mode);
* head share: (chain + memory) / (chain + memory + main), timed apart at batch
  1 on the prefilled state of the first prompt with benchmarks/decode.py's
  pieces: `Decoder.main_pass` over k+1 tokens, the k-step
  `blocks.sample_head_chain`, and (the head with context) `head.remember` of
  the k+1 new positions, each 16 times in a carried fori_loop.
Peers (batch 1, the b1 prompts, float32, the same prompt ids, max_new_tokens =
max_cot + max_answer): transformers' greedy `generate` and its prompt-lookup
decoding (`prompt_lookup_num_tokens`); `same` there is the fraction whose
output begins with our k=0 output (up to where our CoT was closed by force).
torch's threads spin-wait: on cores another process keeps busy, 2 threads ran
SmolLM2 ~7x slower than 1 (--hf-threads); time the peers on an idle machine.

Writes OUT/bench.json, OUT/bench.md and OUT/bench.png (tokens per pass and
tokens/s at batch 1 against k, verified, both heads).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import decode as bench_decode  # noqa: E402   (benchmarks/decode.py)
from common import cpu_info  # noqa: E402

import mtcot_jax as mt  # noqa: E402
from mtcot_jax import decode  # noqa: E402

DATA = "/work/shared/data/gsm8k/train.jsonl"
HEADS = ("context", "projection")


def _parse(argv):
  from mtcot_jax.tools.smollm2 import cached_path
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gguf", default=cached_path(), help="default: make smollm2's cached file")
  p.add_argument("--workdir", default="runs/smollm2", help="train/distill.py's workdir")
  p.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
  p.add_argument("--data", default=DATA, help="a GSM8K-format .jsonl (its validation split)")
  p.add_argument("--prompts", type=int, default=32)
  p.add_argument("--b1-prompts", type=int, default=8)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--ks", nargs="+", type=int, default=[1, 3, 5])
  p.add_argument("--taus", nargs="+", type=float, default=[0.0, 0.5, 0.9])
  p.add_argument("--max-cot", type=int, default=192)
  p.add_argument("--max-answer", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3, help="timed calls per head-share piece")
  p.add_argument("--layout", choices=("in_out", "out_in"), default="in_out",
                 help="decode.weights_layout")
  p.add_argument("--kernel", choices=("xla", "native"), default="xla", help="decode.cpu_kernel")
  p.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens")
  p.add_argument("--hf-threads", type=int, default=0,
                 help="torch threads for the peers (0: torch's default, the host's cores)")
  p.add_argument("--no-hf", action="store_true", help="skip the transformers peers")
  p.add_argument("--out", default="runs/smollm2/bench")
  p.add_argument("--quick", action="store_true", help="2 prompts, max-cot 24: a smoke test")
  a = p.parse_args(argv)
  if a.quick:
    a.prompts, a.b1_prompts, a.max_cot, a.repeats = 2, 2, 24, 1
  if not a.gguf:
    p.error("no GGUF: run `make smollm2` or pass --gguf")
  a.batch = min(a.batch, a.prompts)
  a.prompts -= a.prompts % a.batch   # one shape per batch size: one compile
  a.b1_prompts = min(a.b1_prompts, a.prompts)
  return a


def _say(*a):
  print(*a, flush=True)


# --- prompts and modes ------------------------------------------------------------------

def held_out(run, args):
  """(task, examples, prompt (N, P), lengths (N,)): held-out chat prompts, one padded shape."""
  from mtcot_jax.data.catalog import get_task
  from mtcot_jax.train.distill import prompt_batches
  if os.path.exists(args.data):
    task, seeds = get_task("jsonl", path=args.data, split="validation"), range(args.prompts)
  else:
    _say(f"# no file at {args.data}: generated word problems (wordprob, ops=2) from seed 10**6")
    task, seeds = get_task("wordprob", ops=2), range(10**6, 10**6 + args.prompts)
  seeds = list(seeds)
  _, prompt, lens = next(prompt_batches(run, task, seeds, len(seeds)))
  return task, [task.example(s) for s in seeds], prompt, lens


def modes(args) -> list[dict]:
  """The rows, k=0 first (every other row is compared with it)."""
  def mode(head, k, verify, tau=0.0):
    what = {"all": "verified", "answer": "cot unverified, answer verified",
            "none": "unverified" + (f" tau={tau}" if k else "")}[verify]
    name = "k=0" if not k else f"{head} k={k} {what}"
    return {"name": name, "head": head, "k": k, "verify": verify, "tau": tau}
  K = max(args.ks)
  out = [mode("", 0, "none")]
  for h in args.heads:
    out += [mode(h, k, "all") for k in args.ks]
    out.append(mode(h, K, "answer"))
    out += [mode(h, K, "none", t) for t in args.taus]
  return out


# --- our decoding -----------------------------------------------------------------------

def timed_set(gen, prompt, lens, batch: int):
  """(the outputs, host arrays, rows in order; seconds) of warm calls of `gen` over
  the prompts in chunks of `batch` (the first chunk run once before: the compile)."""
  key = jax.random.key(0)
  jax.block_until_ready(gen(prompt[:batch], lens[:batch], key))
  outs, secs = [], 0.0
  for i in range(0, len(prompt), batch):
    t0 = time.perf_counter()
    res = jax.block_until_ready(gen(prompt[i:i + batch], lens[i:i + batch], key))
    secs += time.perf_counter() - t0
    outs.append(jax.tree.map(np.asarray, res))
  return jax.tree.map(lambda *x: np.concatenate(x), *outs), secs


def sequences(res) -> list[list[int]]:
  return [res.tokens[r, :res.lengths[r]].tolist() for r in range(len(res.lengths))]


def answer_texts(run, res) -> list[str]:
  """The answer phase of each output (after the marker), EOS dropped, as text."""
  eos = run.tokenizer.eos_id
  return [run.tokenizer.decode([t for t in res.tokens[r][res.phase[r] == 1] if t != eos])
          for r in range(len(res.lengths))]


def bench_mode(m: dict, run, models: dict, data, args, ref) -> tuple[dict, object, object]:
  """One row: accuracy, identity with `ref` (k=0's outputs), tokens per pass and
  tokens/s at both batch sizes. Returns (row, batch outputs, batch-1 outputs)."""
  task, examples, prompt, lens = data
  cfg, params = models[m["head"]]
  dp = decode.prepare_params(cfg, params)
  gen = functools.partial(
      mt.generate, cfg, dp, k=m["k"], verify=m["verify"], head_threshold=m["tau"],
      max_cot_tokens=args.max_cot, max_answer_tokens=args.max_answer, temperature=0.0,
      answer_markers=args.markers)
  t0 = time.perf_counter()
  res, secs = timed_set(gen, prompt, lens, args.batch)
  res1, secs1 = timed_set(gen, prompt[:args.b1_prompts], lens[:args.b1_prompts], 1)
  outs = sequences(res)
  ref = outs if ref is None else ref
  grades = [task.grade(t, ex) for t, ex in zip(answer_texts(run, res), examples)]
  row = {**m, "acc": float(np.mean(grades)),
         "same": float(np.mean([a == b for a, b in zip(outs, ref)])),
         "tokens": int(res.lengths.sum()), "passes": int(res.forward_passes.sum()),
         "tok_per_pass": float(res.lengths.sum() / res.forward_passes.sum()),
         "tok_s_b1": float(res1.lengths.sum() / secs1),
         "tok_s_batch": float(res.lengths.sum() / secs),
         "cot_forced": float(res.cot_forced.mean()), "finished": float(res.finished.mean()),
         "accepted": int(res.accepted.sum()), "seconds": round(time.perf_counter() - t0, 1)}
  return row, res, res1


def head_share(cfg, params, prompt, lens, k: int, args) -> dict:
  """Microseconds of one main pass over k+1 tokens, of the k-step head chain and of
  the head's memory update, at batch 1 on the prefilled state of `prompt` (1, P),
  in the unverified CoT loop's Decoder (greedy, the run's stop ids and markers)."""
  dp = decode.prepare_params(cfg, params).params
  dec = decode.decoder(decode.decode_config(
      cfg, k=k, max_cot_tokens=args.max_cot, max_answer_tokens=args.max_answer,
      temperature=0.0, head_threshold=0.0, verify="none", answer_markers=args.markers))
  st = bench_decode._prefill_fn(dec)(dp, jnp.asarray(prompt), jnp.asarray(lens),
                                     jax.random.key(0))
  copy = functools.partial(jax.tree.map, jnp.copy)   # every donated carry its own
  n = int(lens[0])
  us = lambda fn, carry, *rest: 1e6 / bench_decode.PASSES * bench_decode.time_carried(  # noqa: E731
      fn, dp, carry, *rest, repeats=args.repeats)
  main = us(bench_decode._main_carried_fn(dec), copy(st.cache), jnp.asarray(prompt[:, n - k - 1:n]))
  x1 = jnp.argmax(st.logits, -1).astype(jnp.int32)
  chain = us(bench_decode._chains_fn(dec), (x1, copy(st.head_state)), st.sources,
             st.cache.lengths, jax.random.key(1))
  memory = 0.0
  if st.head_state:   # the head with context: its memory of the block's k+1 positions
    src = tuple(jnp.repeat(s[:, None], k + 1, 1) for s in st.sources)
    slots = st.cache.lengths[:, None] + jnp.arange(k + 1, dtype=jnp.int32)
    memory = us(bench_decode._remember_fn(dec), copy(st.head_state), src, slots)
  head = chain + memory
  return {"main_us": main, "chain_us": chain, "memory_us": memory,
          "share": head / (head + main)}


# --- peers: transformers ----------------------------------------------------------------

def natural(res, r: int, max_cot: int) -> list[int]:
  """Our output r up to where its CoT was closed by force (all of it otherwise)."""
  toks = res.tokens[r, :res.lengths[r]].tolist()
  return toks[:max_cot] if res.cot_forced[r] else toks


def bench_hf(args, eos_id: int, prompt, lens, ref_res) -> list[dict]:
  """transformers' greedy generate and prompt-lookup decoding at batch 1 on the b1
  prompts: tokens/s, and the fraction of outputs that begin with our k=0 output."""
  import torch
  import transformers
  if args.hf_threads:
    torch.set_num_threads(args.hf_threads)
  t0 = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf),
      dtype=torch.float32).eval()
  load_s = round(time.perf_counter() - t0, 1)
  rows = []
  for name, extra in (("transformers generate", {}),
                      (f"transformers prompt lookup ({args.lookup})",
                       {"prompt_lookup_num_tokens": args.lookup})):
    kw = dict(max_new_tokens=args.max_cot + args.max_answer, do_sample=False, temperature=None,
              top_p=None, top_k=None, eos_token_id=eos_id, pad_token_id=eos_id, **extra)

    def gen(r):
      ids = torch.tensor(prompt[r:r + 1, :lens[r]], dtype=torch.long)
      with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, lens[r]:].tolist()
    gen(0)   # warm-up
    same, n, secs = [], 0, 0.0
    for r in range(args.b1_prompts):
      t = time.perf_counter()
      out = gen(r)
      secs += time.perf_counter() - t
      n += len(out)
      ours = natural(ref_res, r, args.max_cot)
      same.append(out[:len(ours)] == ours)
    rows.append({"name": name, "tokens": n, "tok_s_b1": n / secs, "same": float(np.mean(same)),
                 "load_s": load_s, "versions": f"transformers {transformers.__version__}, "
                 f"torch {torch.__version__}, {torch.get_num_threads()} threads"})
  return rows


# --- output -----------------------------------------------------------------------------

COLUMNS = ("mode", "acc", "same", "tok/pass", "passes/k0", "tok/s b1", "x k0 b1", "tok/s b{B}",
           "x k0 b{B}", "head share")


def table(rows: list[dict], peers: list[dict], batch: int) -> list[list[str]]:
  """The printed table's cells: our rows, then the peers (their ratios against k=0)."""
  k0 = rows[0]
  f = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
  cells = [[c.format(B=batch) for c in COLUMNS]]
  for r in rows:
    cells.append([r["name"], f(r["acc"], ".3f"), f(r["same"], ".3f"), f(r["tok_per_pass"], ".2f"),
                  f(r["passes"] / k0["passes"], ".3f"), f(r["tok_s_b1"], ".1f"),
                  f(r["tok_s_b1"] / k0["tok_s_b1"], ".2f"), f(r["tok_s_batch"], ".1f"),
                  f(r["tok_s_batch"] / k0["tok_s_batch"], ".2f"), f(r.get("share"), ".3f")])
  for p in peers:
    cells.append([p["name"], "", f(p["same"], ".3f"), "", "", f(p["tok_s_b1"], ".1f"),
                  f(p["tok_s_b1"] / k0["tok_s_b1"], ".2f"), "", "", ""])
  return cells


def text_table(cells) -> str:
  widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
  return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))) for row in cells)


def markdown_table(cells) -> str:
  lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells[1:]])


def plot(rows: list[dict], peers: list[dict], heads, path: str) -> None:
  """Tokens per pass and tokens/s at batch 1 against k (verified; k=0 shared)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(10, 4))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2)
  k0 = rows[0]
  for i, h in enumerate(heads):
    ver = [r for r in rows if r["head"] == h and r["verify"] == "all"]
    ks = [0] + [r["k"] for r in ver]
    for ax, key in zip(axes, ("tok_per_pass", "tok_s_b1")):
      ax.plot(ks, [k0[key]] + [r[key] for r in ver], marker="o", color=f"C{i}",
              label=f"{h} head, verified")
  for j, p in enumerate(peers):
    axes[1].axhline(p["tok_s_b1"], color=f"C{j + 2}", ls="--", label=p["name"])
  for ax, title, ylabel in ((axes[0], "Tokens committed per main pass", "tokens / pass"),
                            (axes[1], "Decoding speed, batch 1", "tokens / s")):
    ax.set_title(title)
    ax.set_xlabel("k (head tokens drafted per pass; 0 = main model alone)")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted({0, *(r["k"] for r in rows)}))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("SmolLM2-135M-Instruct, self-distilled heads, greedy verified decoding")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write(args, rows, peers, shares, info) -> None:
  """OUT/bench.json, bench.md (the table) and bench.png."""
  os.makedirs(args.out, exist_ok=True)
  cells = table(rows, peers, args.batch)
  settings = {k: v for k, v in vars(args).items() if k != "markers"}
  with open(os.path.join(args.out, "bench.json"), "w") as f:
    json.dump({"settings": settings, "info": info, "rows": rows, "peers": peers,
               "head_share": shares}, f, indent=1)
  cmd = " ".join(["python", "benchmarks/llm.py", *sys.argv[1:]])
  pieces = "; ".join(f"{name}: main {v['main_us']:.0f}, chain {v['chain_us']:.0f}, memory "
                     f"{v['memory_us']:.0f}" for name, v in shares.items())
  peer = f"Peers: {peers[0]['versions']}, loaded in {peers[0]['load_s']} s." if peers else ""
  with open(os.path.join(args.out, "bench.md"), "w") as f:
    f.write(f"`{cmd}`\n\n{info['device']}; {info['prompts']}\n\n{markdown_table(cells)}\n\n"
            f"Head share pieces, microseconds at batch 1: {pieces}. {peer}\n")
  plot(rows, peers, args.heads, os.path.join(args.out, "bench.png"))
  _say(text_table(cells))
  _say(f"# wrote {args.out}/bench.json, bench.md, bench.png")


def main(args) -> None:
  from mtcot_jax.data.chat import marker_ids
  from mtcot_jax.train.distill import load_head
  t0 = time.perf_counter()
  run = mt.load_gguf(args.gguf)
  set_decode = lambda c: c.replace(decode={"weights_layout": args.layout,  # noqa: E731
                                           "cpu_kernel": args.kernel})
  models = {"": (set_decode(run.cfg), run.params)}
  for h in args.heads:
    cfg, params = load_head(os.path.join(args.workdir, "heads", h), run)
    models[h] = (set_decode(cfg), params)
  args.markers = marker_ids(run.tokenizer)
  data = held_out(run, args)
  info = {"device": cpu_info(), "load_s": round(time.perf_counter() - t0, 1),
          "prompts": f"{args.prompts} held-out prompts ({data[0].name}), prompt length "
                     f"{data[2].shape[1]} padded; batch {args.batch}, batch 1 on the first "
                     f"{args.b1_prompts}; max_cot {args.max_cot}, max_answer {args.max_answer}"}
  _say(f"# {info['device']}; {info['prompts']}; markers {args.markers}")
  rows, ref, ref1, shares = [], None, None, {}
  eos = run.tokenizer.eos_id
  for m in modes(args):
    row, res, res1 = bench_mode(m, run, models, data, args, ref)
    if m["k"] and (m["head"], m["k"]) not in shares:
      shares[m["head"], m["k"]] = head_share(*models[m["head"]], data[2][:1], data[3][:1],
                                             m["k"], args)
    row["share"] = shares[m["head"], m["k"]]["share"] if m["k"] else 0.0
    if ref is None:
      ref, ref1 = sequences(res), res1
    rows.append(row)
    _say(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
  peers = [] if args.no_hf else bench_hf(args, eos, data[2], data[3], ref1)
  for p in peers:
    _say(json.dumps(p))
  write(args, rows, peers, {f"{h} k={k}": v for (h, k), v in shares.items()}, info)


if __name__ == "__main__":
  main(_parse(sys.argv[1:]))
