"""Tasks: deterministic generators, correct references, graders that can fail."""

import re
from collections import deque

import numpy as np
import pytest

from mtcot_jax.data.gsm8k_jsonl import GSM8K
from mtcot_jax.data.tasks import Example, get_task

SEEDS = range(40)
ALPHABET = re.compile(r"[0-9a-z*+=>?,:| ]*")


@pytest.mark.parametrize("name,difficulty", [
    ("mult", {"digits": 2}), ("mult", {"digits_a": 4, "digits_b": 1}),
    ("perm", {"num_perms": 5}), ("reach", {"nodes": 10, "depth": 3})])
def test_deterministic_and_plain_text(name, difficulty):
  task, again = get_task(name, **difficulty), get_task(name, **difficulty)
  examples = [task.example(s) for s in SEEDS]
  assert examples == [again.example(s) for s in SEEDS]
  assert len({ex.question for ex in examples}) > len(examples) // 2   # seeds differ
  for ex in examples:
    for text in (ex.question, ex.cot, ex.answer):
      assert text and text == text.strip() and "  " not in text
      assert ALPHABET.fullmatch(text), text


def test_mult_hand_worked():
  # seed 0 at 2x2 digits is 54 x 33 (question written reversed). Worked by hand:
  # 54*3 = 162 -> 0162 -> reversed 2610; 54*30 = 1620 -> 0261; 162+1620 = 1782 -> 2871.
  ex = get_task("mult", digits=2).example(0)
  assert ex == Example(question="45*33", cot="2610+0261=2871", answer="1782")


@pytest.mark.parametrize("na,nb", [(3, 3), (4, 2), (2, 1), (1, 3)])
def test_mult_reference(na, nb):
  task = get_task("mult", digits_a=na, digits_b=nb)
  width = na + nb
  for s in SEEDS:
    ex = task.example(s)
    qa, qb = ex.question.split("*")
    a, b = int(qa[::-1]), int(qb[::-1])
    assert (len(str(a)), len(str(b))) == (na, nb)
    assert int(ex.answer) == a * b and ex.answer == str(a * b)
    # The CoT, read as (reversed) numbers: p0, then (+pj, =sj) pairs.
    numbers = re.split(r"[+=]", ex.cot)
    assert all(len(n) == width for n in numbers)
    values = [int(n[::-1]) for n in numbers]
    b_digits = [int(d) for d in reversed(str(b))]
    assert values[0] == a * b_digits[0]
    total = values[0]
    for j in range(1, nb):
      partial, running = values[2 * j - 1], values[2 * j]
      assert partial == a * b_digits[j] * 10 ** j
      total += partial
      assert running == total
    assert len(values) == 2 * nb - 1 and total == a * b


def _perm_reference(question):
  start, perms = question.split(":")
  state = np.array(list(start))
  states = []
  for p in perms.split(" "):
    state = state[np.array([int(c) for c in p])]
    states.append("".join(state))
  return states


def test_perm_reference():
  task = get_task("perm", num_perms=7)
  for s in SEEDS:
    ex = task.example(s)
    start, perms = ex.question.split(":")
    assert sorted(start) == list("01234") and len(perms.split(" ")) == 7
    states = _perm_reference(ex.question)
    assert ex.cot == " ".join(states) and ex.answer == states[-1]


def _distances(edges, source):
  """Shortest distances by repeated relaxation (a different algorithm from BFS)."""
  dist = {source: 0}
  for _ in range(len(edges) + 1):
    for u, v in edges:
      if u in dist and dist[u] + 1 < dist.get(v, 1 << 30):
        dist[v] = dist[u] + 1
  return dist


def test_reach_reference():
  nodes, depth = 12, 3
  task = get_task("reach", nodes=nodes, depth=depth)
  answers = []
  for s in range(100):
    ex = task.example(s)
    edge_text, query = ex.question.split(" ? ")
    edges = [tuple(map(int, e.split(">"))) for e in edge_text.split(" ")]
    src, tgt = map(int, query.split(">"))
    assert {x for e in edges for x in e} <= set(range(nodes))
    # Acyclic: a DFS never meets a node on its own stack.
    succ = {}
    for u, v in edges:
      succ.setdefault(u, []).append(v)
    dist = _distances(edges, src)
    reachable = tgt in dist
    assert ex.answer == ("yes" if reachable else "no")
    if reachable:
      assert dist[tgt] == depth
    levels = [[int(x) for x in level.split(",")] for level in ex.cot.split(" ")]
    for k, level in enumerate(levels):
      assert level == sorted(level) and all(dist[x] == k for x in level)
    last = len(levels) - 1
    assert {x for level in levels for x in level} == {x for x, d in dist.items() if d <= last}
    if not reachable:   # the search ran dry
      assert all(d <= last for d in dist.values())
    assert not _has_cycle(succ)
    answers.append(ex.answer)
  assert 30 <= answers.count("yes") <= 70


