"""Experiment specs: a base preset, tasks, methods and seeds, expanded into cells.

    # configs/experiments/smoke.yaml
    base: ../demo.yaml              # a preset, relative to this file
    overrides: [train.steps=50]     # every run of every cell
    seeds: 2                        # experiment seeds 0..N-1 (or a list)
    eval_examples: 500              # held-out problems per evaluation
    split: validation               # what cells are evaluated on; test: a final table
    tasks:
      mult3: {task: mult, args: {digits: 3}, overrides: []}
    methods: [cot, mtcot-k5, cot-truncated, nocot, frozen-main, rl,
              {name: mtcot-k5-wide, like: mtcot-k5, train: [head.width=128]},
              {name: rl-long, like: rl, train: [train.steps=3200],   # a longer sft run,
               stages: {rl: [train.steps=100]}}]                   # RL kept at 100 steps
    truncated: {pair: mtcot-k5, fractions: [0.25, 0.5, 0.75]}
    frozen_main: {overrides: [train.steps=800]}   # the head-only stage
    rl: {overrides: [train.steps=100]}            # the GRPO stage

Every key is checked when the spec is loaded, and every run's config is built
(so a bad override fails before anything trains).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from mtcot_jax.config import Config, ConfigError, load_config
from mtcot_jax.config_checks import EVAL_SPLITS
from mtcot_jax.data.tasks import get_task
from mtcot_jax.experiments import methods as mm

_KEYS = {"base", "overrides", "seeds", "eval_examples", "split", "tasks", "methods",
         "truncated", "frozen_main", "rl"}


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  task: str
  args: tuple[tuple[str, Any], ...]
  overrides: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Spec:
  path: str
  base: str                        # absolute path of the base preset
  overrides: tuple[str, ...]
  seeds: tuple[int, ...]
  eval_examples: int
  tasks: tuple[Task, ...]
  methods: tuple[mm.Method, ...]
  split: str = "validation"        # the held-out split cells are evaluated on

  def method(self, name: str) -> mm.Method:
    return next(m for m in self.methods if m.name == name)


@dataclasses.dataclass(frozen=True)
class Cell:
  task: Task
  method: mm.Method
  seed: int

  @property
  def id(self) -> str:
    """`<task>/<method>/seed<i>`: the cell's directory under the output directory."""
    return f"{self.task.name}/{self.method.name}/seed{self.seed}"


def _err(path: str, key: str, value: Any, accepted: str) -> ConfigError:
  return ConfigError(f"{path}: {key}={value!r} is not accepted: {accepted}")


def _str_list(path: str, key: str, value: Any) -> tuple[str, ...]:
  if value is None:
    return ()
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise _err(path, key, value, "a list of section.key=value strings")
  return tuple(value)


def load_spec(path: str, seeds: int | None = None, split: str | None = None) -> Spec:
  """Reads and checks a spec; `seeds` (the --seeds flag) replaces its seeds by 0..N-1,
  `split` (the --split flag) its split."""
  raw = _read(path)
  if "base" not in raw or not isinstance(raw["base"], str):
    raise _err(path, "base", raw.get("base"), "a preset path, relative to the spec")
  base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), raw["base"]))
  overrides = _str_list(path, "overrides", raw.get("overrides"))
  seed_list = _seeds(path, raw.get("seeds", 3) if seeds is None else seeds)
  n_eval = raw.get("eval_examples", 500)
  if not isinstance(n_eval, int) or isinstance(n_eval, bool) or n_eval < 1:
    raise _err(path, "eval_examples", n_eval, "an int >= 1")
  split = raw.get("split", "validation") if split is None else split
  if split not in EVAL_SPLITS:
    raise _err(path, "split", split, f"one of {EVAL_SPLITS} (validation: for choosing "
               "settings; test: once, for a final table)")
  tasks = _tasks(path, raw.get("tasks"))
  trunc, frozen, rl = _stage_sections(path, raw)
  kw = dict(head_k=load_config(base, overrides).head.k, pair=trunc.get("pair"),
            fractions=tuple(trunc.get("fractions") or []),
            frozen=_str_list(path, "frozen_main.overrides", frozen.get("overrides")),
            rl=_str_list(path, "rl.overrides", rl.get("overrides")))
  methods = _methods(path, raw.get("methods"), kw)
  spec = Spec(path=os.path.abspath(path), base=base, overrides=overrides, seeds=seed_list,
              eval_examples=n_eval, tasks=tasks, methods=methods, split=split)
  for cell in cells(spec):        # every run's config is valid before anything runs
    for stage in cell.method.stages:
      stage_config(spec, cell, stage, "/tmp/_check")
    cell_config(spec, cell, "/tmp/_check")
  return spec


