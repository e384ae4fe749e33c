"""Tasks: question, chain of thought and answer as plain text, plus a grader.

`get_task(name, **difficulty)` returns a `Task`; `task.example(seed)` is a
deterministic `Example(question, cot, answer)` and `task.grade(text, example)`
is 1.0 or 0.0. The synthetic tasks (`mult`, `perm`, `reach`) write only digits,
a few punctuation marks and short words, so that a sentencepiece model with
`split_digits=True` tokenizes every number digit by digit and the token
sequence is as regular as the text. A sum with many valid CoTs: sumorder.py. Word
problems: word_problems.py; GSM8K (tfds) and GSM8K-format files (`jsonl`):
gsm8k_jsonl.py.
"""

from __future__ import annotations

import dataclasses
import random
import re
from decimal import Decimal, InvalidOperation
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Example:
  """One example: `BOS question <think> cot </think> answer EOS` once tokenized."""
  question: str
  cot: str
  answer: str


class Task:
  """A task at a fixed difficulty. Subclasses set `name` and `DIFFICULTY`."""
  name: str = ""
  # difficulty keyword -> (default, lowest accepted, highest accepted)
  DIFFICULTY: dict[str, tuple[int, int, int]] = {}

  def __init__(self, **difficulty: int):
    for key, value in difficulty.items():
      if key not in self.DIFFICULTY:
        raise ValueError(f"task {self.name!r}: unknown difficulty {key}={value!r}; "
                         f"accepted: {self._accepted()}")
    values = {k: difficulty.get(k, d) for k, (d, _, _) in self.DIFFICULTY.items()}
    for key, value in values.items():
      _, lo, hi = self.DIFFICULTY[key]
      if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"task {self.name!r}: difficulty {key}={value!r} is out of range; "
                         f"accepted: an int in [{lo}, {hi}]")
    self.difficulty: dict[str, int] = values
    self._check()

  def _accepted(self) -> str:
    return ", ".join(f"{k} in [{lo}, {hi}] (default {d})"
                     for k, (d, lo, hi) in self.DIFFICULTY.items()) or "none"

  def _check(self) -> None:
    """Checks between difficulty values; raises ValueError."""

  @property
  def config_name(self) -> str:
    """A canonical name for this difficulty, e.g. 'digits_a=3,digits_b=3'."""
    return ",".join(f"{k}={v}" for k, v in sorted(self.difficulty.items())) or "default"

  def example(self, seed: int) -> Example:
    """The example for `seed`: the same seed always gives the same example."""
    return self._generate(self._rng(seed))

  def _rng(self, seed: int) -> random.Random:
    """The random generator `example(seed)` draws from."""
    return random.Random(f"{self.name}/{self.config_name}/{int(seed)}")

  def _generate(self, rng: random.Random) -> Example:
    raise NotImplementedError

  def grade(self, answer_text: str, example: Example) -> float:
    """1.0 if `answer_text` is a correct answer to `example`, else 0.0."""
    raise NotImplementedError

  def partial_credit(self, answer_text: str, example: Example) -> float:
    """A score in [0, 1] that is 1.0 exactly when `grade` is (a denser RL reward).
    By default the grade itself; tasks with structured answers refine it."""
    return self.grade(answer_text, example)

  def valid_cot(self, question: str, cot: str) -> bool | None:
    """Whether `cot` is a valid derivation of `question`'s answer, for tasks with
    several valid CoTs (`sumorder`); None where the task has one CoT per question
    and does not check others."""
    return None

  def reference(self, question: str) -> tuple[str, str] | None:
    """(the right answer, "" or why the question is outside what training showed)
    for a question in this task's format; None if it is not one (or the task
    cannot solve it)."""
    return None

  def __repr__(self) -> str:
    return f"get_task({self.name!r}, {self.config_name})"


def _rev(n: int, width: int) -> str:
  """`n` zero-padded to `width` digits, least significant digit first."""
  return str(n).zfill(width)[::-1]


def _no_space(text: str) -> str:
  return re.sub(r"\s+", "", text)


def digit_share(answer_text: str, ref: str) -> float:
  """The share of the digits of the number `ref` that `answer_text` (whitespace
  ignored) gets right, aligned from the least significant one: a longer or
  shorter answer loses the unmatched places; 0 for anything but digits."""
  text = _no_space(answer_text)
  if not re.fullmatch(r"\d+", text):
    return 0.0
  text = text.lstrip("0") or "0"
  hits = sum(a == b for a, b in zip(reversed(text), reversed(ref)))
  return hits / max(len(text), len(ref))


