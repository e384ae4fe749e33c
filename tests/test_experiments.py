"""The experiment runner end to end on the smoke spec, its resumption, a test-split
table on the same training runs, the equal-passes baseline, and the disjointness of
the train, validation and test seeds."""

import json
import os

import pytest

import mtcot_jax as mt
from mtcot_jax.config import ConfigError
from mtcot_jax.data import builders
from mtcot_jax.data.tasks import get_task
from mtcot_jax.experiments import report, runner
from mtcot_jax.experiments.spec import cell_config, cells, load_spec, stage_config, stage_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "experiments", "smoke.yaml")
PAPER = os.path.join(ROOT, "configs", "experiments", "paper.yaml")


_VAL = runner.cell_file("validation")


def _lines(path):
  with open(path) as f:
    return f.readlines()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """The smoke grid, run as a user would meet it: a training run killed halfway,
  then the runner interrupted after one cell, then run to the end, then again;
  then one cell evaluated on the test split."""
  from mtcot_jax.train import loop
  out = str(tmp_path_factory.mktemp("smoke"))
  spec = load_spec(SMOKE)
  first = cells(spec)[0]
  stage = first.method.stages[0]
  # A training run interrupted after 25 of its steps (its checkpoint at 20 is kept).
  loop.train(stage_config(spec, first, stage, out), stop_after=25, progress=False)
  log = {}
  log["interrupted"] = runner.run(SMOKE, out, stop_after_cells=1, progress=False)
  run_dir = stage_dir(out, first, stage)
  log["first_done"] = json.load(open(os.path.join(run_dir, runner.DONE_FILE)))
  log["first_metrics"] = _lines(os.path.join(run_dir, "metrics.jsonl"))
  log["first_cell"] = json.load(open(os.path.join(out, first.id, _VAL)))
  log["rest"] = runner.run(SMOKE, out, progress=False)
  log["again"] = runner.run(SMOKE, out, progress=False)
  log["test"] = runner.run(SMOKE, out, only=first.id, split="test", progress=False)
  log["report"] = report.write_report(out)
  return spec, out, log


