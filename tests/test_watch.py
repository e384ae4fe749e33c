"""Watching a run: TensorBoard event files beside metrics.jsonl (read back with
TensorBoard's own reader, across a resume) and the plot command. The loop runs
with a stand-in step (no model), so no test here compiles anything."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import mtcot_jax as mt
from mtcot_jax.tools import plot
from mtcot_jax.train import loop
from mtcot_jax.train.metrics import read_metrics


def _tensorboard(workdir) -> dict[str, list[tuple[int, float]]]:
  """What TensorBoard shows: {tag: [(step, value), ...]}, after its purges."""
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"),
                                           size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _f32(x) -> float:
  return float(np.float32(x))   # TensorBoard keeps a scalar as float32


def test_event_files_hold_every_logged_scalar(tmp_path):
  """Hand-written records of each kind and the tags a reader must find for them."""
  train = {"finite": 1.0, "grad_norm": 1.25, "head_acc": [0.5, 0.25], "head_accept": [0.75, 0.5],
           "head_loss": [1.5, 2.5], "loss": 3.1, "main_acc": 0.4, "main_loss": 1.1, "step": 1,
           "lr": 1e-3, "tokens_per_s": 1234.5, "skipped_examples": 0}
  rl = {"clip_frac": 0.125, "finite": 1.0, "head_accept": [0.9, 0.8], "kl": 0.002, "loss": -0.5,
        "ratio": 1.0, "step": 2, "reward_mean": 0.7, "reward_std": 0.2, "accuracy": 0.6, "k": 2,
        "pass_fraction": 0.55, "cot_tokens": 9.5, "forward_passes": 7.25, "lr": 5e-4}
  ev = {"step": 2, "eval": {"k0": {"accuracy": 0.5, "forward_passes": 30.0, "examples": 16},
                            "k5": {"accuracy": 0.75, "forward_passes": 10.5, "examples": 16}}}
  summary = {"step": 3, "summary": {"step": 3, "train_seconds": 9.0, "final": rl,
                                    "eval": {"k5": {"accuracy": 1.0, "forward_passes": 9.0}}}}
  log = loop.MetricsLog(str(tmp_path), resume_step=0)
  for record in (train, rl, ev, summary):
    log.write(record)
  log.close()
  want = {
      "grad_norm": [(1, 1.25)], "loss": [(1, 3.1), (2, -0.5)], "main_acc": [(1, 0.4)],
      "main_loss": [(1, 1.1)], "lr": [(1, 1e-3), (2, 5e-4)], "tokens_per_s": [(1, 1234.5)],
      "skipped_examples": [(1, 0)],
      "head_acc/depth1": [(1, 0.5)], "head_acc/depth2": [(1, 0.25)],
      "head_accept/depth1": [(1, 0.75), (2, 0.9)], "head_accept/depth2": [(1, 0.5), (2, 0.8)],
      "head_loss/depth1": [(1, 1.5)], "head_loss/depth2": [(1, 2.5)],
      "clip_frac": [(2, 0.125)], "kl": [(2, 0.002)], "ratio": [(2, 1.0)],
      "reward_mean": [(2, 0.7)], "reward_std": [(2, 0.2)], "accuracy": [(2, 0.6)], "k": [(2, 2)],
      "pass_fraction": [(2, 0.55)], "cot_tokens": [(2, 9.5)], "forward_passes": [(2, 7.25)],
      "eval/k0/accuracy": [(2, 0.5)], "eval/k0/forward_passes": [(2, 30.0)],
      "eval/k0/examples": [(2, 16)], "eval/k5/examples": [(2, 16)],
      "eval/k5/accuracy": [(2, 0.75), (3, 1.0)], "eval/k5/forward_passes": [(2, 10.5), (3, 9.0)],
  }
  want = {tag: [(s, _f32(v)) for s, v in pts] for tag, pts in want.items()}
  assert _tensorboard(tmp_path) == want
  assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [train, rl, ev, summary]


def test_events_survive_a_kill(tmp_path):
  """What was logged a second and more before a SIGKILL is on disk (the writer's
  thread flushes within flush_secs; its own flush() does not wait for it)."""
  script = f"""
