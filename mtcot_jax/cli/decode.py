"""The `decode.py` command line.

  python decode.py --checkpoint runs/demo --prompt "875*342" --k 5
  python decode.py --checkpoint runs/demo --prompts-file questions.txt --temperature 0.7
  python decode.py --checkpoint runs/demo --examples 8        # test examples, graded
  python decode.py --config configs/demo.yaml --prompt "12*34" # random parameters

Prints each chain of thought with, under it, the module that wrote each token
(0 main model, j head depth j), the answer, the forward passes and tokens/s.
Questions are in the task's format (for `mult`: operands least-significant digit
first, as in the training data).
"""

from __future__ import annotations

import argparse
import time

from absl import logging as absl_logging
import jax
import numpy as np

import mtcot_jax as mt
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
  q.add_argument("--examples", type=int, help="decode and grade the first N test examples")
  p.add_argument("--k", type=int, default=None, help="head tokens per CoT block (default: head.k)")
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
  p.add_argument("overrides", nargs="*", help="section.key=value (with --config)")
  return p.parse_args(argv)


def _load(args):
  if args.checkpoint:
    run = mt.load_run(args.checkpoint)
    return run.cfg, run.params, run.tokenizer
  from mtcot_jax.data import tokenizer_for
  cfg = mt.load_config(args.config, args.overrides)
  return cfg, mt.init_params(cfg, jax.random.key(args.seed)), tokenizer_for(cfg)


def main(argv=None):
  args = parse_args(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)   # tfds/orbax info lines drown the output
  cfg, params, tok = _load(args)
  examples = None
  if args.examples:
    from mtcot_jax.data import make_eval_batches
    from mtcot_jax.data.builders import task_for
    batch = make_eval_batches(cfg, tok, args.examples, args.examples, cot=not args.no_cot)[0]
    questions = [ex.question for ex in batch["examples"]]
    examples, task = batch["examples"], task_for(cfg.data)
  elif args.prompts_file:
    with open(args.prompts_file) as f:
      questions = [line.strip() for line in f if line.strip()]
  else:
    questions = args.prompt
  ids = [mt.encode_prompt(tok, q, cot=not args.no_cot) for q in questions]
  P = max(map(len, ids))
  prompt = np.zeros((len(ids), P), np.int32)
  for i, row in enumerate(ids):
    prompt[i, : len(row)] = row
  lengths = np.array([len(r) for r in ids])
  kw = dict(k=args.k, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            max_cot_tokens=args.max_cot_tokens, max_answer_tokens=args.max_answer_tokens,
            eos_id=tok.eos_id, think_end_id=tok.think_end_id, head_threshold=args.head_threshold,
            verify=args.verify)
  key = jax.random.key(args.seed)
  mt.generate(cfg, params, prompt, lengths, key, **kw)        # compile once
  t0 = time.perf_counter()
  res = jax.tree.map(np.asarray, mt.generate(cfg, params, prompt, lengths, key, **kw))
  dt = time.perf_counter() - t0
  k = args.k if args.k is not None else (cfg.decode.k if cfg.decode.k >= 0 else cfg.head.k)
  correct = []
  for i, q in enumerate(questions):
    n = res.lengths[i]
    cot_n = int(np.sum(res.phase[i] == 0))
    print(f"[{i}] question: {q}")
    if cot_n:
      print("    CoT (under each character: 0 main model, j head depth j):")
      text, marks = render(tok, res.tokens[i], res.source[i], res.phase[i], cot_n).split("\n")
      print("      " + text + "\n      " + marks)
    answer = answer_text(tok, res.tokens[i], res.phase[i], n)
    line = f"    answer: {answer!r}"
    if examples is not None:
      score = task.grade(answer, examples[i])
      correct.append(score)
      line += f"   reference: {examples[i].answer!r}   {'correct' if score else 'wrong'}"
    print(line)
    print(f"    forward passes: {res.forward_passes[i]}  tokens: {n} (CoT {cot_n})  "
          f"finished: {bool(res.finished[i])}  drafts kept by verification: "
          f"{res.accepted[i]}")
  total = int(np.sum(res.lengths))
  verify = args.verify or cfg.decode.verify
  print(f"k={k} verify={verify}: {total} tokens in {dt:.3f}s = {total / dt:.1f} tokens/s "
        f"(batch {len(questions)}, after compilation); mean forward passes "
        f"{np.mean(res.forward_passes):.2f}, tokens per pass "
        f"{total / np.sum(res.forward_passes):.2f}")
  if correct:
    print(f"accuracy: {np.mean(correct):.3f} over {len(correct)} examples")
