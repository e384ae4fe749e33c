"""Preemption (mtcot_jax/train/preemption.py): SIGTERM saves the step reached and
ends the run; the restart resumes there. One process in-process here (the
handler, what is saved, the handler put back), two processes with JAX's
preemption sync manager below; a real train.py gets SIGTERM in test_soak.py."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import mtcot_jax as mt
from conftest import assert_adam_params_close, subprocess_env
from mtcot_jax.train import loop, preemption

HERE = os.path.dirname(__file__)
SIGNAL_AFTER = 2    # the two-process run gets SIGTERM once this step is logged


@dataclasses.dataclass
class _State:
  step: int
  params: object = None
  opt_state: object = None
  key: object = None


class _Manager:
  """What run_steps uses of an orbax CheckpointManager; records the saved steps."""
  directory = "nowhere/checkpoints"

  def __init__(self):
    self.saved = []

  def latest_step(self):
    return self.saved[-1] if self.saved else None

  def save(self, step, args):
    self.saved.append(step)

  def wait_until_finished(self):
    pass

  def close(self):
    pass


def test_sigterm_saves_the_step_reached_and_puts_the_handler_back(tmp_path, capsys):
  """SIGTERM during step 3 of 10 (checkpoints every 4): step 3 finishes, is logged
  and saved with its data state, and run_steps returns {"preempted": True, "step":
  3}, printing where it saved. Resumed there, a SIGTERM during the periodic save
  of step 4 stops it after step 4 (nothing more to save); resumed again, one
  during the final save lets it finish. The SIGTERM handler in place before is
  back afterwards (it never saw the signal), also when a step raises."""
  cfg = mt.load_config(None, [f"train.workdir={tmp_path}", "train.steps=10",
                              "train.log_every=1", "train.checkpoint_every=4",
                              "train.eval_every=0"])
  seen = []
  before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
  handler = signal.getsignal(signal.SIGTERM)
  try:
    mngr, data = _Manager(), []

    def step_fn(state, step):
      if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)      # handled at once, in this thread
      return _State(step + 1), lambda: {"step": step + 1, "loss": 1.0 / (step + 1)}

    out = loop.run_steps(cfg, _State(0), mngr, step_fn, desc="t", t_start=time.perf_counter(),
                         data_state=lambda done: data.append(done) or {"done": done},
                         progress=False)
    assert out["preempted"] and out["step"] == 3, out
    assert mngr.saved == [3] and data == [3]
    with open(tmp_path / "metrics.jsonl") as f:
      assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    err = capsys.readouterr().err
    assert "SIGTERM received" in err
    assert "preempted: saved the checkpoint of step 3 (of 10) in nowhere/checkpoints" in err
    assert signal.getsignal(signal.SIGTERM) is handler and seen == []

    class _Signalling(_Manager):   # SIGTERM while it saves step `at`
      def __init__(self, at):
        super().__init__()
        self.at = at

      def save(self, step, args):
        super().save(step, args)
        if step == self.at:
          os.kill(os.getpid(), signal.SIGTERM)

    mngr = _Signalling(4)           # the periodic save of step 4: nothing more to save
    out = loop.run_steps(cfg, _State(3), mngr, step_fn, desc="t", t_start=0.0, progress=False)
    assert out["preempted"] and out["step"] == 4 and mngr.saved == [4], (out, mngr.saved)
    # The final save: it completes; the summary (and the final evaluation) are the restart's.
    mngr = _Signalling(10)
    out = loop.run_steps(cfg, _State(4), mngr, step_fn, desc="t", t_start=0.0, progress=False)
    assert out["preempted"] and out["step"] == 10 and mngr.saved == [8, 10], (out, mngr.saved)
    with open(tmp_path / "metrics.jsonl") as f:
      assert [json.loads(line)["step"] for line in f] == list(range(1, 11))
    assert signal.getsignal(signal.SIGTERM) is handler and seen == []

    def failing(state, step):
      raise FloatingPointError("a step failed")
    with pytest.raises(FloatingPointError):
      loop.run_steps(cfg, _State(3), _Manager(), failing, desc="t", t_start=0.0, progress=False)
    assert signal.getsignal(signal.SIGTERM) is handler
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, before)


# --- two processes: JAX's preemption sync manager ------------------------------------


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, pace):
  port = _free_port()
  env = subprocess_env({k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))})
  return [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "_preempt_worker.py"), str(i), "2", str(port),
       workdir, str(pace)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(procs, timeout=300):
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  except subprocess.TimeoutExpired:
    for q in procs:
      q.kill()
    raise
  return logs


def _training_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


def test_two_processes_agree_on_the_step_and_resume(tmp_path):
  """Two processes (2 CPU devices each, fsdp across them) train with run_steps;
  both get SIGTERM once step 2 of 12 is logged (checkpoints every 4). JAX's
  preemption sync manager makes them agree on one step: both save it, together,
  and exit with status 75. The restart resumes there and ends with one process's
  uninterrupted run: every step's loss once (within float32 reduction error) and
  the final parameters within AdamW's bound for gradients that differ by rounding.
  (The first session's steps are paced at 0.4 s, so that the sync point, a step
  or two after the signal, falls well before the last step on a busy machine.)"""
  import _preempt_worker as w
  from mtcot_jax.train import losses
  from mtcot_jax.train.step import global_batch

  workdir = str(tmp_path / "run")
  procs = _start(workdir, pace=0.4)
  deadline = time.time() + 240
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and \
        len(_training_steps(workdir)) >= SIGNAL_AFTER:
      break
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  logs = _finish(procs)
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == preemption.EXIT_CODE, f"process {i}:\n{log[-5000:]}"
  steps = [int(log.split("preempted at step ")[1].split()[0]) for log in logs]
  assert steps[0] == steps[1] and SIGNAL_AFTER <= steps[0] < w.STEPS, (steps, logs[0][-3000:])
  saved = steps[0]
  checkpoints = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                       if n.isdigit())
  assert checkpoints[-1] == saved, checkpoints
  assert [r["step"] for r in _training_steps(workdir)] == list(range(1, saved + 1))

  logs = _finish(_start(workdir, pace=0.0))
  for i, log in enumerate(logs):
    assert f"process {i}: starts at step {saved} " in log, log[-5000:]
    assert f"process {i}: finished at step {w.STEPS} " in log, log[-5000:]

  # One process, one device, no interruption.
  cfg = w.config()
  state, opt = w.initial_state(cfg, None)
  step = losses.make_sft_step(cfg, None, opt, None)
  want = []
  for s in range(w.STEPS):
    state, metrics = step(state, global_batch(cfg, None, w.batch_numpy(cfg, s)))
    want.append(float(metrics["loss"]))
  got = _training_steps(workdir)
  assert [r["step"] for r in got] == list(range(1, w.STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in got], want, rtol=1e-5)
  final = np.load(os.path.join(workdir, "final.npz"))
  ref = jax.device_get(state.params)
  mine = jax.tree_util.tree_map_with_path(lambda path, _: final[jax.tree_util.keystr(path)], ref)
  assert_adam_params_close(mine, ref, cfg, steps=w.STEPS)