def _read(path: str) -> dict:
  """The spec file's mapping, its keys checked against `_KEYS`."""
  if not os.path.exists(path):
    raise ConfigError(f"experiment spec {path} does not exist")
  with open(path) as f:
    raw = yaml.safe_load(f) or {}
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: expected a mapping, got {raw!r}")
  unknown = set(raw) - _KEYS
  if unknown:
    raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; accepted: {sorted(_KEYS)}")
  return raw


def _seeds(path: str, s: Any) -> tuple[int, ...]:
  """`seeds: N` as 0..N-1, or a list of distinct seeds as given."""
  if isinstance(s, int) and not isinstance(s, bool) and s >= 1:
    return tuple(range(s))
  if (isinstance(s, list) and s and all(isinstance(x, int) and x >= 0 for x in s)
      and len(set(s)) == len(s)):
    return tuple(s)
  raise _err(path, "seeds", s, "an int >= 1 (seeds 0..N-1) or a list of distinct ints >= 0")


def _tasks(path: str, raw_tasks: Any) -> tuple[Task, ...]:
  """The `tasks:` mapping, each task built once to check its name and arguments."""
  tasks = []
  if not isinstance(raw_tasks, dict) or not raw_tasks:
    raise _err(path, "tasks", raw_tasks, "a mapping name -> {task, args, overrides}")
  for name, t in raw_tasks.items():
    if not isinstance(t, dict) or "task" not in t or set(t) - {"task", "args", "overrides"}:
      raise _err(path, f"tasks.{name}", t, "a mapping with task, optional args and overrides")
    args = t.get("args") or {}
    if not isinstance(args, dict):
      raise _err(path, f"tasks.{name}.args", args, "a mapping of difficulty keywords")
    try:
      get_task(t["task"], **args)
    except ValueError as e:
      raise ConfigError(f"{path}: tasks.{name}: {e}") from None
    if "/" in str(name) or not str(name):
      raise _err(path, "tasks", name, "task names without '/'")
    tasks.append(Task(str(name), t["task"], tuple(sorted(args.items())),
                      _str_list(path, f"tasks.{name}.overrides", t.get("overrides"))))
  return tuple(tasks)


def _stage_sections(path: str, raw: dict) -> tuple[dict, dict, dict]:
  """The `truncated`, `frozen_main` and `rl` mappings, their keys and fractions checked."""
  def section(key):
    v = raw.get(key) or {}
    if not isinstance(v, dict):
      raise _err(path, key, v, "a mapping")
    return v

  trunc, frozen, rl = section("truncated"), section("frozen_main"), section("rl")
  for key, v, allowed in (("truncated", trunc, {"pair", "fractions"}),
                          ("frozen_main", frozen, {"overrides"}), ("rl", rl, {"overrides"})):
    if set(v) - allowed:
      raise _err(path, key, v, f"a mapping with keys among {sorted(allowed)}")
  fractions = trunc.get("fractions") or []
  if not isinstance(fractions, list) or not all(
      isinstance(f, (int, float)) and 0 < f < 1 for f in fractions):
    raise _err(path, "truncated.fractions", fractions, "a list of numbers in (0, 1)")
  return trunc, frozen, rl


def _methods(path: str, raw_methods: Any, kw: dict[str, Any]) -> tuple[mm.Method, ...]:
  """The `methods:` list: built-in names and variants ({name, like, ...}) built with
  `kw` (mm.builtin's settings), then checked as a whole."""
  methods: list[mm.Method] = []
  if not isinstance(raw_methods, list) or not raw_methods:
    raise _err(path, "methods", raw_methods, f"a list of methods ({', '.join(mm.BUILTIN)})")
  for m in raw_methods:
    try:
      methods.append(_method(path, m, kw))
    except ValueError as e:
      raise ConfigError(f"{path}: {e}") from None
  names = [m.name for m in methods]
  if len(set(names)) != len(names):
    raise _err(path, "methods", names, "distinct method names")
  seen: dict[str, mm.Stage] = {}
  for m in methods:       # one name, one training run: the same changes
    for st in m.stages:
      if seen.setdefault(st.name, st) != st:
        raise _err(path, "methods", m.name, f"training run {st.name!r} is named by methods "
                   "with different train overrides; accepted: one `run` name per set of changes")
  multi = [m.name for m in methods if m.pair is None and any(e.primary and e.k > 0
                                                               for e in m.evals)]
  for m in methods:
    if m.pair is not None and m.pair not in multi:
      raise _err(path, "truncated.pair", m.pair, f"one of the spec's multi-token methods {multi}")
  return tuple(methods)


