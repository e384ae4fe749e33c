"""Self-distillation of a draft head on a frozen pretrained model (EAGLE / Medusa-2).

    python -m mtcot_jax.train.distill --gguf PATH --workdir runs/smollm2 \
        --data ../shared/data/gsm8k/train.jsonl --prompts 128

Three stages, each kept in the workdir and skipped when its file is there:

1. `responses.jsonl`: the model's own answers (k = 0, the project's decode loop)
   to N training prompts, greedy and sampled (T = 0.7), each prompt rendered by
   the model's chat template with the request for an `Answer:` line.
2. `sources.npz`: the frozen main model's residuals at the head's source layers
   over every (prompt + response) sequence, computed once (float16), with the
   main model's own greedy next token at each position. Training the head then
   never runs the 30-layer main model: the one thing that makes it fit on 2 cores.
3. `heads/<name>/`: each head trained on the cached residuals with the main model
   frozen (its embedding, norm and unembedding read as constants), on the
   response tokens only, over the draft vocabulary: the `draft_vocab` ids most
   frequent in the responses (FR-Spec; the stop ids always among them), so that a
   chain step's unembedding reads (D, N) instead of SmolLM2's (576, 49,154): one
   full-vocabulary step costs ~21% of a main pass. Saved as `hf.save_hf` saves a
   head (mtcot_head.safetensors, mtcot_config.yaml) plus `draft_ids.npy`.

`load_head(workdir, name, run)` gives the params to decode with: {"main", "head",
"draft": {"ids", "unembed"}} (`model.api.with_draft_vocab`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtcot_jax.config import Config
from mtcot_jax.model import api
from mtcot_jax.model.heads import head_for

HEADS = {
    # The head with context: one decoder layer of the model's own shape (width,
    # heads, MLP), EAGLE's draft; 1/30 of SmolLM2's layers. It attends to its
    # memory of every position.
    "context": {"context": -1},
    # The projection head (Medusa-like): the residual at the source only.
    "projection": {"context": 0},
}


def head_settings(name: str, model, k: int) -> dict:
  """The head section of draft head `name` on a model of config section `model`."""
  return {**HEADS[name], "k": k, "num_layers": 1, "width": 0, "num_heads": model.num_heads,
          "mlp_dim": model.mlp_dim, "source_layers": (-1,)}


def _say(*a):
  print(*a, flush=True)


# --- 1. responses ------------------------------------------------------------------

def prompt_batches(run, task, seeds, batch: int):
  """(seeds, prompt tokens (B, P), lengths (B,)) for the chat prompts of `seeds`."""
  from mtcot_jax.data.chat import chat_prompt
  for i in range(0, len(seeds), batch):
    chunk = seeds[i:i + batch]
    ids = [chat_prompt(run.tokenizer, run.chat_template, task.example(s).question)
           for s in chunk]
    P = max(map(len, ids))
    P = -(-P // 32) * 32   # few distinct shapes: few compiles
    prompt = np.zeros((len(ids), P), np.int32)
    for r, p in enumerate(ids):
      prompt[r, :len(p)] = p
    yield chunk, prompt, np.array([len(p) for p in ids], np.int32)


def respond(run, task, seeds, temperature: float, max_new: int, batch: int, key) -> list[dict]:
  """The model's own k = 0 responses (through its end-of-turn token or max_new)."""
  from mtcot_jax.decode import generate
  out = []
  for n, (chunk, prompt, lens) in enumerate(prompt_batches(run, task, seeds, batch)):
    res = jax.tree.map(np.asarray, generate(
        run.cfg, run.params, prompt, lens, jax.random.fold_in(key, n), k=0,
        temperature=temperature, max_cot_tokens=max_new, max_answer_tokens=1))
    for r, seed in enumerate(chunk):
      toks = res.tokens[r, :res.lengths[r]].tolist()
      toks = toks[:max_new]   # a forced </think> past the budget is not the model's
      text = run.tokenizer.decode(toks)
      ex = task.example(seed)
      out.append({"seed": int(seed), "temperature": temperature, "question": ex.question,
                  "reference": ex.answer, "prompt": prompt[r, :lens[r]].tolist(),
                  "response": toks, "text": text, "correct": grade(task, text, ex)})
  return out


