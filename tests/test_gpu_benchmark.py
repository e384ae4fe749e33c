"""benchmarks/gpu.py --quick (what benchmarks/gpu.sh runs on a GPU, at tiny sizes)
with the data stack import-blocked: every section writes its JSON lines, with
numbers in them, and a spent budget skips measurements instead of running them."""

import json
import os
import subprocess
import sys

import pytest

from conftest import blocked_imports, subprocess_env

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.py")


def _run(tmp_path, *args) -> list[dict]:
  out = tmp_path / "gpu.jsonl"
  path = os.pathsep.join([blocked_imports(tmp_path / "blocked"), ROOT])
  proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=400,
                        env=subprocess_env(PYTHONPATH=path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert proc.stdout.count("\n") >= len(lines)         # each line printed as well
  return lines


# 36 s of the CI run (over its 10-minute budget at 8d04689): in `make test-all`;
# the spent-budget test below still runs the script in `make test`.
@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path):
  # Budgets x 20: a busy machine's compiles must not skip what this test checks.
  lines = _run(tmp_path, "--budget-scale", "20")
  ok = [r for r in lines if "error" not in r and "skipped" not in r]
  assert {r["section"] for r in ok} == {"env", "train", "decode", "verify", "share", "done"}, \
      [r for r in lines if r not in ok]
  assert [r["t_s"] for r in lines] == sorted(r["t_s"] for r in lines)   # appended in order
  train = [r for r in ok if r["section"] == "train"]
  assert train and all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in train)
  assert train[0]["loss"] > 0 and train[0]["params_main"] > 0
  # Both attentions are accounted for: measured, failed (no cuDNN on a CPU) or
  # said to be missing from this build.
  assert {r["attention"] for r in lines if r["section"] == "train"} >= {"cudnn"}
  k0 = {r["batch"]: r for r in ok if r.get("what") == "k0"}
  assert sorted(k0) == [1, 8, 64]
  for B, r in k0.items():
    assert r["tokens_per_pass"] == 1.0 and r["cot_tokens"] == B * r["passes"]
    assert 0 < r["frac_of_bound"] and r["ms_per_pass"] > 0
  k5 = {r["verify"]: r for r in ok if r.get("what") == "k5"}
  assert set(k5) == {"all", "none"}
  assert k5["none"]["tokens_per_pass"] > 1 and k5["all"]["passes"] > 0
  share = [r for r in ok if r["section"] == "share"][0]
  assert 0 < share["head_share_of_pass"] < 1 and share["chain_us"] > 0


def test_spent_budget_skips_measurements(tmp_path):
  lines = _run(tmp_path, "--budget-scale", "1e-6")
  assert lines[-1]["section"] == "done"
  skipped = [r for r in lines if "skipped" in r]
  assert lines[0]["section"] == "env" and "skipped" not in lines[0]   # env always runs
  assert {r["section"] for r in skipped} == {"train", "decode"}   # decode's setup: the rest
  #                                                                 needs its weights
  assert not any("step_ms" in r or "ms_per_pass" in r for r in lines)