import os, signal, time
from mtcot_jax.train import loop
log = loop.MetricsLog({str(tmp_path)!r}, resume_step=0)
for s in (1, 2, 3):
  log.write({{"step": s, "loss": float(s)}})
time.sleep(2.0)
os.kill(os.getpid(), signal.SIGKILL)
"""
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert p.returncode == -signal.SIGKILL, p.stderr
  assert _tensorboard(tmp_path) == {"loss": [(1, 1.0), (2, 2.0), (3, 3.0)]}


def test_no_writer_off_process_zero(tmp_path, monkeypatch):
  monkeypatch.setattr(loop.jax, "process_index", lambda: 1)
  log = loop.MetricsLog(str(tmp_path), resume_step=0)
  log.write({"step": 1, "loss": 1.0})
  log.close()
  assert log.writer is None and os.listdir(tmp_path) == []


# --- the loop, with a stand-in step -----------------------------------------

@dataclasses.dataclass
class _State:
  step: int
  params: object = None
  opt_state: object = None
  key: object = None


class _Manager:
  def latest_step(self):
    return None

  def save(self, step, args):
    pass

  def wait_until_finished(self):
    pass

  def close(self):
    pass


def _session(workdir, start: int, tag: float, *, stop_after=None, steps=6, rl=False):
  """run_steps from `start` with records whose numbers carry this session's `tag`
  (a rerun step logs other numbers than the lost one did); evaluation every 3 steps."""
  cfg = mt.load_config(None, [f"train.workdir={workdir}", f"train.steps={steps}",
                              "train.log_every=1", "train.eval_every=3",
                              "train.eval_examples=8", "train.checkpoint_every=0"])

  def step_fn(state, step):
    s = step + 1
    if rl:
      rec = {"kl": 0.01 * s, "clip_frac": 0.1, "head_accept": [0.5, 0.4], "loss": -0.1 * s,
             "step": s, "reward_mean": 0.1 * s, "reward_std": 0.3, "accuracy": 0.05 * s,
             "k": 2, "pass_fraction": 0.6, "cot_tokens": 9.0 + s, "forward_passes": 7.0,
             "lr": 1e-4}
    else:
      rec = {"finite": 1.0, "grad_norm": 1.0 + tag, "loss": 4.0 / s + tag, "main_loss": 3.0 / s,
             "main_acc": 0.1 * s, "head_acc": [0.1 * s, 0.05 * s], "head_accept": [0.2, 0.1 * s],
             "head_loss": [2.0 / s, 3.0 / s], "step": s, "lr": 1e-3 * s,
             "tokens_per_s": 1000.0 + tag}
    return _State(s), lambda: rec

  evals = iter(range(100))
  evaluate_fn = lambda params: {"k0": {"accuracy": 0.5 + tag, "forward_passes": 30.0},  # noqa: E731
                                "k2": {"accuracy": 0.01 * next(evals), "forward_passes": 15.0}}
  return loop.run_steps(cfg, _State(start), _Manager(), step_fn, desc="test", t_start=0.0,
                        evaluate_fn=evaluate_fn, stop_after=stop_after, progress=False)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
  """A session interrupted after step 5 (its last checkpoint at step 2), then
  resumed from step 2 to the end; and an RL-like run beside it."""
  root = tmp_path_factory.mktemp("watch")
  workdir = str(root / "resumed")
  assert _session(workdir, 0, 0.25, stop_after=5) == {"stopped_at": 5}
  _session(workdir, 2, 0.5)
  rl_dir = str(root / "rl")
  _session(rl_dir, 0, 0.0, rl=True)
  return root, workdir, rl_dir


def test_resume_purges_what_the_checkpoint_lost(resumed_run):
  """Each step once in TensorBoard, with the numbers metrics.jsonl keeps: steps 1-2
  and the evaluation at 0..2 of the first session, 3-6 of the second."""
  _, workdir, _ = resumed_run
  assert len([f for f in os.listdir(os.path.join(workdir, "tensorboard"))
              if ".tfevents." in f]) == 2     # one event file per session
  tb = _tensorboard(workdir)
  assert [s for s, _ in tb["loss"]] == [1, 2, 3, 4, 5, 6]
  assert tb["loss"] == [(s, _f32(4.0 / s + (0.25 if s <= 2 else 0.5))) for s in range(1, 7)]
  # Evaluations: at 3 (lost with step 5's session, run again) and the final one at 6.
  assert tb["eval/k0/accuracy"] == [(3, _f32(1.0)), (6, _f32(1.0))]
  # Against metrics.jsonl, record by record.
  records = _records(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  for depth in (1, 2):
    assert tb[f"head_acc/depth{depth}"] == [(r["step"], _f32(r["head_acc"][depth - 1]))
                                            for r in train]
  evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
  evals += [(r["step"], r["summary"]["eval"]) for r in records if "summary" in r]
  for setting in ("k0", "k2"):
    for name in ("accuracy", "forward_passes"):
      assert tb[f"eval/{setting}/{name}"] == [(s, _f32(e[setting][name])) for s, e in evals]


def test_resume_at_a_logged_step_keeps_it(tmp_path):
  """A resume at a step whose record and evaluation are kept: the purge at that step
  hides the first session's events there, and the new file repeats them."""
  workdir = str(tmp_path)
  _session(workdir, 0, 0.25, stop_after=4)
  _session(workdir, 3, 0.5)
  tb = _tensorboard(workdir)
  assert tb["loss"] == [(s, _f32(4.0 / s + (0.25 if s <= 3 else 0.5))) for s in range(1, 7)]
  assert tb["eval/k0/accuracy"] == [(3, _f32(0.75)), (6, _f32(1.0))]