def grade(task, text: str, example) -> float:
  """The task's grade of the text after the last `Answer:` (0 where there is none)."""
  from mtcot_jax.data.chat import MARKER
  return task.grade(text.rsplit(MARKER, 1)[1], example) if MARKER in text else 0.0


# --- 2. the frozen model's residuals -------------------------------------------------

def _forward_fn(cfg: Config):
  @jax.jit
  def fwd(params, tokens):
    out = api.apply(cfg, params, tokens, with_head=False)
    return tuple(s.astype(jnp.float16) for s in out.sources), jnp.argmax(out.logits, -1)
  return fwd


def cache_sources(run, cfg: Config, records: list[dict], batch: int = 4) -> dict:
  """tokens (N, T), the head's source residuals (S, N, T, D) float16, the main
  model's greedy next token (N, T), and `target` (N, T): 1 where x[t+1] is a
  response token (a target of the head's chain at t, depth 1)."""
  seqs = [r["prompt"] + r["response"] for r in records]
  T = -(-max(map(len, seqs)) // 64) * 64
  N = len(seqs)
  tokens = np.zeros((N, T), np.int32)
  target = np.zeros((N, T), np.int8)
  for i, (r, s) in enumerate(zip(records, seqs)):
    tokens[i, :len(s)] = s
    target[i, len(r["prompt"]) - 1:len(s) - 1] = 1
  fwd = _forward_fn(cfg)
  S, D = len(cfg.head.source_layers), cfg.model.d_model
  sources = np.zeros((S, N, T, D), np.float16)
  main_next = np.zeros((N, T), np.int32)
  for i in range(0, N, batch):
    rows = tokens[i:i + batch]
    pad = batch - len(rows)
    src, nxt = fwd(run.params, np.pad(rows, ((0, pad), (0, 0))))
    for s, x in enumerate(src):
      sources[s, i:i + batch] = np.asarray(x)[:len(rows)]
    main_next[i:i + batch] = np.asarray(nxt)[:len(rows)]
  return {"tokens": tokens, "sources": sources, "main_next": main_next, "target": target}


# --- 3. the head ----------------------------------------------------------------------

def draft_vocabulary(records: list[dict], size: int, always=()) -> np.ndarray:
  """The `size` ids most frequent in the responses (ties by id), `always` among them."""
  counts = collections.Counter(t for r in records for t in r["response"])
  ids = [int(i) for i in always]
  for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
    if len(ids) >= size:
      break
    if tok not in ids:
      ids.append(int(tok))
  taken = set(ids)
  spare = (i for i in range(size + len(taken)) if i not in taken)
  ids += [next(spare) for _ in range(size - len(ids))]   # fewer distinct tokens than asked
  return np.array(sorted(ids), np.int32)


def _index_of(ids: np.ndarray, vocab: int) -> np.ndarray:
  """(V,) the position of each id in `ids`, -1 for ids outside the draft vocabulary."""
  out = np.full((vocab,), -1, np.int32)
  out[ids] = np.arange(len(ids), dtype=np.int32)
  return out


def head_loss(cfg: Config, head, main, draft, batch, positions_BxP):
  """Mean over depths of the head's cross-entropy over the draft vocabulary at the
  chains run from `positions` (targets outside the draft vocabulary, or not
  response tokens, excluded), and per-depth sums for the metrics. The chain at
  source t reads x[t+1..t+k] and its depth j (1-based) predicts x[t+1+j], as in
  `losses.loss_and_metrics`."""
  k = cfg.head.k
  tokens = batch["tokens"]
  B, T = tokens.shape
  params = {"main": main, "head": head}
  sources = tuple(jnp.asarray(s, jnp.dtype(cfg.model.dtype)) for s in batch["sources"])
  full = api.chain_tokens(tokens, positions_BxP, k + 1)                    # x[t+1..t+k+1]
  pos_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  feats = head_for(cfg).features(params, sources, full[..., :k], pos_BxT, positions_BxP)
  take = lambda x: jnp.take_along_axis(x, positions_BxP, axis=1)  # noqa: E731
  shift = lambda x, j: take(jnp.pad(x[:, j:], ((0, 0), (0, j))))  # noqa: E731  x[t+j]
  index = draft["index"]
  total, sums = 0.0, {"loss": [], "acc": [], "accept": [], "n": []}
  for j in range(1, k + 1):
    tgt_ids = full[:, :, j]                                                # x[t+1+j]
    ok = shift(batch["target"], j) > 0          # target[u] = 1: x[u+1] is a response token
    tgt = index[tgt_ids]
    mask = (ok & (tgt >= 0)).astype(jnp.float32)
    logits = (feats[:, :, j - 1].astype(jnp.float32) @ draft["unembed"].astype(jnp.float32))
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, jnp.maximum(tgt, 0)[..., None], -1)[..., 0]
    pred = draft["ids"][jnp.argmax(logits, -1)]
    main_j = shift(batch["main_next"], j)        # the main model's greedy x[t+1+j]
    total = total + jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    okf = ok.astype(jnp.float32)
    sums["loss"].append(jnp.sum(ce * mask))
    sums["acc"].append(jnp.sum((pred == tgt_ids) * okf))
    sums["accept"].append(jnp.sum((pred == main_j) * okf))
    sums["n"].append(jnp.sum(okf))
  return total / k, {name: jnp.stack(v) for name, v in sums.items()}