def test_smoke_spec_end_to_end(smoke):
  spec, out, log = smoke
  all_cells = cells(spec)
  assert len(all_cells) == 2 * 2 * 2    # tasks x methods x seeds
  assert log["interrupted"]["evaluated"] == 1 and log["interrupted"]["trained"] == 1
  # The interrupted training run resumed from its checkpoint, not from scratch.
  assert log["first_done"]["resumed"] and log["first_done"]["steps"] == 40
  # The finished cell was not redone: its training run and its cell.json are untouched.
  assert log["rest"]["evaluated"] == len(all_cells) - 1
  assert log["rest"]["trained"] == 3    # sft of the other (task, seed) pairs; shared by methods
  first = all_cells[0]
  run_dir = stage_dir(out, first, first.method.stages[0])
  assert _lines(os.path.join(run_dir, "metrics.jsonl")) == log["first_metrics"]
  assert json.load(open(os.path.join(out, first.id, _VAL))) == log["first_cell"]
  assert log["again"] == {"cells": 8, "skipped": 8, "evaluated": 0, "trained": 0}
  # The test table of one cell: its training run reused, its validation rows kept.
  assert log["test"] == {"cells": 1, "skipped": 0, "evaluated": 1, "trained": 0}

  rows = [json.loads(line) for line in _lines(os.path.join(out, runner.RESULTS_FILE))]
  for c in all_cells:
    for split in ("validation", "test"):
      got = sorted(r["eval"] for r in rows if r["workdir"] == c.id and r["split"] == split)
      want = [] if split == "test" and c != first else sorted(e.name for e in c.method.evals)
      assert got == want, (c.id, split)
    assert sum(r["primary"] for r in rows if r["workdir"] == c.id and
               r["split"] == "validation") == 1
  for r in rows:
    assert r["examples"] == spec.eval_examples
    assert r["eval_seeds"][0] > r["train_seeds"][1]
    offset = {"validation": builders.VALIDATION_SEED_OFFSET, "test": builders.TEST_SEED_OFFSET}
    assert offset[r["split"]] <= r["eval_seeds"][0] <= r["eval_seeds"][1] < 2 * offset[
        r["split"]]
    assert r["config"]["data"]["eval_split"] == r["split"]
    assert 0.0 <= r["accuracy"] <= 1.0 and r["forward_passes"] >= 1
    assert len(r["head_accept"]) == 2 and len(r["head_acc"]) == 2
    assert r["commit"] and r["config"]["data"]["eval_size"] == spec.eval_examples

  md = open(log["report"]).read()
  assert f"## {first.task.name} (mult, digits=2): test split" in md
  for t in spec.tasks:
    assert f"## {t.name} ({t.task}, " in md and md.count(f"## {t.name} ") == (
        2 if t == first.task else 1)
    for name in ("accuracy_vs_passes", "head_acceptance"):
      png = os.path.join(out, "plots", f"{t.name}_validation_{name}.png")
      assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_equal_passes_baseline_within_one_pass(smoke):
  spec, out, _ = smoke
  rows = [json.loads(line) for line in _lines(os.path.join(out, runner.RESULTS_FILE))]
  for r in rows:
    if r["eval"] != "trunc-paired" or r["split"] != "validation":
      continue
    pair = next(p for p in rows if p["task"] == r["task"] and p["seed"] == r["seed"]
                and p["method"] == "mtcot-k2" and p["primary"] and p["split"] == r["split"])
    assert abs(r["forward_passes"] - pair["forward_passes"]) < 1.0
    assert r["budget"]["target_passes"] == pair["forward_passes"]
    assert r["max_cot_tokens"] == r["budget"]["max_cot_tokens"] < r["config"]["decode"][
        "max_cot_tokens"]


def test_cells_are_ordinary_workdirs(smoke):
  """decode.py --checkpoint and mt.load_run open a cell, with the method's k."""
  spec, out, _ = smoke
  cell = next(c for c in cells(spec) if c.method.name == "mtcot-k2")
  run = mt.load_run(os.path.join(out, cell.id))
  assert run.cfg.decode.k == 2 and run.step == 40
  trunc = next(c for c in cells(spec) if c.method.name == "cot-truncated")
  assert mt.load_run(os.path.join(out, trunc.id)).cfg.decode.k == 0


def test_collect_reads_each_split_and_old_cell_files(tmp_path):
  """results.jsonl holds a cell's rows of both splits; an old cell.json (before the
  validation split) is read as the test rows it was, and counts as the test cell."""
  out = str(tmp_path)
  for cell, name, rows in (("a/m/seed0", "cell.validation.json", [{"eval": "k0"}]),
                           ("a/m/seed0", "cell.test.json", [{"eval": "k0"}]),
                           ("b/m/seed0", "cell.json", [{"eval": "k5"}])):
    os.makedirs(os.path.join(out, cell), exist_ok=True)
    for r in rows:
      r.update(task=cell.split("/")[0], method="m", seed=0)
      if name != "cell.json":
        r["split"] = name.split(".")[1]
    json.dump({"rows": rows}, open(os.path.join(out, cell, name), "w"))
  got = [(r["task"], r["split"]) for r in runner.collect(out)]
  assert got == [("a", "validation"), ("a", "test"), ("b", "test")]
  assert [(r["task"], r["split"]) for r in map(json.loads, _lines(
      os.path.join(out, runner.RESULTS_FILE)))] == got
  assert runner.cell_path(out, "b/m/seed0", "test").endswith("cell.json")
  assert runner.cell_path(out, "b/m/seed0", "validation") is None
  assert runner.cell_path(out, "a/m/seed0", "test").endswith("cell.test.json")


