"""kill -9 of a real train.py process, then a restart: the short version of
benchmarks/soak.py (which runs 6 kills of SFT and 6 of RL)."""

import importlib.util
import json
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _soak_module():
  spec = importlib.util.spec_from_file_location(
      "soak", os.path.join(ROOT, "benchmarks", "soak.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_killed_sft_run_resumes_bit_identical(tmp_path):
  """A train.py killed with SIGKILL, then restarted, ends with the parameters,
  optimizer state and metrics.jsonl of an uninterrupted run. (The kill lands as
  soon as step 50 of 100 is logged, between checkpoints 48 and 56, so it falls in
  training however busy the machine is; the benchmark's kills land at random times.)
  Then the check is shown to fail on a log that repeats a step or a changed loss."""
  soak = _soak_module()
  lines = []
  base = str(tmp_path)
  assert soak.soak(("sft",), kills=1, seed=9, base=base, say=lines.append,
                   kill_after_step=50), "\n".join(lines)
  assert any("SIGKILL" in line for line in lines), lines
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
