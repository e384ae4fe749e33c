"""Word problems: the generated `wordprob` task (its arithmetic re-computed from
the CoT), the first-number grader, and the GSM8K-format `jsonl` task."""

import collections
import json
import re

import pytest

from mtcot_jax.data import tasks
from mtcot_jax.data.gsm8k_jsonl import Jsonl, read_jsonl
from mtcot_jax.data.tasks import Example, get_task
from mtcot_jax.data.word_problems import WordProblems, first_number

# One operation as the CoT writes it: "a op b = c", the result maybe in dollars.
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
         "/": lambda a, b: a // b}


def test_registered_and_deterministic():
  assert {"wordprob", "jsonl"} <= set(tasks.TASKS)
  from mtcot_jax.data import TASKS, get_task as catalog_get_task
  assert TASKS is tasks.registry() and isinstance(catalog_get_task("wordprob"), WordProblems)
  task, again = get_task("wordprob", ops=3), get_task("wordprob", ops=3)
  examples = [task.example(s) for s in range(60)]
  assert examples == [again.example(s) for s in range(60)]
  assert len({ex.question for ex in examples}) == len(examples)
  assert task.difficulty == {"ops": 3, "max_value": 1000}
  assert get_task("wordprob").difficulty["ops"] == 2


@pytest.mark.parametrize("ops", [1, 2, 3, 4])
def test_every_template_appears(ops):
  task = get_task("wordprob", ops=ops)
  counts = collections.Counter(task.template(s) for s in range(300))
  assert set(counts) == set(WordProblems.TEMPLATES) and len(counts) >= 6
  assert min(counts.values()) >= 15


def _check_arithmetic(ex: Example, ops: int, max_value: int) -> list[str]:
  """Re-computes the CoT's arithmetic; returns the operators used."""
  sentences = re.split(r"(?<=\.) ", ex.cot)
  assert len(sentences) == ops, ex
  results, used_operands, operators = [], set(), []
  question_numbers = {int(n) for n in re.findall(r"\d+", ex.question)}
  for sentence in sentences:
    steps = STEP.findall(sentence)
    assert len(steps) == 1, (sentence, ex)     # one operation a sentence
    a, op, b, c = steps[0]
    a, b, c = int(a), int(b), int(c)
    if op == "/":
      assert b > 0 and a % b == 0, ex          # exact division
    assert APPLY[op](a, b) == c and c > 0, ex
    for x in (a, b):                            # each operand from the question or a result
      assert x in question_numbers or x in results, (x, ex)
    used_operands |= {a, b}
    results.append(c)
    operators.append(op)
  assert str(results[-1]) == ex.answer, ex
  assert question_numbers <= used_operands, ex  # nothing in the question is ignored
  assert max(question_numbers | set(results)) <= max_value, ex
  return operators


@pytest.mark.parametrize("ops,max_value", [(1, 1000), (2, 1000), (3, 1000), (4, 1000),
                                           (4, 100), (3, 250)])
def test_cot_arithmetic_recomputes_the_answer(ops, max_value):
  task = get_task("wordprob", ops=ops, max_value=max_value)
  operators = collections.Counter()
  for s in range(250):
    ex = task.example(s)
    assert ex.question.endswith("?") and ex.question.count("?") == 1
    for text in (ex.question, ex.cot, ex.answer):
      assert text == text.strip() and "  " not in text and "{" not in text
    operators.update(_check_arithmetic(ex, ops, max_value))
    assert task.grade(ex.answer, ex) == 1.0
  if ops >= 2:
    assert set(operators) == {"+", "-", "*", "/"}


def test_hand_worked_example():
  ex = get_task("wordprob", ops=2).example(7)   # the docstring's example
  assert ex == Example(
      question="Leo has 16 erasers. Ivan has 3 times as many erasers as Leo. Kofi has 24 "
               "fewer erasers than Ivan. How many erasers does Kofi have?",
      cot="Ivan has 16 * 3 = 48 erasers. Kofi has 48 - 24 = 24 erasers.", answer="24")


@pytest.mark.parametrize("difficulty,words", [
    ({"ops": 0}, ["ops=0", "[1, 4]"]), ({"ops": 5}, ["ops=5", "[1, 4]"]),
    ({"max_value": 99}, ["max_value=99", "[100, 1000000]"]),
    ({"digits": 3}, ["digits=3", "ops in [1, 4]"])])
def test_wordprob_bad_difficulty(difficulty, words):
  with pytest.raises(ValueError) as err:
    get_task("wordprob", **difficulty)
  for w in words:
    assert w in str(err.value), str(err.value)


def test_first_number_and_grader():
  ex = Example("q", "c", "1200")
  task = get_task("wordprob")
  for ok in ("1200", " 1200 ", "$1,200", "Answer: 1200 apples", "1200.", "1,200.", "1200.0",
             "#### 1200", "The answer is $1,200.\nDone 7", "1200 (after 3 steps)"):
    assert task.grade(ok, ex) == 1.0, ok
  for bad in ("", "none", "120", "12000", "-1200", "1200.5", "3 boxes, 1200", "12 00",
              "one thousand two hundred", "1,2000"):
    assert task.grade(bad, ex) == 0.0, bad
  assert first_number("he owes -$7.") == -7 and first_number("x - 7") == 7
  assert first_number("1,234,567 and 8") == 1234567 and first_number("no digits") is None
  assert task.grade("-7", Example("q", "c", "-7")) == 1.0


# ---------------------------------------------------------------------------
# jsonl

def _line(i: int) -> dict:
  return {"question": f"Tom has {i} pens and buys {i} more. How many now?",
          "answer": f"Tom has {i}+{i} = <<{i}+{i}={2 * i}>>{2 * i} pens.\n#### {2 * i:,}"}