def _method(path: str, m: Any, kw: dict[str, Any]) -> mm.Method:
  """One entry of `methods:`. Raises ValueError (or ConfigError) for a bad one."""
  if isinstance(m, str):
    return mm.builtin(m, **kw)
  if isinstance(m, dict) and {"name", "like"} <= set(m) <= {"name", "like", "train",
                                                             "decode", "run", "stages"}:
    per_stage = m.get("stages") or {}
    if not isinstance(per_stage, dict):
      raise _err(path, f"{m['name']}.stages", per_stage,
                 "a mapping {stage: [section.key=value, ...]}")
    return mm.variant(mm.builtin(m["like"], **kw), str(m["name"]),
                      _str_list(path, f"{m['name']}.train", m.get("train")),
                      _str_list(path, f"{m['name']}.decode", m.get("decode")),
                      m.get("run"),
                      {str(st): _str_list(path, f"{m['name']}.stages.{st}", ov)
                       for st, ov in per_stage.items()})
  raise ValueError(f"method {m!r}: accepted a name or a mapping "
                   "{name, like, train, decode, run, stages}")


def cells(spec: Spec, only: str | None = None) -> list[Cell]:
  """Every cell, tasks outermost, then seeds, then methods; a cot-truncated cell
  after its pair. `only`: a glob on the cell id (`mult3/*`, `*/cot/seed0`)."""
  import fnmatch
  order = sorted(spec.methods, key=lambda m: m.pair is not None)
  out = [Cell(t, m, s) for t in spec.tasks for s in spec.seeds for m in order]
  if only:
    out = [c for c in out if fnmatch.fnmatch(c.id, only)]
  return out


def _task_overrides(spec: Spec, task: Task) -> list[str]:
  args = yaml.safe_dump(dict(task.args), default_flow_style=True).strip()
  return [f"data.task={task.task}", f"data.task_args={args}",
          f"data.eval_size={spec.eval_examples}"]


def stage_dir(out: str, cell: Cell, stage: mm.Stage) -> str:
  return os.path.join(out, cell.task.name, "_train", stage.name, f"seed{cell.seed}")


def stage_config(spec: Spec, cell: Cell, stage: mm.Stage, out: str) -> Config:
  """The config of one training run: base, spec, task, seed, then the stage's changes."""
  init = ([f"train.init_from={stage_dir(out, cell, _stage(cell, stage.init_from))}"]
          if stage.init_from else [])
  return load_config(spec.base, [
      *spec.overrides, *_task_overrides(spec, cell.task), *cell.task.overrides,
      f"train.seed={cell.seed}", f"data.seed={cell.seed}", *stage.overrides, *init,
      f"train.workdir={stage_dir(out, cell, stage)}", "train.eval_examples=0"])


def cell_config(spec: Spec, cell: Cell, out: str) -> Config:
  """The cell's config: its last stage's, with the method's decode settings, the
  spec's split and the cell as the workdir (so `decode.py --checkpoint <cell>`
  decodes as the method does, on the split the cell was evaluated on). Training
  runs do not depend on the split: one run serves validation and test."""
  cfg = stage_config(spec, cell, cell.method.stages[-1], out)
  return _with(cfg, list(cell.method.decode) + [
      f"train.workdir={os.path.join(out, cell.id)}",
      f"train.eval_examples={spec.eval_examples}", f"data.eval_split={spec.split}"])


def _with(cfg: Config, overrides: list[str]) -> Config:
  from mtcot_jax.config import parse_override
  changes: dict[str, dict[str, Any]] = {}
  for text in overrides:
    section, key, value = parse_override(text)
    changes.setdefault(section, {})[key] = value
  return cfg.replace(**changes)


def _stage(cell: Cell, name: str) -> mm.Stage:
  return next(s for s in cell.method.stages if s.name == name)
