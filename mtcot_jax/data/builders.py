"""TFDS builders for the synthetic tasks, and the random-access sources read from them.

Each synthetic task is a `tfds.core.GeneratorBasedBuilder` writing array_record
files (read back without TensorFlow through `builder.as_data_source()`). Its
builder config names the difficulty and the split sizes, e.g.
`<data_dir>/mtcot_mult/digits_a=3,digits_b=3,train=20000,test=500/1.0.0/`.
The first use prepares it, locally with no network; later uses reuse the files.

Splits: `train` holds seeds 0..train-1; `test` holds seeds from 2**40 on,
skipping any whose question is also a training question, so the two splits
share no question. GSM8K is the real tfds `gsm8k`, which must be prepared
beforehand (see `catalog.gsm8k_source`); `jsonl` reads its file directly (train:
the file's train split, test: its validation split).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mtcot_jax.config import DataConfig
from mtcot_jax.data.catalog import default_data_dir, get_task, gsm8k_source, task_for  # noqa: F401
from mtcot_jax.data.gsm8k_jsonl import Jsonl
from mtcot_jax.data.tasks import GSM8K, Example, Task

TEST_SEED_OFFSET = 2 ** 40
_MAX_TEST_TRIES = 50   # test seeds tried per test example wanted, before giving up


class _TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes `task.example(seed)` for the train and test seeds."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
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
        description=f"{task!r}: {train_size} train and up to {test_size} test examples")
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
    test = []
    for s in range(TEST_SEED_OFFSET, TEST_SEED_OFFSET + _MAX_TEST_TRIES * self.test_size):
      ex = self.task.example(s)
      if ex.question not in seen:
        seen.add(ex.question)
        test.append((s, ex))
        if len(test) == self.test_size:
          break
    if not test:
      raise ValueError(f"{self.task!r}: every test question tried is also a training "
                       f"question (train={self.train_size}); accepted: a harder difficulty "
                       "or a smaller train split")
    if len(test) < self.test_size:
      logging.warning("%r: only %d distinct test questions not in train (wanted %d)",
                      self.task, len(test), self.test_size)
    return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

  def _generate_examples(self, examples):
    for seed, ex in examples:
      yield seed, {"question": ex.question, "cot": ex.cot, "answer": ex.answer, "seed": seed}


class MtcotMult(_TaskBuilder):
  """Multiplication (`mtcot_jax.data.tasks.Mult`)."""


class MtcotPerm(_TaskBuilder):
  """Permutation composition (`mtcot_jax.data.tasks.Perm`)."""


class MtcotReach(_TaskBuilder):
  """Reachability in a DAG (`mtcot_jax.data.tasks.Reach`)."""


class MtcotWordprob(_TaskBuilder):
  """Generated word problems (`mtcot_jax.data.word_problems.WordProblems`)."""


BUILDERS: dict[str, type[_TaskBuilder]] = {"mult": MtcotMult, "perm": MtcotPerm,
                                           "reach": MtcotReach, "wordprob": MtcotWordprob}


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
  expects. `limit` keeps only the first `limit` records.
  """

  def __init__(self, source, decode: Callable[[dict], Example], limit: int | None = None):
    self._source, self._decode = source, decode
    self._len = len(source) if limit is None else min(limit, len(source))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not -self._len <= index < self._len:
      raise IndexError(f"index {index} out of range for {self._len} examples")
    return self._decode(self._source[index % self._len])

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    indices = [int(i) for i in indices]
    getitems = getattr(self._source, "__getitems__", None)  # batched reads where offered
    records = getitems(indices) if getitems else [self._source[i] for i in indices]
    return [self._decode(r) for r in records]

  def __repr__(self) -> str:
    return f"ExampleSource({self._len} examples)"


def split_source(data: DataConfig, split: str) -> ExampleSource:
  """The `train` or `test` split of `data.task` as a source of Examples.

  Synthetic tasks are prepared on first use; GSM8K must already be prepared;
  `jsonl` reads its file (test: the file's validation split). For GSM8K and
  `jsonl`, `data.train_size` / `data.eval_size` cap the examples used.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r}; accepted: 'train' or 'test'")
  task = task_for(data)
  limit = data.train_size if split == "train" else data.eval_size
  if isinstance(task, GSM8K):
    return ExampleSource(gsm8k_source(data.data_dir, split), GSM8K.from_record, limit)
  if isinstance(task, Jsonl):
    part = task.examples("train" if split == "train" else "validation")
    return ExampleSource(part, lambda ex: ex, limit)
  builder = prepare(task, data.data_dir, data.train_size, data.eval_size)
  return ExampleSource(builder.as_data_source(split=split), _synthetic_record)


def split_seeds(data: DataConfig, split: str) -> np.ndarray:
  """The task seed of each record of a synthetic task's `train` or `test` split, in
  record order (tfds stores them shuffled): record i is `task.example(seeds[i])`.
  Train holds 0..train_size-1; test draws from TEST_SEED_OFFSET on, so the two
  never share a seed (nor a question)."""
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r}; accepted: 'train' or 'test'")
  task = task_for(data)
  builder = prepare(task, data.data_dir, data.train_size, data.eval_size)
  source = builder.as_data_source(split=split)
  return np.array([int(r["seed"]) for r in source.__getitems__(range(len(source)))], np.int64)