def test_paired_budget_search():
  """The search lands within one pass of the target when the passes are not the
  formula's (answers that change length under truncation)."""
  def at(m):   # forced CoT: m + 1 + answer passes, answers grow as the CoT shrinks
    return {"forward_passes": m + 1 + 6 + max(0, 10 - m) * 0.3}
  for target in (13.6, 15.05, 20.2, 31.0):
    m, r = runner._paired_budget(at, target, answer_tokens=6.0)
    assert abs(r["forward_passes"] - target) < 1.0, (target, m, r)
  # Below the fewest passes any budget gives (10.7 at m=1): the closest, m=1.
  assert runner._paired_budget(at, 6.0, answer_tokens=6.0)[0] == 1


@pytest.mark.parametrize("task,args", [("mult", {"digits": 2}), ("perm", {"num_perms": 2}),
                                       ("reach", {"nodes": 6, "depth": 2})])
def test_eval_seeds_disjoint_from_training(task, args, tmp_path):
  """The validation and test splits' seeds lie outside the training seeds and each
  other's, and no two splits share a question (regenerated from the task itself,
  not read back)."""
  import yaml
  cfg = mt.load_config(None, [f"data.task={task}",
                              f"data.task_args={yaml.safe_dump(args, default_flow_style=True)}",
                              "data.train_size=300", "data.eval_size=40",
                              f"data.data_dir={tmp_path}"])
  train = builders.split_seeds(cfg.data, "train")
  test = builders.split_seeds(cfg.data, "test")
  val = builders.split_seeds(cfg.data, "validation")
  assert sorted(train) == list(range(300))   # tfds stores the records shuffled
  assert len(test) == 40 and test.min() >= 2 ** 40 > train.max()
  assert len(val) == 40 and val.min() >= 2 ** 41 > test.max()
  t = get_task(task, **args)
  train_q, test_q, val_q = ({t.example(int(s)).question for s in seeds}
                            for seeds in (train, test, val))
  assert not train_q & test_q and not train_q & val_q and not test_q & val_q
  for split, seeds in (("test", test), ("validation", val)):
    source = builders.split_source(cfg.data, split)
    assert [source[i] for i in range(3)] == [t.example(int(s)) for s in seeds[:3]]


def test_bad_specs_fail_before_training(tmp_path):
  def spec(body):
    p = tmp_path / "s.yaml"
    p.write_text(f"base: {os.path.join(ROOT, 'configs', 'small.yaml')}\n" + body)
    return str(p)
  tasks = "tasks: {m: {task: mult, args: {digits: 2}}}\n"
  with pytest.raises(ConfigError, match="unknown method 'cotx'"):
    load_spec(spec(tasks + "methods: [cotx]\n"))
  with pytest.raises(ConfigError, match="k=7 is not accepted"):
    load_spec(spec(tasks + "methods: [mtcot-k7]\n"))
  with pytest.raises(ConfigError, match="needs truncated.pair"):
    load_spec(spec(tasks + "methods: [cot-truncated]\n"))
  with pytest.raises(ConfigError, match="head.widht"):
    load_spec(spec(tasks + "methods: [{name: x, like: mtcot-k5, train: [head.widht=3]}]\n"))
  with pytest.raises(ConfigError, match="digits"):
    load_spec(spec("tasks: {m: {task: mult, args: {digits: 0}}}\nmethods: [cot]\n"))
  with pytest.raises(ConfigError, match="seeds"):
    load_spec(spec(tasks + "methods: [cot]\nseeds: 0\n"))
  with pytest.raises(ConfigError, match=r"split='dev' is not accepted: one of \('validation', "
                                        r"'test'\)"):
    load_spec(spec(tasks + "methods: [cot]\nsplit: dev\n"))


