"""TFDS builders for the synthetic tasks, and the random-access sources read from them.

Each synthetic task is a `tfds.core.GeneratorBasedBuilder` writing array_record
files (read back without TensorFlow through `builder.as_data_source()`). Its
builder config names the difficulty and the split sizes, e.g.
`<data_dir>/mtcot_mult/digits_a=3,digits_b=3,train=20000,test=500/1.1.0/`
(`test=` is the size of each held-out split). The first use prepares it,
locally with no network; later uses reuse the files.

Splits (`SPLITS`): `train` holds seeds 0..train-1; `test` holds seeds from
2**40 on, skipping any whose question is in train; `validation` holds seeds
from 2**41 on, skipping any whose question is in train or test. The three
splits share no seed and no question. Test is drawn first, exactly as in
version 1.0.0 (which had no validation split), so a test split holds the same
problems as before; validation then avoids it. Both held-out splits have
`data.eval_size` problems. Disjointness holds within one prepared dataset
(one train_size and eval_size), which is what a run and an experiment read.

GSM8K is the real tfds `gsm8k`, which must be prepared beforehand (see
`catalog.gsm8k_source`): train is its train split without the last
`validation` problems (a task argument, default 500), validation those, test
its test split. `jsonl` reads its file directly: train and validation are the
file's (`Jsonl`); it has no test split (GSM8K's test set is kept outside the
project), so `test` raises.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mtcot_jax.config import DataConfig
from mtcot_jax.config_checks import EVAL_SPLITS
from mtcot_jax.data.catalog import default_data_dir, get_task, gsm8k_source, task_for  # noqa: F401
from mtcot_jax.data.gsm8k_jsonl import GSM8K, Jsonl
from mtcot_jax.data.tasks import Example, Task

SPLITS = ("train",) + EVAL_SPLITS
TEST_SEED_OFFSET = 2 ** 40
VALIDATION_SEED_OFFSET = 2 ** 41
_MAX_TEST_TRIES = 50   # held-out seeds tried per held-out example wanted, before giving up


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not accepted: one of {SPLITS}")


class _TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes `task.example(seed)` for the train, validation and test seeds."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "A validation split (seeds from 2**41 on, no question in train "
                            "or test); train and test unchanged."}
  # tfds derives this from the package through `importlib_resources`, which
  # is not installed here; the file itself is what it needs (no checksums).
  code_path = epath.Path(__file__)

  def __init__(self, *, task: Task, train_size: int, test_size: int, data_dir: str):
    if train_size < 1 or test_size < 1:
      raise ValueError(f"split sizes train={train_size}, test={test_size}: "
                       "accepted: ints >= 1")
    self.task, self.train_size, self.test_size = task, train_size, test_size
    config = tfds.core.BuilderConfig(
        name=f"{task.config_name},train={train_size},test={test_size}",
        description=f"{task!r}: {train_size} train, and up to {test_size} validation and "
                    f"{test_size} test examples")
    super().__init__(config=config, data_dir=data_dir, file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=type(self.task).__doc__,
        features=tfds.features.FeaturesDict({
            "question": tfds.features.Text(),
            "cot": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "seed": np.int64,
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    train = [(s, self.task.example(s)) for s in range(self.train_size)]
    seen = {ex.question for _, ex in train}
    test = self._held_out("test", TEST_SEED_OFFSET, seen)     # first: as in version 1.0.0
    validation = self._held_out("validation", VALIDATION_SEED_OFFSET, seen)
    return {"train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
            "test": self._generate_examples(test)}

  def _held_out(self, split: str, offset: int, seen: set[str]) -> list[tuple[int, Example]]:
    """Up to test_size (seed, example) pairs from seeds offset, offset + 1, ...
    whose questions are not in `seen` nor repeated; adds their questions to `seen`."""
    out = []
    for s in range(offset, offset + _MAX_TEST_TRIES * self.test_size):
      ex = self.task.example(s)
      if ex.question not in seen:
        seen.add(ex.question)
        out.append((s, ex))
        if len(out) == self.test_size:
          break
    if not out:
      raise ValueError(f"{self.task!r}: every {split} question tried is also a training "
                       f"or test question (train={self.train_size}); accepted: a harder "
                       "difficulty or a smaller train split")
    if len(out) < self.test_size:
      logging.warning("%r: only %d distinct %s questions not in the other splits (wanted %d)",
                      self.task, len(out), split, self.test_size)
    return out

  def _generate_examples(self, examples):
    for seed, ex in examples:
      yield seed, {"question": ex.question, "cot": ex.cot, "answer": ex.answer, "seed": seed}


class MtcotMult(_TaskBuilder):
  """Multiplication (`mtcot_jax.data.tasks.Mult`)."""


class MtcotPerm(_TaskBuilder):
  """Permutation composition (`mtcot_jax.data.tasks.Perm`)."""


class MtcotReach(_TaskBuilder):
  """Reachability in a DAG (`mtcot_jax.data.tasks.Reach`)."""


class MtcotSumorder(_TaskBuilder):
  """Sums whose CoT adds the terms in any order (`mtcot_jax.data.sumorder.SumOrder`)."""


class MtcotWordprob(_TaskBuilder):
  """Generated word problems (`mtcot_jax.data.word_problems.WordProblems`)."""


BUILDERS: dict[str, type[_TaskBuilder]] = {"mult": MtcotMult, "perm": MtcotPerm,
                                           "reach": MtcotReach, "sumorder": MtcotSumorder,
                                           "wordprob": MtcotWordprob}


def prepare(task: Task, data_dir: str, train_size: int, test_size: int) -> _TaskBuilder:
  """The builder for `task` and these split sizes, prepared under `data_dir`.

  Generates and writes the files the first time (no network); afterwards only
  reads their metadata.
  """
  if task.name not in BUILDERS:
    raise ValueError(f"task {task.name!r} has no local builder; accepted: {sorted(BUILDERS)}")
  builder = BUILDERS[task.name](task=task, train_size=train_size, test_size=test_size,
                                data_dir=default_data_dir(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _synthetic_record(record: dict[str, Any]) -> Example:
  return Example(question=_text(record["question"]), cot=_text(record["cot"]),
                 answer=_text(record["answer"]))


class ExampleSource:
  """A random-access sequence of `Example`s over a tfds data source.

  Has `__len__`, `__getitem__` and `__getitems__`, as grain's `MapDataset.source`
  expects. It shows records start..stop-1 of `source` (stop None: to the end),
  of which `limit` keeps only the first `limit`.
  """

  def __init__(self, source, decode: Callable[[dict], Example], limit: int | None = None,
               start: int = 0, stop: int | None = None):
    stop = len(source) if stop is None else stop
    if not 0 <= start <= stop <= len(source):
      raise ValueError(f"records [{start}, {stop}) of a source of {len(source)}: accepted "
                       f"0 <= start <= stop <= {len(source)}")
    self._source, self._decode, self._start = source, decode, start
    self._len = stop - start if limit is None else min(limit, stop - start)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not -self._len <= index < self._len:
      raise IndexError(f"index {index} out of range for {self._len} examples")
    return self._decode(self._source[self._start + index % self._len])

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    indices = [self._start + int(i) for i in indices]
    getitems = getattr(self._source, "__getitems__", None)  # batched reads where offered
    records = getitems(indices) if getitems else [self._source[i] for i in indices]
    return [self._decode(r) for r in records]

  def __repr__(self) -> str:
    return f"ExampleSource({self._len} examples)"


def _gsm8k_split(task: GSM8K, data_dir: str, split: str, limit: int) -> ExampleSource:
  """GSM8K's train (without its last `task.validation` problems), validation (those)
  or test split."""
  if split == "test":
    return ExampleSource(gsm8k_source(data_dir, "test"), GSM8K.from_record, limit)
  records = gsm8k_source(data_dir, "train")
  cut = len(records) - task.validation
  if cut < 1:
    raise ValueError(f"task 'gsm8k': validation={task.validation} leaves no training "
                     f"problems ({len(records)} in tfds' train split); accepted: "
                     f"validation < {len(records)}")
  start, stop = (0, cut) if split == "train" else (cut, len(records))
  return ExampleSource(records, GSM8K.from_record, limit, start, stop)


def split_source(data: DataConfig, split: str) -> ExampleSource:
  """The `train`, `validation` or `test` split of `data.task` as a source of Examples.

  Synthetic tasks are prepared on first use; GSM8K must already be prepared (its
  validation split: the last `validation` problems of tfds' train split); `jsonl`
  reads its file and has no test split (ValueError). For GSM8K and `jsonl`,
  `data.train_size` / `data.eval_size` cap the examples used.
  """
  _check_split(split)
  task = task_for(data)
  limit = data.train_size if split == "train" else data.eval_size
  if isinstance(task, GSM8K):
    return _gsm8k_split(task, data.data_dir, split, limit)
  if isinstance(task, Jsonl):
    if split == "test":
      raise ValueError("split='test' is not accepted for task 'jsonl': its file holds train "
                       "and validation (the last `validation` problems) only, GSM8K's test "
                       "set being kept outside the project; accepted: 'train', 'validation'")
    return ExampleSource(task.examples(split), lambda ex: ex, limit)
  builder = prepare(task, data.data_dir, data.train_size, data.eval_size)
  return ExampleSource(builder.as_data_source(split=split), _synthetic_record)


def split_seeds(data: DataConfig, split: str) -> np.ndarray:
  """The task seed of each record of a synthetic task's `train`, `validation` or
  `test` split, in record order (tfds stores them shuffled): record i is
  `task.example(seeds[i])`. Train holds 0..train_size-1, test draws from
  TEST_SEED_OFFSET on and validation from VALIDATION_SEED_OFFSET on, so no two
  share a seed (nor a question)."""
  _check_split(split)
  task = task_for(data)
  builder = prepare(task, data.data_dir, data.train_size, data.eval_size)
  source = builder.as_data_source(split=split)
  return np.array([int(r["seed"]) for r in source.__getitems__(range(len(source)))], np.int64)
