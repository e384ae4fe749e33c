"""kill -9 a real `train.py` at random moments, restart it each time, and check
that it ends exactly where an uninterrupted run of the same command ends.

    .venv/bin/python benchmarks/soak.py                      # 6 kills of SFT, 6 of RL (~6 min)
    .venv/bin/python benchmarks/soak.py --kills 2 --stages sft   # tests/test_soak.py's version
    .venv/bin/python benchmarks/soak.py --signal both        # SIGTERM and SIGKILL in turn

For each stage (SFT, then RL from the reference SFT run) it runs the command once
uninterrupted (the reference, timed), then in a fresh workdir starts it, sends
SIGKILL at a random time (see `run_with_kills`: late in start-up, in steps, in
asynchronous checkpoint writes, in evaluations, in the final save, in the input's
first epoch),
restarts it, `--kills` times in a row, and lets the last start finish. Then:

* the latest checkpoint of both workdirs is at train.steps, and its parameters,
  optimizer state, step and PRNG key are bit-identical;
* metrics.jsonl holds every training step once, in order, with the reference's
  logged values (timings aside), the same evaluations at the same steps, and one
  summary.

With `--signal term` (or `both`: SIGTERM, SIGKILL, SIGTERM, ...) the kills are
SIGTERM, a preemption's notice: a run that has started training saves the step
it has reached and exits with status 75 (`mtcot_jax.train.preemption`); that is
checked too (the latest checkpoint is the last training step logged). A SIGTERM
that lands before the training loop (start-up) or after its final save (the
final evaluation) finds the default handler and ends the process like a kill.

Prints one line per kill (when it landed, the latest checkpoint it left) and
PASS/FAIL per stage; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.mlp_dim=64", "head.k=2", "head.width=16",
        "head.num_heads=2", "data.task=mult", "data.task_args={digits: 2}", "data.seq_len=48",
        "data.train_size=240", "data.eval_size=32", "decode.max_cot_tokens=24",
        "decode.max_answer_tokens=8", "train.batch_size=8", "train.log_every=1",
        "train.eval_examples=16"]
SFT = ["train.steps=100", "train.warmup_steps=5", "train.checkpoint_every=8",
       "train.eval_every=20"]
RL = ["train.stage=rl", "train.steps=12", "train.warmup_steps=2", "train.checkpoint_every=3",
      "train.eval_every=6", "train.learning_rate=1e-4", "rl.group_size=4",
      "rl.prompts_per_step=2"]
TIMING = ("tokens_per_s", "wall_seconds", "train_seconds")
PREEMPTED_EXIT = 75      # mtcot_jax.train.preemption.EXIT_CODE (not imported: no JAX here)
SIGNALS = {"kill": (signal.SIGKILL,), "term": (signal.SIGTERM,),
           "both": (signal.SIGTERM, signal.SIGKILL)}


def _command(workdir: str, overrides: list[str]) -> list[str]:
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config",
          os.path.join(ROOT, "configs", "base.yaml"), *TINY, *overrides,
          f"train.workdir={workdir}"]


def _env(base: str) -> dict:
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  # Restarts reuse the compiled programs (as a real restart on a pod would with a
  # persistent cache): kills then land in training more often than in start-up.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(base, "xla_cache"))
  return env


def run_to_end(workdir: str, overrides: list[str], base: str) -> tuple[float, float]:
  """Runs the command to its end. Returns (seconds, seconds until the first
  training step was logged)."""
  t0 = time.perf_counter()
  metrics = os.path.join(workdir, "metrics.jsonl")
  first = None
  with tempfile.TemporaryFile("w+") as out:
    p = subprocess.Popen(_command(workdir, overrides), env=_env(base), stdout=out,
                         stderr=subprocess.STDOUT, text=True)
    while p.poll() is None:
      if first is None and os.path.exists(metrics):
        first = time.perf_counter() - t0
      time.sleep(0.05)
    if p.returncode:
      out.seek(0)
      raise RuntimeError(f"train.py failed in {workdir}:\n{out.read()[-6000:]}")
  total = time.perf_counter() - t0
  return total, total if first is None else first


def _latest_step(workdir: str):
  d = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps) if steps else None


def _logged_step(workdir: str, training: bool = False) -> int:
  """The last step metrics.jsonl holds (0 if none); with `training`, the last
  training step's (not an evaluation's or a summary's)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return 0
  for line in reversed(lines):
    try:
      record = json.loads(line)
      if training and "loss" not in record:
        continue
      return int(record.get("step", 0))
    except (json.JSONDecodeError, AttributeError):
      continue
  return 0