def test_resume_drops_a_line_cut_short(tmp_path):
  _session(str(tmp_path), 0, 0.25, stop_after=4)
  path = tmp_path / "metrics.jsonl"
  with open(path, "a") as f:
    f.write('{"step": 5, "loss": 1.')          # a kill while step 5 was being logged
  _session(str(tmp_path), 4, 0.5)
  records = [json.loads(line) for line in path.read_text().splitlines()]   # every line whole
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in records if r.get("step") == 5] == [4.0 / 5 + 0.5]


def test_read_metrics_skips_what_is_not_a_record(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 1, "loss": 2.5}\n\n[1, 2]\n{"step": 2, "eval": {}}\n{"step": 3, "lo')
  assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.5}, {"step": 2, "eval": {}}]
  with pytest.raises(FileNotFoundError):
    read_metrics(str(tmp_path / "elsewhere"))


def test_plot_one_run(resumed_run, capsys):
  _, workdir, _ = resumed_run
  plot.main([workdir])
  out = os.path.join(workdir, "plots")
  assert f"to {out}" in capsys.readouterr().out
  names = sorted(os.listdir(out))
  assert names == sorted(f"{n}.png" for n in ("loss", "main_acc", "head_acc", "head_accept",
                                              "head_loss", "optimizer", "throughput", "eval"))
  for name in names:
    with open(os.path.join(out, name), "rb") as f:
      data = f.read()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000, name


def test_plot_several_runs_on_one_figure(resumed_run):
  root, workdir, rl_dir = resumed_run
  out = str(root / "compare")
  plot.main([workdir, rl_dir, "--out", out])
  assert "rl.png" in os.listdir(out) and "eval.png" in os.listdir(out)
  assert all(os.path.getsize(os.path.join(out, n)) > 10_000 for n in os.listdir(out))
  figs = plot.figures([plot.read_run(workdir), plot.read_run(rl_dir)])
  legend = [t.get_text() for t in figs["eval"].legends[0].get_texts()]
  assert legend == ["resumed", "rl"]
  # head acceptance, which both runs log: one subplot per depth, a line per run.
  axes = [ax for ax in figs["head_accept"].axes if ax.get_visible()]
  assert [ax.get_title() for ax in axes] == ["depth 1", "depth 2"]
  assert [len(ax.get_lines()) for ax in axes] == [2, 2]


def test_plot_without_metrics_is_a_clear_error(tmp_path, capsys):
  missing = str(tmp_path / "no_such_run")
  with pytest.raises(SystemExit) as e:
    plot.main([missing])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: no metrics.jsonl in") and missing in err
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "metrics.jsonl").write_text("")
  with pytest.raises(SystemExit):
    plot.main([str(tmp_path / "empty")])
  assert "holds no records yet" in capsys.readouterr().err