def _positions(key, target_BxT, P: int):
  """P source positions per row, random among those with a depth-1 target."""
  score = jnp.where(target_BxT > 0, jax.random.uniform(key, target_BxT.shape), 2.0)
  return jnp.sort(jnp.argsort(score, axis=1)[:, :P], axis=1).astype(jnp.int32)


def train_head(cfg: Config, main, cache: dict, draft_ids: np.ndarray, *, steps: int,
               batch: int, lr: float, positions: int, seed: int = 0, log_every: int = 25):
  """Head parameters trained on the cached residuals (the main model frozen)."""
  key = jax.random.key(seed)
  head = api.init_head_params(cfg, key)
  draft = {"ids": jnp.asarray(draft_ids), "unembed": api.unembed_matrix(cfg, {"main": main})[
      :, draft_ids], "index": jnp.asarray(_index_of(draft_ids, cfg.model.vocab_size))}
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.1)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95,
                                                                 weight_decay=0.0))
  state = opt.init(head)

  @jax.jit
  def step(head, state, batch_, key):
    pos = _positions(key, batch_["target"], positions)
    (loss, sums), g = jax.value_and_grad(
        lambda h: head_loss(cfg, h, main, draft, batch_, pos), has_aux=True)(head)
    updates, state = opt.update(g, state, head)
    return optax.apply_updates(head, updates), state, loss, sums

  N = cache["tokens"].shape[0]
  rng = np.random.default_rng(seed)
  order, log, t0 = rng.permutation(N), [], time.perf_counter()
  for i in range(steps):
    if (i * batch) % N + batch > N:
      order = rng.permutation(N)
    rows = order[(i * batch) % N:(i * batch) % N + batch]
    b = {"tokens": cache["tokens"][rows], "target": cache["target"][rows],
         "main_next": cache["main_next"][rows],
         "sources": tuple(s[rows] for s in cache["sources"])}
    head, state, loss, sums = step(head, state, b, jax.random.fold_in(key, i))
    if (i + 1) % log_every == 0 or i in (0, steps - 1):
      s = jax.tree.map(np.asarray, sums)
      n = np.maximum(s["n"], 1)
      row = {"step": i + 1, "loss": float(loss), "acc": (s["acc"] / n).round(3).tolist(),
             "accept": (s["accept"] / n).round(3).tolist(),
             "seconds": round(time.perf_counter() - t0, 1)}
      log.append(row)
      _say(json.dumps(row))
  return head, log


# --- the head on disk ----------------------------------------------------------------

def save_head(path: str, cfg: Config, head, draft_ids: np.ndarray, log: list) -> None:
  """The head as `hf.save_hf` writes one (mtcot_head.safetensors, mtcot_config.yaml)
  plus draft_ids.npy and train_log.json; written beside `path`, then renamed."""
  from safetensors.numpy import save_file
  from mtcot_jax.config import save_config
  from mtcot_jax.hf import HEAD_WEIGHTS, _flat
  tmp = f"{path}.tmp-{os.getpid()}"
  os.makedirs(tmp, exist_ok=True)
  save_file(_flat(jax.device_get(head)), os.path.join(tmp, HEAD_WEIGHTS))
  save_config(cfg, os.path.join(tmp, "mtcot_config.yaml"))
  np.save(os.path.join(tmp, "draft_ids.npy"), np.asarray(draft_ids, np.int32))
  with open(os.path.join(tmp, "train_log.json"), "w") as f:
    json.dump(log, f)
  os.replace(tmp, path)


