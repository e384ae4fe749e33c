"""The methods an experiment compares: each one a named config change.

A method is a chain of training *stages* (each an ordinary run, shared by every
method that names the same stage with the same changes) and the *evaluations*
of its last stage. No method has a code path of its own: what a method is,
is the overrides below.

  cot            SFT with the head's loss (stage `sft`), decoded with k=0.
  mtcot-kN       the same `sft` run, decoded with N head tokens per CoT block
                 (`decode.k=N`; N <= head.k: the head of `sft` is built with head.k);
                 also at k=0 (the same run's main model alone), not its headline.
  cot-truncated  the same `sft` run with k=0 and `decode.max_cot_tokens` set so that
                 its mean forward passes equal those of its pair (`truncated.pair`,
                 an mtcot method): the equal-compute baseline. Also evaluated with
                 the full budget (`trunc-full`) and at budgets that are fractions of
                 the full CoT's length (`truncated.fractions`): a curve.
  nocot          trained (`data.cot=false`) and evaluated to answer directly.
  frozen-main    the main model trained alone (`head.loss_weight=0`, stage
                 `main-only`), then only the head trained on it (`train.freeze_main=true`,
                 stage `head-on-main`): the main model never learns to use the channel.
  rl             GRPO (`train.stage=rl`) from the `sft` run at k = head.k.
  verified       the `sft` run decoded with k = head.k and `decode.verify=all`: the
                 head drafts, the main model keeps what it would write (k=0's
                 output, in fewer passes): the lossless baseline.

A spec may add methods as variants of these (`{name, like, train, decode, run}`):
`train` overrides make training runs of their own (named by `run`, default the
method's name: variants naming the same run share it, e.g. one head evaluated at
several adaptive thresholds), `decode` overrides change the evaluation only
(verified decoding, adaptive blocks and other heads go here).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training run. `name` is its directory under `<task>/_train/`; runs with
  the same name (within a task and seed) are one run."""
  name: str
  overrides: tuple[str, ...]
  init_from: str | None = None     # the name of the stage this one starts from


@dataclasses.dataclass(frozen=True)
class Eval:
  """One evaluation of a cell. budget: None (max_cot_tokens as configured),
  "paired" (equal passes with the pair) or a fraction of the full CoT."""
  name: str
  k: int
  cot: bool = True
  primary: bool = False
  budget: str | float | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  stages: tuple[Stage, ...]
  evals: tuple[Eval, ...]
  decode: tuple[str, ...] = ()     # overrides of the cell's config (its decode defaults)
  pair: str | None = None          # cot-truncated: the method whose passes it matches
  doc: str = ""


BUILTIN = ("cot", "mtcot-kN", "cot-truncated", "nocot", "frozen-main", "rl", "verified")
_MTCOT = re.compile(r"mtcot-k(\d+)$")

SFT = Stage("sft", ())


def builtin(name: str, *, head_k: int, pair: str | None = None,
            fractions: tuple[float, ...] = (), frozen: tuple[str, ...] = (),
            rl: tuple[str, ...] = ()) -> Method:
  """The built-in method `name` (see the module docstring). head_k: the spec's
  head.k; pair/fractions: cot-truncated's settings; frozen/rl: the overrides of
  the head-on-main and rl stages."""
  m = _MTCOT.match(name)
  if m:
    k = int(m.group(1))
    if not 1 <= k <= head_k:
      raise ValueError(f"method {name!r}: k={k} is not accepted: 1 <= k <= head.k={head_k}")
    return Method(name, (SFT,), (Eval(f"k{k}", k, primary=True), Eval("k0", 0)),
                  decode=(f"decode.k={k}",), doc=f"sft, decoded with k={k} (and k=0)")
  if name == "cot":
    return Method(name, (SFT,), (Eval("k0", 0, primary=True),), decode=("decode.k=0",),
                  doc="sft, decoded with k=0")
  if name == "verified":
    return Method(name, (SFT,), (Eval(f"k{head_k}", head_k, primary=True),),
                  decode=(f"decode.k={head_k}", "decode.verify=all"),
                  doc=f"sft, k={head_k} drafts verified by the main model (lossless)")
  if name == "cot-truncated":
    if pair is None:
      raise ValueError("method 'cot-truncated' needs truncated.pair (an mtcot method) in the spec")
    evals = (Eval("trunc-paired", 0, primary=True, budget="paired"), Eval("trunc-full", 0))
    evals += tuple(Eval(f"trunc-{f:g}", 0, budget=float(f)) for f in fractions)
    return Method(name, (SFT,), evals, decode=("decode.k=0",), pair=pair,
                  doc=f"sft, k=0, CoT budget at {pair}'s passes")
  if name == "nocot":
    return Method(name, (Stage("nocot", ("data.cot=false",)),),
                  (Eval("nocot", 0, cot=False, primary=True),), decode=("decode.k=0",),
                  doc="trained and decoded without a CoT")
  if name == "frozen-main":
    main = Stage("main-only", ("head.loss_weight=0.0",))
    head = Stage("head-on-main", ("train.freeze_main=true",) + tuple(frozen), init_from=main.name)
    return Method(name, (main, head), (Eval("k0", 0), Eval(f"k{head_k}", head_k, primary=True)),
                  decode=(f"decode.k={head_k}",),
                  doc="main trained alone, then the head alone on it")
  if name == "rl":
    stage = Stage("rl", ("train.stage=rl",) + tuple(rl), init_from=SFT.name)
    return Method(name, (SFT, stage), (Eval("k0", 0), Eval(f"k{head_k}", head_k, primary=True)),
                  decode=(f"decode.k={head_k}",), doc=f"GRPO from sft at k={head_k}")
  raise ValueError(f"unknown method {name!r}; accepted: {', '.join(BUILTIN)} "
                   "(mtcot-kN with 1 <= N <= head.k), or a mapping {name, like, train, decode}")


def variant(base: Method, name: str, train: tuple[str, ...], decode: tuple[str, ...],
            run: str | None = None, stage_train: dict[str, tuple[str, ...]] | None = None
            ) -> Method:
  """`base` with extra training overrides (its stages become runs of their own,
  named `<stage>+<run>`, `run` defaulting to the method's name: variants that
  name the same run share it) and extra decode overrides. `stage_train` maps a
  stage of `base` (`sft`, `rl`, `main-only`, `head-on-main`, `nocot`) to
  overrides applied last to that stage alone: e.g. `{rl: [train.steps=100]}`
  when `train` lengthens the SFT run that RL starts from."""
  stages = base.stages
  stage_train = dict(stage_train or {})
  unknown = set(stage_train) - {s.name for s in stages}
  if unknown:
    raise ValueError(f"method {name!r}: stages {sorted(unknown)} are not stages of "
                     f"{base.name!r}; accepted: {[s.name for s in stages]}")
  if not train and stage_train:
    raise ValueError(f"method {name!r}: `stages` needs `train` overrides (a run of its own)")
  if train:
    rename = {s.name: f"{s.name}+{run or name}" for s in stages}
    stages = tuple(Stage(rename[s.name],
                         s.overrides + tuple(train) + tuple(stage_train.get(s.name, ())),
                         rename.get(s.init_from) if s.init_from else None) for s in stages)
  return dataclasses.replace(base, name=name, stages=stages, decode=base.decode + tuple(decode),
                             doc=f"{base.name} with " + " ".join(train + decode))
