"""The `decode.py` command line.

  python decode.py --checkpoint runs/demo --prompt "20341:34012 03142 31204 32104" --k 5
  python decode.py --checkpoint runs/demo --prompts-file questions.txt --temperature 0.7
  python decode.py --checkpoint runs/demo --examples 8        # validation examples, graded
  python decode.py --checkpoint runs/demo --examples 500 --split test   # a final number
  python decode.py --checkpoint runs/demo --examples 64 --verify all   # lossless, fewer passes
  python decode.py --checkpoint runs/demo --examples 64 decode.max_cot_tokens=64 --output out.jsonl
  python decode.py --config configs/small.yaml --prompt "578*823"   # random parameters

Prints each chain of thought with, under it, the module that wrote each token
(0 main model, j head depth j), the answer, the forward passes and tokens/s.
Questions are in the task's format: `perm` a start state and permutations of
01234 (`20341:34012 03142 31204 32104`); `mult` operands written least
significant digit first (`578*823` asks for 875 x 328). When a question parses
as one of the run's task, the right answer is printed beside the model's, with
a note if training never showed such a question (another size, a leading zero).
`--output` also writes one JSON line per question: question, cot, answer, tokens
(the generated ids), passes (forward passes), correct (null without a reference).

`section.key=value` overrides change the preset with `--config`; with
`--checkpoint` only `decode.*` (the run's model, head, data and training are its
own). Flags such as `--k` take precedence over both.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from absl import logging as absl_logging
import jax
import numpy as np

from mtcot_jax.errors import ConfigError, user_errors
from mtcot_jax.config import load_config, parse_override
from mtcot_jax.data import encode_prompt
from mtcot_jax.data.catalog import task_for
from mtcot_jax.data.tasks import Example
from mtcot_jax.decode import generate, prepare_params
from mtcot_jax.model import init_params
from mtcot_jax.train.evaluate import answer_text, render


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="a run's workdir (train.workdir)")
  src.add_argument("--config", help="a preset YAML: decode with random parameters")
  q = p.add_mutually_exclusive_group(required=True)
  q.add_argument("--prompt", action="append", help="a question (repeatable)")
  q.add_argument("--prompts-file", help="a file with one question per line")
  q.add_argument("--examples", type=int, help="decode and grade the first N examples of "
                 "--split")
  p.add_argument("--k", type=int, default=None, help="head tokens per CoT block (default: head.k)")
  p.add_argument("--split", choices=["validation", "test"], default=None,
                 help="the held-out split --examples reads (default data.eval_split: "
                      "validation unless the run's config says test)")
  p.add_argument("--no-cot", action="store_true", help="prompt with <think> </think>: no CoT")
  p.add_argument("--temperature", type=float, default=None)
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--head-threshold", type=float, default=None,
                 help="adaptive blocks: cut a CoT block before the first head token with "
                      "probability below this (default decode.head_threshold; 0: fixed k)")
  p.add_argument("--verify", choices=["none", "answer", "all"], default=None,
                 help="verified phases (default decode.verify): the head drafts, the main "
                      "model keeps what it would write itself; 'all' is a lossless CoT")
  p.add_argument("--max-cot-tokens", type=int, default=None)
  p.add_argument("--max-answer-tokens", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=64, help="questions decoded at once")
  p.add_argument("--output", help="also write one JSON line per question to this file")
  p.add_argument("overrides", nargs="*",
                 help="section.key=value (with --checkpoint: decode.key=value only)")
  return p.parse_args(argv)


def _decode_overrides(overrides) -> dict:
  """{key: value} of `decode.key=value` overrides; raises ConfigError naming any
  other section's key (a run's model and head have its parameters' shapes)."""
  changes = {}
  for text in overrides:
    section, key, value = parse_override(text)
    if section != "decode":
      raise ConfigError(f"override {text!r}: {section}.{key} is the run's own and cannot be "
                        "changed with --checkpoint; accepted: decode.* overrides only (e.g. "
                        "decode.max_cot_tokens=64), or --config for another model")
    changes[key] = value
  return changes


def _load(args):
  if args.checkpoint:
    changes = _decode_overrides(args.overrides)
    from mtcot_jax.train.checkpoint import load_run   # orbax: imported when a run is read
    run = load_run(args.checkpoint)
    cfg = run.cfg.replace(decode=changes) if changes else run.cfg
    return cfg, run.params, run.tokenizer
  from mtcot_jax.data import tokenizer_for
  cfg = load_config(args.config, args.overrides)
  return cfg, init_params(cfg, jax.random.key(args.seed)), tokenizer_for(cfg)


def _questions(args, cfg, tok):
  """The questions to decode (and their Examples with --examples)."""
  if args.examples:
    from mtcot_jax.data import make_eval_batches
    if args.split:
      cfg = cfg.replace(data={"eval_split": args.split})
    batch = make_eval_batches(cfg, tok, args.examples, args.examples, cot=not args.no_cot)[0]
    return [ex.question for ex in batch["examples"]], batch["examples"]
  if args.prompts_file:
    if not os.path.isfile(args.prompts_file):
      raise FileNotFoundError(f"--prompts-file {args.prompts_file}: no such file")
    with open(args.prompts_file, errors="replace") as f:
      questions = [line.strip() for line in f if line.strip()]
    if not questions:
      raise ValueError(f"--prompts-file {args.prompts_file} holds no question; accepted: a "
                       "text file with one question per line")
    return questions, None
  return args.prompt, None