def run_with_kills(workdir: str, overrides: list[str], kills: int, steps: int, first: float,
                   train_seconds: float, rng: random.Random, base: str, say=print,
                   kill_after_step=None, signals=(signal.SIGKILL,)) -> list[str]:
  """Kill i lands at a time drawn from [0.8 f, f + 1.5 R / (kills - i)]: f is the
  reference's time to its first step, R its training time left from the latest
  checkpoint, so kills land late in start-up, in steps, in asynchronous checkpoint
  writes, in evaluations and in the final save, and most leave work for the next.
  With `kill_after_step` (one step, or one per kill) a kill lands instead as soon
  as metrics.jsonl logs that step (whatever the machine's speed: always in
  training). Kill i sends signals[i % len(signals)]; after a SIGTERM the process
  is given 120 s to save and exit. Returns what went wrong with the SIGTERMs: a
  run stopped in training that did not exit with status 75, or whose latest
  checkpoint is not the last training step it logged."""
  problems = []
  for i in range(kills):
    sig = signals[i % len(signals)]
    after = kill_after_step
    if isinstance(after, (list, tuple)):
      after = after[i]
    left = (steps - (_latest_step(workdir) or 0)) / steps * train_seconds
    delay = rng.uniform(0.8 * first, first + 1.5 * left / (kills - i))
    with tempfile.TemporaryFile("w+") as out:
      p = subprocess.Popen(_command(workdir, overrides), env=_env(base), stdout=out,
                           stderr=subprocess.STDOUT, text=True)
      t0 = time.perf_counter()
      if after is not None:
        while p.poll() is None and _logged_step(workdir) < after:
          time.sleep(0.02)
        delay = time.perf_counter() - t0
      try:
        p.wait(timeout=0 if after is not None else delay)
        say(f"  kill {i + 1}: the run ended before {delay:.1f}s (exit {p.returncode})")
        continue
      except subprocess.TimeoutExpired:
        pass
      logged = _logged_step(workdir)
      p.send_signal(sig)
      if sig != signal.SIGTERM:
        p.wait()
        say(f"  kill {i + 1}: SIGKILL at {delay:.1f}s (step {logged} logged); "
            f"latest checkpoint {_latest_step(workdir)}")
        continue
      t1 = time.perf_counter()
      try:
        p.wait(timeout=120)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
      saved, reached = _latest_step(workdir), _logged_step(workdir, training=True)
      say(f"  kill {i + 1}: SIGTERM at {delay:.1f}s (step {logged} logged): exit "
          f"{p.returncode} after {time.perf_counter() - t1:.1f}s; latest checkpoint {saved}")
      out.seek(0)
      text = out.read()
      if p.returncode == PREEMPTED_EXIT:
        if saved != reached:
          problems.append(f"kill {i + 1} (SIGTERM): latest checkpoint {saved}, but training "
                          f"reached step {reached}")
        if f"preempted: saved the checkpoint of step {saved} " not in text:
          problems.append(f"kill {i + 1} (SIGTERM): no 'preempted: saved the checkpoint of "
                          f"step {saved}' line in its output:\n{text[-3000:]}")
      elif after is not None or p.returncode not in (-signal.SIGTERM, 0):
        # In training (a kill at a logged step) it must save; elsewhere (start-up, the
        # final evaluation) SIGTERM ends the process as the default handler does.
        problems.append(f"kill {i + 1} (SIGTERM): exit {p.returncode}, expected "
                        f"{PREEMPTED_EXIT}:\n{text[-3000:]}")
  run_to_end(workdir, overrides, base)
  return problems


def _restore_all(workdir: str) -> tuple[int | None, dict]:
  """The latest checkpoint's `params` and `train` items, onto this process's first
  device whatever mesh saved them (the runs may see other devices than we do)."""
  import jax
  import orbax.checkpoint as ocp
  step = _latest_step(workdir)
  if step is None:
    return None, {}
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ck = ocp.StandardCheckpointer()
  out = {}
  for item in ("params", "train"):
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), item)
    meta = ck.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    out[item] = ck.restore(path, jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree))
  ck.close()
  return step, out


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _strip(obj):
  if isinstance(obj, dict):
    return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
  if isinstance(obj, list):
    return [_strip(v) for v in obj]
  return obj