def load_head(path: str, run):
  """(cfg, params) to decode with: the run's main model, the head saved at `path`
  and its draft vocabulary (`api.with_draft_vocab`)."""
  from mtcot_jax.hf import load_head as load_hf_head
  cfg, head = load_hf_head(path)
  ids = np.load(os.path.join(path, "draft_ids.npy"))
  params = {"main": run.params["main"], "head": head}
  return cfg, api.with_draft_vocab(cfg, params, ids)


# --- the command ---------------------------------------------------------------------

def _task(data: str):
  from mtcot_jax.data.catalog import get_task
  if data.endswith(".jsonl"):
    return get_task("jsonl", path=data, split="train")
  return get_task("wordprob", ops=2)


def _write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path + ".tmp", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(path + ".tmp", path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def run_stages(args) -> dict:
  """The three stages (each skipped when its output exists); returns the timings."""
  from mtcot_jax.hf import load_gguf
  os.makedirs(args.workdir, exist_ok=True)
  times = {}
  t = time.perf_counter()
  run = load_gguf(args.gguf)
  times["load_gguf_s"] = round(time.perf_counter() - t, 1)
  task = _task(args.data)
  rpath = os.path.join(args.workdir, "responses.jsonl")
  if not os.path.exists(rpath):
    t = time.perf_counter()
    seeds = list(range(args.prompts))
    rows = []
    for i, temp in enumerate(args.temperatures):
      rows += respond(run, task, seeds, temp, args.max_new, args.batch, jax.random.key(i))
      _say(f"responses at T={temp}: {len(rows)} so far, {time.perf_counter() - t:.0f} s")
    _write_jsonl(rpath, rows)
    times["responses_s"] = round(time.perf_counter() - t, 1)
  records = _read_jsonl(rpath)
  _say(f"{len(records)} responses, {sum(len(r['response']) for r in records)} tokens, "
       f"answer correct {np.mean([r['correct'] for r in records]):.3f}")
  for name in args.heads:
    out = os.path.join(args.workdir, "heads", name)
    if os.path.exists(out):
      continue
    cfg = run.cfg.replace(head=head_settings(name, run.cfg.model, args.k))
    cpath = os.path.join(args.workdir, "sources.npz")
    if not os.path.exists(cpath):
      t = time.perf_counter()
      np.savez(cpath + ".tmp.npz", **cache_sources(run, cfg, records))
      os.replace(cpath + ".tmp.npz", cpath)
      times["sources_s"] = round(time.perf_counter() - t, 1)
    cache = dict(np.load(cpath))
    ids = draft_vocabulary(records, args.draft_vocab, always=(run.tokenizer.eos_id,))
    t = time.perf_counter()
    head, log = train_head(cfg, run.params["main"], cache, ids, steps=args.steps,
                           batch=args.train_batch, lr=args.lr, positions=args.positions)
    times[f"train_{name}_s"] = round(time.perf_counter() - t, 1)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_head(out, cfg, head, ids, log)
  with open(os.path.join(args.workdir, "distill_times.json"), "a") as f:
    f.write(json.dumps(times) + "\n")
  _say(json.dumps(times))
  return times


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gguf", required=True, help="the model (make smollm2 prints SmolLM2's path)")
  p.add_argument("--workdir", default="runs/smollm2")
  p.add_argument("--data", default="wordprob",
                 help="a GSM8K-format .jsonl (its train split), or 'wordprob'")
  p.add_argument("--prompts", type=int, default=128)
  p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7])
  p.add_argument("--max-new", type=int, default=192)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
  p.add_argument("--k", type=int, default=5)
  p.add_argument("--draft-vocab", type=int, default=4096)
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--train-batch", type=int, default=8)
  p.add_argument("--positions", type=int, default=96)
  p.add_argument("--lr", type=float, default=1e-3)
  run_stages(p.parse_args(argv))


if __name__ == "__main__":
  main()