def _encode(tok, questions, cfg, no_cot: bool, source: str) -> list[list[int]]:
  limit = cfg.data.seq_len
  ids = []
  for i, q in enumerate(questions):
    try:
      row = encode_prompt(tok, q, cot=not no_cot)
    except ValueError as e:
      raise ValueError(f"{source}, question {i + 1}: {e}") from None
    if len(row) > limit:
      raise ValueError(f"{source}, question {i + 1} is {len(row)} tokens long: the run was "
                       f"trained on sequences of data.seq_len={limit} tokens (question, CoT "
                       f"and answer); accepted: questions of at most {limit} tokens")
    ids.append(row)
  return ids


@user_errors
def main(argv=None):
  args = parse_args(argv)
  if args.batch_size < 1:
    raise ValueError(f"--batch-size={args.batch_size}; accepted: an int >= 1")
  if args.output and os.path.isdir(args.output):
    raise ValueError(f"--output {args.output} is a directory; accepted: a file path")
  absl_logging.set_verbosity(absl_logging.ERROR)   # tfds/orbax info lines drown the output
  cfg, params, tok = _load(args)
  task = task_for(cfg.data)
  questions, examples = _questions(args, cfg, tok)
  source = args.prompts_file or ("--examples" if args.examples else "--prompt")
  ids = _encode(tok, questions, cfg, args.no_cot, source)
  P = max(map(len, ids))                            # one prompt length: one compile
  kw = dict(k=args.k, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            max_cot_tokens=args.max_cot_tokens, max_answer_tokens=args.max_answer_tokens,
            eos_id=tok.eos_id, think_end_id=tok.think_end_id, head_threshold=args.head_threshold,
            verify=args.verify)
  key = jax.random.key(args.seed)
  params = prepare_params(cfg, params)   # decode.weights_dtype/_layout: once for every batch
  results, dt = [], 0.0
  for start in range(0, len(ids), args.batch_size):
    chunk = ids[start:start + args.batch_size]
    prompt = np.zeros((min(args.batch_size, len(ids)), P), np.int32)   # one batch shape
    prompt[:, 0] = tok.bos_id                       # rows past the chunk: BOS alone
    lengths = np.ones(prompt.shape[0], np.int32)
    for i, row in enumerate(chunk):
      prompt[i, : len(row)] = row
      lengths[i] = len(row)
    step_key = jax.random.fold_in(key, start)
    if start == 0:
      generate(cfg, params, prompt, lengths, step_key, **kw)     # compile once
    t0 = time.perf_counter()
    res = jax.tree.map(np.asarray, generate(cfg, params, prompt, lengths, step_key, **kw))
    dt += time.perf_counter() - t0
    results += [jax.tree.map(lambda x, i=i: x[i], res) for i in range(len(chunk))]
  k = args.k if args.k is not None else (cfg.decode.k if cfg.decode.k >= 0 else cfg.head.k)
  correct, records = [], []
  for i, (q, r) in enumerate(zip(questions, results)):
    n = r.lengths
    cot_n = int(np.sum(r.phase == 0))
    score = None
    print(f"[{i}] question: {q}")
    if cot_n:
      print("    CoT (under each character: 0 main model, j head depth j):")
      text, marks = render(tok, r.tokens, r.source, r.phase, cot_n).split("\n")
      print("      " + text + "\n      " + marks)
    answer = answer_text(tok, r.tokens, r.phase, n)
    line = f"    answer: {answer!r}"
    ref = (examples[i].answer, "") if examples is not None else task.reference(q)
    if ref is not None:
      score = task.grade(answer, examples[i] if examples is not None else
                         Example(q, "", ref[0]))
      correct.append(score)
      line += f"   reference: {ref[0]!r}   {'correct' if score else 'wrong'}"
    print(line)
    if ref is not None and ref[1]:
      print(f"    note: outside the training distribution: {ref[1]}")
    print(f"    forward passes: {r.forward_passes}  tokens: {n} (CoT {cot_n})  "
          f"finished: {bool(r.finished)}  drafts kept by verification: {r.accepted}")
    records.append({"question": q, "cot": tok.decode(r.tokens[:cot_n]), "answer": answer,
                  "tokens": [int(t) for t in r.tokens[:n]], "passes": int(r.forward_passes),
                  "correct": None if score is None else bool(score)})
  total = int(sum(r.lengths for r in results))
  passes = int(sum(r.forward_passes for r in results))
  verify = args.verify or cfg.decode.verify
  print(f"k={k} verify={verify}: {total} tokens in {dt:.3f}s = {total / dt:.1f} tokens/s "
        f"(batches of {min(args.batch_size, len(ids))}, after compilation); mean forward "
        f"passes {passes / len(results):.2f}, tokens per pass {total / passes:.2f}")
  if correct:
    print(f"accuracy: {np.mean(correct):.3f} over {len(correct)} questions with a reference")
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"wrote {len(records)} lines to {args.output}")