def _write(path, records, extra: str = "") -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + extra)
  return str(path)


def test_jsonl_splits(tmp_path):
  path = _write(tmp_path / "train.jsonl", [_line(i) for i in range(10)], "\n")   # a blank line
  train = get_task("jsonl", path=path, validation=3)
  val = get_task("jsonl", path=path, split="validation", validation=3)
  both = get_task("jsonl", path=path, split="all", validation=3)
  assert len(train.examples()) == 7 and len(val.examples()) == 3 and len(both.examples()) == 10
  assert both.examples() == train.examples() + val.examples()       # the last 3 held out
  assert not {e.question for e in train.examples()} & {e.question for e in val.examples()}
  assert val.example(0) == Example(question="Tom has 7 pens and buys 7 more. How many now?",
                                   cot="Tom has 7+7 = 14 pens.", answer="14")
  assert [train.example(s) for s in range(7)] == train.examples()
  big = get_task("jsonl", path=_write(tmp_path / "big.jsonl", [_line(600)]), split="all",
                 validation=0).example(0)
  assert big.answer == "1200" and big.cot == "Tom has 600+600 = 1200 pens."
  assert train.grade("$1,200", big) == 1.0 and train.grade("1,201", big) == 0.0
  for bad in (7, -1, 1.5, True):
    with pytest.raises(ValueError, match=re.escape("accepted: an int in [0, 7) (the train")):
      train.example(bad)


def test_jsonl_read_once(tmp_path):
  src = tmp_path / "p.jsonl"
  task = get_task("jsonl", path=_write(src, [_line(i) for i in range(4)]), validation=1)
  assert task.example(0).answer == "0"
  src.unlink()                                   # read already: no second read
  assert task.example(2).answer == "4" and len(task.examples("validation")) == 1


@pytest.mark.parametrize("content,words", [
    ('{"question": "q", "answer": "#### 1"}\nnot json\n', ["line 2", "not JSON"]),
    ('[1, 2]\n', ["line 1", "a JSON list, not an object"]),
    ('{"question": "q"}\n', ["line 1", "'answer' is None"]),
    ('{"question": "", "answer": "#### 3"}\n', ["line 1", "'question' is ''"]),
    ('{"question": "q", "answer": "so 3"}\n', ["line 1", "no '####'"]),
    ('{"question": "q", "answer": "so #### three"}\n', ["line 1", "'three', not a number"]),
    ('\n\n', ["holds no problems"]),
])
def test_jsonl_malformed(tmp_path, content, words):
  path = tmp_path / "bad.jsonl"
  path.write_text(content)
  with pytest.raises(ValueError) as err:
    read_jsonl(str(path))
  msg = str(err.value)
  for w in words + [str(path), "accepted:", "'question' and 'answer'"]:
    assert w in msg, msg


def test_jsonl_errors(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match=re.escape(f"no file at path={missing!r}")):
    get_task("jsonl", path=missing).example(0)
  path = _write(tmp_path / "t.jsonl", [_line(i) for i in range(5)])
  with pytest.raises(ValueError, match=r"validation=500 leaves no training problems.*"
                                       r"\(5 problems\); accepted: validation < 5"):
    get_task("jsonl", path=path).example(0)
  (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
  with pytest.raises(ValueError, match="line 1: not UTF-8"):
    read_jsonl(str(tmp_path / "latin1.jsonl"))
  for args, words in [({}, ["path=''"]), ({"path": path, "split": "test"}, ["split='test'"]),
                      ({"path": path, "validation": -1}, ["validation=-1"]),
                      ({"path": path, "valid": 3}, ["valid=3", "split in"])]:
    with pytest.raises(ValueError) as err:
      get_task("jsonl", **args)
    for w in words + ["accepted:"]:
      assert w in str(err.value), str(err.value)
  with pytest.raises(ValueError, match="split='dev'"):
    get_task("jsonl", path=path, validation=1).examples("dev")
  assert "/" not in get_task("jsonl", path=path).config_name   # a directory name
  assert isinstance(tasks.TASKS["jsonl"](path=path), Jsonl)


# ---------------------------------------------------------------------------
# training data (tfds builders: imported here only)

def test_training_splits(tmp_path):
  from mtcot_jax.config import load_config
  from mtcot_jax.data import builders
  path = _write(tmp_path / "gsm.jsonl", [_line(i) for i in range(12)])
  data = load_config(None, ["data.task=jsonl", f"data.task_args={{path: '{path}', "
                            "validation: 4}", "data.train_size=5", "data.eval_size=10"]).data
  train, val = builders.split_source(data, "train"), builders.split_source(data, "validation")
  assert len(train) == 5 and len(val) == 4       # train capped by data.train_size
  assert train[1].answer == "2" and val[0].answer == "16"
  assert val.__getitems__([3, 0]) == [val[3], val[0]]
  with pytest.raises(ValueError, match="split='test' is not accepted for task 'jsonl'.*"
                                       "accepted: 'train', 'validation'"):
    builders.split_source(data, "test")

  data = load_config(None, [f"data.data_dir={tmp_path}", "data.task=wordprob",
                            "data.task_args={ops: 3}", "data.train_size=40",
                            "data.eval_size=8"]).data
  train, test = builders.split_source(data, "train"), builders.split_source(data, "test")
  val = builders.split_source(data, "validation")
  assert len(train) == 40 and len(test) == len(val) == 8
  task = get_task("wordprob", ops=3)
  assert {train[i] for i in range(40)} == {task.example(s) for s in range(40)}
  questions = [{split[i].question for i in range(len(split))} for split in (train, val, test)]
  assert sum(map(len, questions)) == len(set.union(*questions))
