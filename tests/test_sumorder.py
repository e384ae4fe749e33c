"""The `sumorder` task: every order of the terms is a valid CoT, training draws one
uniformly, the grader reads only the answer, and `valid_cot` checks a derivation.
References are built here from itertools.permutations, not from the task's code."""

import collections
import itertools
import os

import numpy as np
import pytest

from mtcot_jax.config import load_config
from mtcot_jax.data import get_task, make_train_iterator, tokenizer_for
from mtcot_jax.data.sumorder import SumOrder
from mtcot_jax.data.tasks import Example


def _all_cots(question):
  """Every valid CoT of `question`, built by hand: x1+x2=s2+... for each order."""
  terms = [int(t) for t in question.split("+")]
  out = set()
  for order in itertools.permutations(terms):
    text, total = str(order[0]), order[0]
    for x in order[1:]:
      total += x
      text += f"+{x}={total}"
    out.add(text)
  return out


@pytest.mark.parametrize("difficulty", [{}, {"terms": 3, "digits": 1}, {"terms": 5, "digits": 3}])
def test_examples_are_valid_and_short(difficulty):
  task = get_task("sumorder", **difficulty)
  n, d = task.difficulty["terms"], task.difficulty["digits"]
  for seed in list(range(200)) + [2 ** 40 + 3, 2 ** 41 + 5]:
    ex = task.example(seed)
    terms = [int(t) for t in ex.question.split("+")]
    assert len(terms) == len(set(terms)) == n
    assert all(10 ** (d - 1) <= t < 10 ** d for t in terms)
    assert ex.answer == str(sum(terms))
    assert ex.cot in _all_cots(ex.question)
    assert task.valid_cot(ex.question, ex.cot)
    assert ex == task.example(seed)                       # deterministic
  if not difficulty:   # the demo's seq_len 64: BOS q <think> cot </think> answer EOS
    longest = max(len(e.question) + len(e.cot) + len(e.answer) + 4
                  for e in map(task.example, range(2000)))
    assert longest <= 64 and max(len(task.example(s).cot) for s in range(2000)) <= 26


def test_one_question_many_cots_drawn_uniformly():
  """Seeds repeats*q .. repeats*q+repeats-1 share question q with their own orders,
  each of the 3! orders about equally often (counts within 5 sigma of uniform)."""
  task = get_task("sumorder", terms=3, digits=2, repeats=60)
  counts = collections.Counter()
  for q in range(40):
    group = [task.example(60 * q + j) for j in range(60)]
    assert len({ex.question for ex in group}) == 1
    assert {ex.cot for ex in group} == _all_cots(group[0].question)   # all 6 seen
    terms = group[0].question.split("+")
    for ex in group:    # which term comes first, second, third (as positions in the question)
      first, rest = ex.cot.split("+", 1)
      second = rest.split("=")[0]
      counts[(terms.index(first), terms.index(second))] += 1
    assert task.example(60 * q + 60).question != group[0].question
  assert len(counts) == 6
  mean, sigma = 2400 / 6, (2400 * (1 / 6) * (5 / 6)) ** 0.5
  assert all(abs(c - mean) < 5 * sigma for c in counts.values()), counts
  # With repeats=1 every seed is its own question, and training still shows every order.
  distinct = get_task("sumorder", repeats=1)
  assert len({distinct.example(s).question for s in range(50)}) == 50


def test_grader_reads_the_answer_whatever_the_cot():
  task = get_task("sumorder")
  ex = task.example(3)
  for cot in sorted(_all_cots(ex.question))[:5] + ["nonsense"]:
    same = Example(ex.question, cot, ex.answer)
    for ok in (ex.answer, f" {ex.answer} ", f"{ex.answer}\n"):
      assert task.grade(ok, same) == 1.0 and task.partial_credit(ok, same) == 1.0
  right = int(ex.answer)
  for bad in (str(right + 1), str(right - 10), ex.answer[::-1] + "1", "", "x", f"-{right}",
              f"{right}.5", ex.cot, f"{right}+0"):
    assert task.grade(bad, ex) == 0.0 and task.partial_credit(bad, ex) < 1.0, bad
  ref = Example("1+2", "1+2=3", "1234")
  assert task.partial_credit("1284", ref) == 0.75 and task.partial_credit("234", ref) == 0.75
  assert task.partial_credit("01234", ref) == 1.0 and task.partial_credit("99999", ref) == 0.0