class Mult(Task):
  """Multiplication of an a-digit by a b-digit number, numbers written reversed.

  Every number in the question and the CoT is written least significant digit
  first (Lee et al. 2023: this ordering makes each output digit depend on
  digits already written). With W = a + b, every CoT number is zero-padded to
  W digits, so corresponding digits always sit at the same distance. The CoT is
  the chain `p0+p1=s1+p2=s2...`: `pj` is the multiplicand times multiplier
  digit j, already shifted by j places, and `sj` the running sum
  `p0 + ... + pj`. The answer is the product written normally.

  Example (digits=2, 57 x 38 = 2166, W = 4):
      question  75*83             (57 and 38, reversed)
      cot       6540+0171=6612    (456, 1710 and 456+1710=2166, reversed)
      answer    2166
  The grader compares integers and ignores whitespace.
  """
  name = "mult"
  DIFFICULTY = {"digits_a": (3, 1, 20), "digits_b": (3, 1, 20)}

  def __init__(self, digits: int | None = None, **difficulty: int):
    if digits is not None:
      clash = {"digits_a", "digits_b"} & set(difficulty)
      if clash:
        raise ValueError(f"task 'mult': give digits={digits!r} or {sorted(clash)}, not both")
      difficulty = {"digits_a": digits, "digits_b": digits}
    super().__init__(**difficulty)

  def _accepted(self) -> str:
    return "digits (both operands) or " + super()._accepted()

  def _generate(self, rng):
    na, nb = self.difficulty["digits_a"], self.difficulty["digits_b"]
    a = rng.randint(10 ** (na - 1), 10 ** na - 1)
    b = rng.randint(10 ** (nb - 1), 10 ** nb - 1)
    width = na + nb
    b_digits = [int(c) for c in str(b)[::-1]]
    parts, total = [], 0
    for j, digit in enumerate(b_digits):
      partial = a * digit * 10 ** j
      total += partial
      parts.append(_rev(partial, width) if j == 0 else
                   f"+{_rev(partial, width)}={_rev(total, width)}")
    return Example(question=f"{str(a)[::-1]}*{str(b)[::-1]}", cot="".join(parts),
                   answer=str(a * b))

  def reference(self, question):
    m = re.fullmatch(r"(\d+)\*(\d+)", _no_space(question))
    if not m:
      return None
    ra, rb = m.groups()
    a, b = int(ra[::-1]), int(rb[::-1])
    notes = []
    want = (self.difficulty["digits_a"], self.difficulty["digits_b"])
    if (len(ra), len(rb)) != want:
      notes.append(f"training used {want[0]}- by {want[1]}-digit operands")
    if ra.endswith("0") or rb.endswith("0"):
      notes.append("an operand has a leading zero (its last digit, written reversed), "
                   "which training never shows")
    return str(a * b), "; ".join(notes)

  def grade(self, answer_text, example):
    text = _no_space(answer_text)
    if not re.fullmatch(r"[+-]?\d+", text):
      return 0.0
    return float(int(text) == int(example.answer))

  def partial_credit(self, answer_text, example):
    """The share of the product's digits that are right (`digit_share`)."""
    return digit_share(answer_text, example.answer)


class Perm(Task):
  """Composition of permutations of the 5 symbols 0-4 (state tracking).

  The question is a start state and `num_perms` permutations in one-line
  notation; applying permutation p to state s gives t with t[i] = s[p[i]]. The
  CoT writes every intermediate state; the answer is the final state.

  Example (num_perms=2):
      question  31402:20143 31024     (start 31402, then 20143, then 31024)
      cot       43120 23410           (t[0] = s[2] = 4, t[1] = s[0] = 3, ...)
      answer    23410
  """
  name = "perm"
  DIFFICULTY = {"num_perms": (6, 1, 64)}
  SYMBOLS = "01234"

  def _generate(self, rng):
    def shuffled():
      return "".join(rng.sample(self.SYMBOLS, len(self.SYMBOLS)))
    start = state = shuffled()
    perms = [shuffled() for _ in range(self.difficulty["num_perms"])]
    states = []
    for p in perms:
      state = "".join(state[int(i)] for i in p)
      states.append(state)
    return Example(question=f"{start}:{' '.join(perms)}", cot=" ".join(states), answer=state)

  def reference(self, question):
    m = re.fullmatch(r"([0-4]{5}):((?:[0-4]{5} )*[0-4]{5})", question.strip())
    if not m:
      return None
    state, perms = m.group(1), m.group(2).split()
    if any(sorted(p) != list(self.SYMBOLS) for p in [state] + perms):
      return None
    for p in perms:
      state = "".join(state[int(i)] for i in p)
    n = self.difficulty["num_perms"]
    return state, "" if len(perms) == n else f"training used {n} permutations"

  def grade(self, answer_text, example):
    return float(_no_space(answer_text) == example.answer)


