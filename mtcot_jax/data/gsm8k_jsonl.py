"""GSM8K: from tensorflow-datasets (the `gsm8k` task) or from a local JSON-lines
file in its format (the `jsonl` task).

    task = get_task("jsonl", path="../shared/data/gsm8k/train.jsonl", split="validation")

Registered in `tasks.TASKS` by `tasks.registry()`, which reads this module on
first use (it imports tasks.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Callable

from mtcot_jax.data.tasks import Example, Task, _number
from mtcot_jax.data.word_problems import grade_first_number

_CALCULATOR = re.compile(r"<<[^<>]*>>")

_FORMAT = ("one JSON object a line with non-empty strings 'question' and 'answer', the "
           "answer a worked solution ending in '#### N', N a number (commas allowed)")
_ANSWER = re.compile(r"-?\d+(?:\.\d+)?")


def read_jsonl(path: str) -> list[Example]:
  """The Examples of a GSM8K-format JSON-lines file, in file order (blank lines
  skipped): the question; the CoT, the solution before `####` without its
  `<<48/2=24>>` calculator annotations; the answer, the number after `####`
  without commas. Raises FileNotFoundError or ValueError (naming the path, the
  line and what is accepted) for a missing file or a malformed line."""
  try:
    f = open(path, "rb")
  except FileNotFoundError:
    raise FileNotFoundError(f"task 'jsonl': no file at path={path!r}; accepted: a JSON-lines "
                            f"file, {_FORMAT}") from None
  with f:
    examples = [_parse_line(raw, path, lineno) for lineno, raw in enumerate(f, 1)
                if raw.strip()]
  if not examples:
    raise ValueError(f"task 'jsonl': {path} holds no problems; accepted: {_FORMAT}")
  return examples


def _parse_line(raw: bytes, path: str, lineno: int) -> Example:
  def bad(why: str) -> ValueError:
    return ValueError(f"task 'jsonl': {path}, line {lineno}: {why}; accepted: {_FORMAT}")
  try:
    record = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError:
    raise bad("not UTF-8 text") from None
  except json.JSONDecodeError as e:
    raise bad(f"not JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(record, dict):
    raise bad(f"a JSON {type(record).__name__}, not an object")
  for key in ("question", "answer"):
    if not isinstance(record.get(key), str) or not record[key].strip():
      raise bad(f"{key!r} is {record.get(key)!r}")
  solution, sep, tail = record["answer"].rpartition("####")
  if not sep:
    raise bad("the answer has no '####'")
  answer = tail.strip().replace(",", "")
  if not _ANSWER.fullmatch(answer):
    raise bad(f"the text after '####' is {tail.strip()!r}, not a number")
  return Example(question=record["question"].strip(),
                 cot=_CALCULATOR.sub("", solution).strip(), answer=answer)


class Jsonl(Task):
  """Word problems in GSM8K's format from a local JSON-lines file (`read_jsonl`).

  `get_task("jsonl", path=..., split="train", validation=500)`: the file's last
  `validation` problems are the `validation` split, the others the `train`
  split (`all`: every problem, in file order). `example(seed)` is problem
  number `seed` of the split. The file is read once, on first use. The grader
  reads the first number of the answer text. In training (`data.task=jsonl`,
  `data.task_args={path: ...}`) the train split trains and the validation split
  evaluates (`builders.split_source`), whatever `split` says. There is no test
  split (`data.eval_split=test` is refused): GSM8K's test set is kept outside the
  project, to be measured with its own file.
  """
  name = "jsonl"
  DIFFICULTY = {}
  SPLITS = ("train", "validation", "all")

  def __init__(self, path: str = "", split: str = "train", validation: int = 500,
               **difficulty):
    super().__init__(**difficulty)
    if not isinstance(path, str) or not path:
      raise ValueError(f"task 'jsonl': path={path!r}; accepted: the path of a JSON-lines "
                       "file in GSM8K's format")
    if split not in self.SPLITS:
      raise ValueError(f"task 'jsonl': split={split!r}; accepted: one of {self.SPLITS}")
    if isinstance(validation, bool) or not isinstance(validation, int) or validation < 0:
      raise ValueError(f"task 'jsonl': validation={validation!r}; accepted: an int >= 0 "
                       "(the number of problems at the end of the file held out)")
    self.path, self.split, self.validation = path, split, validation
    self._splits: dict[str, list[Example]] | None = None

  def _accepted(self) -> str:
    return (f"path (a JSON-lines file, required), split in {self.SPLITS} (default 'train'), "
            "validation: an int >= 0 (default 500)")

  @property
  def config_name(self) -> str:
    digest = hashlib.sha1(os.path.abspath(self.path).encode()).hexdigest()[:8]
    stem = re.sub(r"[^\w.-]", "_", os.path.basename(self.path))
    return f"file={stem}-{digest},split={self.split},validation={self.validation}"

  def examples(self, split: str | None = None) -> list[Example]:
    """The problems of `split` (default: this task's split), in file order."""
    split = self.split if split is None else split
    if split not in self.SPLITS:
      raise ValueError(f"task 'jsonl': split={split!r}; accepted: one of {self.SPLITS}")
    if self._splits is None:
      problems = read_jsonl(self.path)
      cut = len(problems) - self.validation
      if cut < 1:
        raise ValueError(f"task 'jsonl': validation={self.validation} leaves no training "
                         f"problems in {self.path} ({len(problems)} problems); accepted: "
                         f"validation < {len(problems)}")
      self._splits = {"train": problems[:cut], "validation": problems[cut:], "all": problems}
    return self._splits[split]

  def example(self, seed):
    problems = self.examples()
    if isinstance(seed, bool) or not 0 <= int(seed) < len(problems) or int(seed) != seed:
      raise ValueError(f"task 'jsonl': seed={seed!r} is out of range; accepted: an int in "
                       f"[0, {len(problems)}) (the {self.split} split of {self.path})")
    return problems[int(seed)]

  def grade(self, answer_text, example):
    return grade_first_number(answer_text, example)

  def __repr__(self) -> str:
    return (f"get_task('jsonl', path={self.path!r}, split={self.split!r}, "
            f"validation={self.validation})")


class GSM8K(Task):
  """Grade-school math (GSM8K) from tensorflow-datasets (`tfds` name `gsm8k`).

  question: the problem; cot: the worked solution with the `<<48/2=24>>`
  calculator annotations removed; answer: the number after `####`. The grader
  compares numbers (commas, `$` and whitespace ignored). `example(seed)` is
  training example number `seed`, read from `records()`, the tfds training
  records (`mtcot_jax.data.get_task` and `task_for` supply it: the data must be
  prepared in array_record format, see `builders.gsm8k_source`); `data_dir` ""
  means the default data directory. In training (`builders.split_source`) the
  last `validation` training problems are the validation split and the others
  the train split; the test split is tfds' test split.
  """
  name = "gsm8k"
  DIFFICULTY = {}

  def __init__(self, data_dir: str = "", records: Callable[[], Any] | None = None,
               validation: int = 500):
    super().__init__()
    if isinstance(validation, bool) or not isinstance(validation, int) or validation < 1:
      raise ValueError(f"task 'gsm8k': validation={validation!r}; accepted: an int >= 1 "
                       "(the number of problems at the end of tfds' train split held out)")
    self.data_dir, self.validation = data_dir, validation
    self._records = records
    self._train = None

  def _accepted(self) -> str:
    return "data_dir (default ''), validation: an int >= 1 (default 500)"

  @property
  def config_name(self) -> str:
    return f"validation={self.validation}"

  @staticmethod
  def from_record(record: dict[str, Any]) -> Example:
    """An Example from a tfds `gsm8k` record (str or bytes fields)."""
    def text(key):
      value = record[key]
      return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()
    cot = _CALCULATOR.sub("", text("annotation")).strip()
    return Example(question=text("question"), cot=cot, answer=text("short_answer"))

  def example(self, seed):
    if self._train is None:
      if self._records is None:
        raise ValueError("task 'gsm8k' was built without its records; accepted: "
                         "mtcot_jax.data.get_task('gsm8k', ...) or task_for(cfg.data), "
                         "which read them from tensorflow-datasets")
      self._train = self._records()
    if not 0 <= seed < len(self._train):
      raise ValueError(f"task 'gsm8k': seed={seed} is out of range; accepted: "
                       f"[0, {len(self._train)}) (the training examples)")
    return self.from_record(self._train[int(seed)])

  def grade(self, answer_text, example):
    got, want = _number(answer_text), _number(example.answer)
    return float(got is not None and want is not None and got == want)