def test_checker_accepts_every_order_and_rejects_corruptions():
  task = get_task("sumorder")
  q = "63+94+76+34"
  for cot in _all_cots(q):
    assert task.valid_cot(q, cot) and task.valid_cot(f" {q} ", " ".join(cot))
  good = "34+63=97+76=173+94=267"
  for bad in ["34+63=97+76=174+94=268",    # a wrong running sum, carried to the end
              "34+63=97+76=173+94=266",    # the last sum wrong
              "34+63=97+76=173",           # a term missing
              "34+63=97+76=173+94=267+34=301",   # a term used twice
              "34+63=97+76=173+95=268",    # a term not in the question
              "34+63=097+76=173+94=267",   # a leading zero
              "034+63=97+76=173+94=267",
              "34+63=97+76=173+94=267=",   # a dangling sign
              "34+63+76=173+94=267",       # a step without its sum
              "34+63=97,76=173+94=267", "", "267", "34+63=97 +76=173+94"]:
    assert not task.valid_cot(q, bad), bad
  assert task.valid_cot(q, good)
  assert task.valid_cot("5+5", "5+5=10")           # a repeated term, used as often as given
  assert not task.valid_cot("5+5", "5+5=10+5=15")
  with pytest.raises(ValueError, match=r"question='12 times 3' is not a sum; accepted: "):
    task.valid_cot("12 times 3", "36")
  assert get_task("mult").valid_cot("12*34", "x") is None     # one CoT per question


def test_reference_and_bad_difficulty():
  task = get_task("sumorder")
  assert task.reference("63+94+76+34") == ("267", "")
  assert task.reference("1+2+3") == ("6", "training used 4 terms; training used 2-digit terms")
  assert task.reference("12+12+30+40")[1] == "a term repeats, which training never shows"
  assert task.reference("what") is None
  assert isinstance(get_task("sumorder", terms=2), SumOrder)
  for kw, words in (({"terms": 1}, ["terms=1", "[2, 8]"]), ({"digits": 7}, ["digits=7"]),
                    ({"repeats": 0}, ["repeats=0"]), ({"order": 2}, ["order=2", "repeats in"])):
    with pytest.raises(ValueError) as err:
      get_task("sumorder", **kw)
    for w in words + ["accepted"]:
      assert w in str(err.value), str(err.value)


def test_demo_preset_trains_on_it_without_skipping(tmp_path):
  """configs/demo.yaml with data.task=sumorder: its tokenizer (trained on the train
  split) and seq_len fit every example; the batch's CoT tokens are a valid CoT."""
  demo = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml")
  cfg = load_config(demo, ["data.task=sumorder", "data.task_args={}", "data.train_size=200",
                           "data.eval_size=20", f"data.data_dir={tmp_path}", "train.batch_size=4"])
  assert cfg.data.seq_len == 64
  tok = tokenizer_for(cfg)
  it = make_train_iterator(cfg, tok, process_index=0, process_count=1)
  assert it.num_skipped == 0 and it.num_examples == 200
  batch = next(it)
  row = batch["inputs"][0][batch["segment_ids"][0] > 0]
  question = tok.decode(row[1:list(row).index(tok.think_id)])
  cot = batch["targets"][0][batch["cot_mask"][0] > 0][:-1]       # without </think>
  assert get_task("sumorder").valid_cot(question, tok.decode(cot))
  assert np.count_nonzero(batch["cot_mask"][0]) <= 26