def test_spec_split_reaches_the_cells_not_the_training_runs(tmp_path):
  p = tmp_path / "s.yaml"
  p.write_text(f"base: {os.path.join(ROOT, 'configs', 'small.yaml')}\n"
               "tasks: {m: {task: mult, args: {digits: 2}}}\nmethods: [mtcot-k5]\n")
  default, final = load_spec(str(p)), load_spec(str(p), split="test")
  assert (default.split, final.split) == ("validation", "test")
  cell = cells(final)[0]
  out = str(tmp_path / "out")
  assert cell_config(default, cell, out).data.eval_split == "validation"
  assert cell_config(final, cell, out).data.eval_split == "test"
  stage = cell.method.stages[0]
  assert stage_config(default, cell, stage, out) == stage_config(final, cell, stage, out)
  p.write_text(p.read_text() + "split: test\n")
  assert load_spec(str(p)).split == "test"


def test_paper_spec_loads():
  spec = load_spec(PAPER)
  names = {m.name for m in spec.methods}
  assert {"cot", "mtcot-k1", "mtcot-k3", "mtcot-k5", "cot-truncated", "nocot", "frozen-main",
          "rl"} <= names
  assert {t.task for t in spec.tasks} >= {"mult", "perm", "reach"} and len(spec.seeds) == 3


def test_variants_share_a_named_run(tmp_path):
  p = tmp_path / "s.yaml"
  p.write_text(f"base: {os.path.join(ROOT, 'configs', 'small.yaml')}\n"
               "tasks: {m: {task: mult, args: {digits: 2}}}\n"
               "methods: [mtcot-k5, {name: a, like: mtcot-k5, train: [head.context=-1], run: c},\n"
               "  {name: b, like: mtcot-k5, train: [head.context=-1], run: c,\n"
               "   decode: [decode.head_threshold=0.9]}, {name: r, like: rl, train: [head.context=-1]}]\n")
  spec = load_spec(str(p))
  a, b, r = spec.method("a"), spec.method("b"), spec.method("r")
  assert a.stages == b.stages and a.stages[0].name == "sft+c" and a.decode != b.decode
  assert [s.name for s in r.stages] == ["sft+r", "rl+r"] and r.stages[1].init_from == "sft+r"
  p.write_text(p.read_text().replace("train: [head.context=-1], run: c,\n",
                                     "train: [head.context=4], run: c,\n"))
  with pytest.raises(ConfigError, match="training run 'sft\\+c'"):
    load_spec(str(p))


def test_stage_overrides_apply_to_one_stage_last(tmp_path):
  """`stages: {rl: [...]}` changes the RL run alone, after the variant's train
  overrides: the RL stage of a longer SFT run keeps its own length."""
  p = tmp_path / "s.yaml"
  head = (f"base: {os.path.join(ROOT, 'configs', 'small.yaml')}\n"
          "tasks: {m: {task: mult, args: {digits: 2}}}\nrl: {overrides: [train.steps=7]}\n")
  p.write_text(head + "methods: [{name: r, like: rl, run: long, train: [train.steps=90],\n"
                      "           stages: {rl: [train.steps=11]}},\n"
                      "          {name: s, like: mtcot-k5, run: long, train: [train.steps=90]}]\n")
  spec = load_spec(str(p))
  sft, rl = spec.method("r").stages
  assert sft == spec.method("s").stages[0]           # the SFT run is shared, unchanged
  cell = next(c for c in cells(spec) if c.method.name == "r")
  assert stage_config(spec, cell, sft, str(tmp_path / "a")).train.steps == 90
  assert stage_config(spec, cell, rl, str(tmp_path / "b")).train.steps == 11
  for bad, match in (("stages: {sft2: [train.steps=3]}", "sft2"),
                     ("stages: [train.steps=3]", "a mapping")):
    p.write_text(head + "methods: [{name: r, like: rl, train: [train.steps=90], " + bad + "}]\n")
    with pytest.raises(ConfigError, match=match):
      load_spec(str(p))
