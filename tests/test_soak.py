"""SIGTERM (a preemption), then kill -9, of a real train.py process, a restart
after each: the short version of benchmarks/soak.py (which runs 6 kills of SFT
and 6 of RL)."""

import importlib.util
import json
import os
import re
import shutil
import signal

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The benchmark's SFT run (100 steps over 240 examples, checkpoints every 8, an
# evaluation every 20) cut to what two interruptions need: 24 steps over 96
# examples (two epochs), checkpoints at 8 and 16, evaluations at 6, 12 and 18.
# First a SIGTERM as soon as step 10 is logged: the run saves the step it has
# reached (10 or a step or two later, between the periodic checkpoints 8 and 16)
# and exits with status 75; its restart resumes there, mid-epoch. Then a SIGKILL
# as soon as step 18 is logged: between checkpoints 16 and 24, at or just before
# the evaluation of step 18, often while checkpoint 16 is still being written. The
# last restart resumes from the latest complete checkpoint (16, or the SIGTERM's),
# redoes and re-logs the steps after it and the evaluations among them, and
# crosses into the second epoch or starts in it.
SFT = ["train.steps=24", "train.warmup_steps=5", "train.checkpoint_every=8",
       "train.eval_every=6", "data.train_size=96"]
TERM_AFTER_STEP, KILL_AFTER_STEP = 10, 18


def _soak_module():
  spec = importlib.util.spec_from_file_location(
      "soak", os.path.join(ROOT, "benchmarks", "soak.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_killed_sft_run_resumes_bit_identical(tmp_path, monkeypatch):
  """A train.py stopped with SIGTERM, restarted, killed with SIGKILL, restarted,
  ends with the parameters, optimizer state and metrics.jsonl of an uninterrupted
  run. The SIGTERM made it save the step it had reached (the last training step
  it logged, not only the periodic checkpoint before it) and exit with status 75,
  saying so. (The signals land as soon as steps 10 and 18 of 24 are logged, so
  they fall in training however busy the machine is; the benchmark's land at
  random times.) Then the check is shown to fail on a log that repeats a step or
  a changed loss."""
  soak = _soak_module()
  monkeypatch.setattr(soak, "SFT", SFT)
  # The train.py processes compile through the tests' persistent cache (soak's
  # _env keeps a JAX_COMPILATION_CACHE_DIR it finds in the environment).
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    monkeypatch.setenv(name, subprocess_env()[name])
  lines = []
  base = str(tmp_path)
  assert soak.soak(("sft",), kills=2, seed=9, base=base, say=lines.append,
                   kill_after_step=(TERM_AFTER_STEP, KILL_AFTER_STEP),
                   signals=(signal.SIGTERM, signal.SIGKILL)), "\n".join(lines)
  assert any("SIGKILL" in line for line in lines), lines
  # The SIGTERM: exit 75 (soak.run_with_kills checked that the latest checkpoint is
  # the last training step logged, and that the run said so).
  term = next(line for line in lines if "SIGTERM" in line)
  saved = int(re.search(r"exit 75 after [0-9.]+s; latest checkpoint (\d+)", term).group(1))
  assert TERM_AFTER_STEP <= saved < 24, term
  ref, killed = os.path.join(base, "sft-ref"), os.path.join(base, "sft-killed")
  for change, needle in ((lambda r: r[:5] + r[4:], "duplicated training steps"),
                         (lambda r: r[:3] + [_bump_loss(r[3])] + r[4:], "training records differ")):
    bad = os.path.join(base, "bad")
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(killed, bad)
    with open(os.path.join(bad, "metrics.jsonl")) as f:
      records = f.read().splitlines()
    with open(os.path.join(bad, "metrics.jsonl"), "w") as f:
      f.write("\n".join(change(records)) + "\n")
    steps = int(next(o for o in soak.SFT if o.startswith("train.steps=")).split("=")[1])
    problems = soak.compare(ref, bad, steps)
    assert any(needle in p for p in problems), problems


def _bump_loss(line):
  r = json.loads(line)
  r["loss"] += 1e-6
  return json.dumps(r)