def _has_cycle(succ):
  state = {}
  for root in succ:
    stack = deque([(root, iter(succ.get(root, ())))])
    if root in state:
      continue
    state[root] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        state[node] = 2
        stack.pop()
      elif state.get(child) == 1:
        return True
      elif child not in state:
        state[child] = 1
        stack.append((child, iter(succ.get(child, ()))))
  return False


@pytest.mark.parametrize("name,difficulty", [
    ("mult", {"digits": 3}), ("perm", {"num_perms": 4}), ("reach", {})])
def test_graders_accept_reference_reject_corruptions(name, difficulty):
  task = get_task(name, **difficulty)
  for s in range(20):
    ex = task.example(s)
    assert task.grade(ex.answer, ex) == 1.0
    assert task.grade(f"  {ex.answer}\n", ex) == 1.0
    wrong = ["", "garbage", ex.answer + ex.answer[-1], ex.answer[:-1], ex.cot]
    if name == "mult":
      wrong += [str(int(ex.answer) + 1), str(int(ex.answer) * 10), ex.answer[::-1] + "1"]
    if name == "perm":
      wrong += [ex.answer[1] + ex.answer[0] + ex.answer[2:], "01234" if ex.answer != "01234"
                else "10234"]
    if name == "reach":
      wrong += ["no" if ex.answer == "yes" else "yes", "maybe", "yes no"]
    for w in wrong:
      assert task.grade(w, ex) == 0.0, (w, ex)


def test_mult_grader_whitespace_and_integers():
  task = get_task("mult", digits=2)
  ex = Example("45*33", "2610+0261=2871", "1782")
  for ok in ("1782", " 1782 ", "1 782", "\t1782\n"):
    assert task.grade(ok, ex) == 1.0
  for bad in ("1781", "1782.5", "2871", "17 82 0", "-1782", "1782x"):
    assert task.grade(bad, ex) == 0.0


def test_gsm8k_record_and_grader():
  record = {"question": b"Natalia sold 48 clips. How many?",
            "annotation": b"Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72.",
            "short_answer": b"72", "answer": b"unused"}
  ex = GSM8K.from_record(record)
  assert ex.question == "Natalia sold 48 clips. How many?"
  assert ex.cot == "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72."
  assert ex.answer == "72"
  task = get_task("gsm8k")
  for ok in ("72", " 72 ", "72.0", "$72", "72."):
    assert task.grade(ok, ex) == 1.0
  for bad in ("", "73", "seventy-two", "7 3", "72 dollars"):
    assert task.grade(bad, ex) == 0.0
  big = Example("q", "c", "1,000")
  assert task.grade("1000", big) == 1.0 and task.grade("1,000", big) == 1.0


@pytest.mark.parametrize("name,difficulty,words", [
    ("nope", {}, ["'nope'", "mult", "perm", "reach", "gsm8k"]),
    ("mult", {"digits": 0}, ["digits_a=0", "[1, 20]"]),
    ("mult", {"digits_a": 21}, ["digits_a=21", "[1, 20]"]),
    ("mult", {"digits": 2, "digits_b": 3}, ["digits=2", "digits_b"]),
    ("mult", {"num_perms": 3}, ["num_perms=3", "digits_a"]),
    ("perm", {"num_perms": 0}, ["num_perms=0", "[1, 64]"]),
    ("perm", {"num_perms": 2.5}, ["num_perms=2.5"]),
    ("reach", {"nodes": 6, "depth": 3}, ["nodes=6", "depth=3", ">= 2 * (depth + 1) = 8"]),
    ("reach", {"depth": 0}, ["depth=0"]),
    ("gsm8k", {"digits": 3}, ["digits", "gsm8k"]),
])
def test_bad_task_or_difficulty(name, difficulty, words):
  with pytest.raises(ValueError) as err:
    get_task(name, **difficulty)
  for w in words:
    assert w in str(err.value), (w, str(err.value))


def test_mult_partial_credit():
  task = get_task("mult", digits=2)
  ex = Example(question="", cot="", answer="2166")
  assert task.partial_credit("2166", ex) == 1.0 == task.grade("2166", ex)
  assert task.partial_credit("02166", ex) == 1.0          # as grade: the same integer
  assert task.partial_credit("2106", ex) == 0.75           # one digit wrong
  assert task.partial_credit("166", ex) == 0.75            # a place missing
  assert task.partial_credit("12166", ex) == 0.8           # a place too many
  assert task.partial_credit("abc", ex) == 0.0
  assert get_task("perm", num_perms=2).partial_credit("x", ex) == 0.0   # default: the grade