class Reach(Task):
  """Reachability in a random layered DAG (ProsQA-like), with a BFS CoT.

  Nodes are numbered 0..nodes-1 (shuffled labels) and sit in levels 0..depth
  in two components: the source's and another one. Edges go from a level to
  the next, within a component, plus some from the other component into the
  source's (so the other component is never reached from the source). The
  target is at level `depth`, in the source's component (answer `yes`; every
  path then has exactly `depth` edges) or in the other one (`no`), half each.
  The question lists the edges `u>v` and asks `? source>target`. The CoT is the
  breadth-first search: the levels reached from the source, each sorted and
  comma-separated, until the target is reached or nothing new is.

  Example (nodes=7, depth=2):
      question  4>1 2>5 4>0 1>3 5>6 5>3 ? 4>3
      cot       4 0,1 3
      answer    yes
  """
  name = "reach"
  DIFFICULTY = {"nodes": (12, 4, 99), "depth": (3, 1, 48)}

  def _check(self):
    n, d = self.difficulty["nodes"], self.difficulty["depth"]
    if n < 2 * (d + 1):
      raise ValueError(f"task 'reach': nodes={n} is too few for depth={d}; "
                       f"accepted: nodes >= 2 * (depth + 1) = {2 * (d + 1)}")

  def _generate(self, rng):
    n, d = self.difficulty["nodes"], self.difficulty["depth"]
    # levels[c][l]: the nodes of component c (0: the source's) at level l.
    levels = [[[] for _ in range(d + 1)] for _ in range(2)]
    node = 0
    for c in range(2):
      for lvl in range(d + 1):
        levels[c][lvl].append(node)
        node += 1
    for v in range(node, n):
      c = rng.randrange(2)
      levels[c][rng.randint(1 if c == 0 else 0, d)].append(v)
    edges = set()
    for c in range(2):
      for lvl in range(1, d + 1):
        for v in levels[c][lvl]:
          parents = levels[c][lvl - 1]
          for u in rng.sample(parents, min(len(parents), rng.choice((1, 1, 2)))):
            edges.add((u, v))
    for lvl in range(d):
      for u in levels[1][lvl]:
        if rng.random() < 0.3:
          edges.add((u, rng.choice(levels[0][lvl + 1])))
    source = levels[0][0][0]
    yes = rng.random() < 0.5
    target = rng.choice(levels[0 if yes else 1][d])
    labels = list(range(n))
    rng.shuffle(labels)
    edge_list = sorted(edges)
    rng.shuffle(edge_list)
    succ: dict[int, list[int]] = {}
    for u, v in edge_list:
      succ.setdefault(labels[u], []).append(labels[v])
    src, tgt = labels[source], labels[target]
    frontier, seen, cot_levels = [src], {src}, []
    while frontier:
      cot_levels.append(",".join(map(str, frontier)))
      if tgt in frontier:
        break
      nxt = sorted({w for u in frontier for w in succ.get(u, ()) if w not in seen})
      seen.update(nxt)
      frontier = nxt
    question = " ".join(f"{labels[u]}>{labels[v]}" for u, v in edge_list)
    return Example(question=f"{question} ? {src}>{tgt}", cot=" ".join(cot_levels),
                   answer="yes" if tgt in seen else "no")

  def reference(self, question):
    m = re.fullmatch(r"((?:\d+>\d+ )*\d+>\d+) \? (\d+)>(\d+)", question.strip())
    if not m:
      return None
    succ: dict[int, set[int]] = {}
    for edge in m.group(1).split():
      u, v = map(int, edge.split(">"))
      succ.setdefault(u, set()).add(v)
    src, tgt = int(m.group(2)), int(m.group(3))
    seen, frontier = {src}, [src]
    while frontier:
      frontier = [w for u in frontier for w in succ.get(u, ()) if w not in seen]
      seen.update(frontier)
    return "yes" if tgt in seen else "no", ""

  def grade(self, answer_text, example):
    return float(answer_text.strip().lower() == example.answer)


def _number(text: str) -> Decimal | None:
  text = _no_space(text).replace(",", "").lstrip("$").rstrip(".")
  try:
    return Decimal(text)
  except InvalidOperation:
    return None


def registry() -> dict[str, Callable[..., Task]]:
  """`TASKS`, {name: Task class} of every task, made on first use: it has the
  word problems too, whose modules import this one."""
  global TASKS
  if "TASKS" not in globals():
    from mtcot_jax.data.gsm8k_jsonl import GSM8K, Jsonl
    from mtcot_jax.data.sumorder import SumOrder
    from mtcot_jax.data.word_problems import WordProblems
    TASKS = {t.name: t for t in (Mult, Perm, Reach, SumOrder, GSM8K, WordProblems, Jsonl)}
  return TASKS


def __getattr__(name: str):  # `tasks.TASKS` is `registry()`
  if name != "TASKS":
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return registry()


def get_task(name: str, **difficulty) -> Task:
  """The task `name` at the given difficulty, e.g. `get_task("mult", digits=3)`
  (gsm8k: use `mtcot_jax.data.get_task`, which gives it its records). Raises
  ValueError for an unknown name or difficulty key, or a value out of range,
  naming it and what is accepted."""
  tasks = registry()
  if name not in tasks:
    raise ValueError(f"unknown task {name!r}; accepted: {sorted(tasks)}")
  try:
    return tasks[name](**difficulty)
  except TypeError as e:  # a keyword the constructor does not take
    raise ValueError(f"task {name!r}: bad difficulty {difficulty!r} ({e}); "
                     f"accepted: {tasks[name]()._accepted()}") from None