def compare(ref: str, killed: str, steps: int) -> list[str]:
  """What differs between the two finished workdirs ([] when nothing does)."""
  import jax
  import numpy as np
  problems = []
  (sa, a), (sb, b) = _restore_all(ref), _restore_all(killed)
  if sa != steps or sb != steps:
    problems.append(f"latest checkpoints at steps {sa} and {sb}; expected {steps}")
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  if [p for p, _ in la] != [p for p, _ in lb]:
    problems.append("the checkpoints' trees differ")
  for (path, x), (_, y) in zip(la, lb):
    if not np.array_equal(np.asarray(x), np.asarray(y)):
      problems.append(f"{jax.tree_util.keystr(path)} differs")
  ma, mb = _metrics(ref), _metrics(killed)
  for name, sel in (("training", lambda r: "loss" in r), ("evaluation", lambda r: "eval" in r),
                    ("summary", lambda r: "summary" in r)):
    ra, rb = [_strip(r) for r in ma if sel(r)], [_strip(r) for r in mb if sel(r)]
    steps_b = [r["step"] for r in rb]
    if len(set(steps_b)) != len(steps_b):
      problems.append(f"metrics.jsonl: duplicated {name} steps {sorted(steps_b)}")
    if ra != rb:
      problems.append(f"metrics.jsonl: {name} records differ (steps {[r['step'] for r in ra]} "
                      f"vs {steps_b})")
  if [r["step"] for r in ma if "loss" in r] != list(range(1, steps + 1)):
    problems.append("the reference did not log every step (train.log_every=1 expected)")
  return problems


def soak(stages: tuple[str, ...], kills: int, seed: int, base: str, say=print,
         kill_after_step=None, signals=(signal.SIGKILL,)) -> bool:
  rng = random.Random(seed)
  ok = True
  sft_ref = os.path.join(base, "sft-ref")
  for stage in stages:
    overrides = SFT if stage == "sft" else RL + [f"train.init_from={sft_ref}"]
    steps = int(next(o for o in overrides if o.startswith("train.steps=")).split("=")[1])
    if stage == "rl" and "sft" not in stages:
      run_to_end(sft_ref, SFT, base)              # the run RL starts from
    ref = sft_ref if stage == "sft" else os.path.join(base, "rl-ref")
    killed = os.path.join(base, f"{stage}-killed")
    seconds, first = run_to_end(ref, overrides, base)   # the reference; fills the compile cache
    problems = []
    if kill_after_step is None:
      # Kill times come from a second uninterrupted run, warm like the restarts (and
      # checked too: a program compiled from the cache computes the same).
      warm = os.path.join(base, f"{stage}-warm")
      seconds, first = run_to_end(warm, overrides, base)
      problems += compare(ref, warm, steps)
    say(f"{stage}: reference {steps} steps in {seconds:.1f}s (first step logged at "
        f"{first:.1f}s); {kills} kills")
    problems += run_with_kills(killed, overrides, kills, steps, first, seconds - first, rng,
                               base, say, kill_after_step, signals)
    problems += compare(ref, killed, steps)
    for p in problems:
      say(f"  FAIL {p}")
    say(f"{stage}: {'PASS' if not problems else 'FAIL'}: after {kills} kills, parameters, "
        "optimizer state and metrics.jsonl " + ("identical" if not problems else "differ"))
    ok &= not problems
  return ok


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kills", type=int, default=6)
  p.add_argument("--stages", nargs="+", default=["sft", "rl"], choices=["sft", "rl"])
  p.add_argument("--seed", type=int, default=0, help="seeds the kill times")
  p.add_argument("--signal", default="kill", choices=sorted(SIGNALS),
                 help="SIGKILL, SIGTERM (a preemption: save and exit 75) or both in turn")
  p.add_argument("--workdir", default="", help="default: a temporary directory, removed after")
  a = p.parse_args(argv)
  base = a.workdir or tempfile.mkdtemp(prefix="mtcot_soak_")
  try:
    ok = soak(tuple(a.stages), a.kills, a.seed, base, signals=SIGNALS[a.signal])
  finally:
    if not a.workdir:
      shutil.rmtree(base, ignore_errors=True)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
