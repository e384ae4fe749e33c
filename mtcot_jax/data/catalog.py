"""Which task a `DataConfig` names, and where its data lives.

Imports no tfds: `get_task`, `task_for` and `default_data_dir` serve code that
only grades or writes questions (decoding, `mt.get_task`); the tfds builders and
sources that read the splits are in `builders.py`. GSM8K's records are the one
tfds read here, made on first use (`gsm8k_source`).
"""

from __future__ import annotations

import os

from mtcot_jax.config import DataConfig
from mtcot_jax.data import tasks
from mtcot_jax.data.tasks import Task


def default_data_dir(data_dir: str = "") -> str:
  """`data_dir`, or $MTCOT_DATA_DIR, or ~/.cache/mtcot_jax/data (in that order)."""
  return os.path.expanduser(
      data_dir or os.environ.get("MTCOT_DATA_DIR") or "~/.cache/mtcot_jax/data")


def get_task(name: str, **difficulty) -> Task:
  """`tasks.get_task`, with GSM8K given its tfds training records (read lazily)."""
  if name == "gsm8k":
    data_dir = difficulty.get("data_dir", "")
    difficulty["records"] = lambda: gsm8k_source(data_dir, "train")
  return tasks.get_task(name, **difficulty)


def task_for(data: DataConfig) -> Task:
  """The Task named by `data.task` and `data.task_args`."""
  args = dict(data.task_args)
  if data.task == "gsm8k":
    args.setdefault("data_dir", data.data_dir)
  return get_task(data.task, **args)


def gsm8k_source(data_dir: str, split: str):
  """The tfds `gsm8k` split as a random-access source of tfds records.

  Raises FileNotFoundError, saying how to get the data, when it is not
  prepared (in array_record format) under the data directory.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.text import gsm8k  # noqa: F401  (registers the builder)
  data_dir = default_data_dir(data_dir)
  try:
    return tfds.data_source("gsm8k", split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for "not there"
    raise FileNotFoundError(
        f"GSM8K (tfds 'gsm8k', split {split!r}) is not prepared in array_record format "
        f"under data_dir={data_dir!r} ({type(e).__name__}: {str(e)[:200]}). This machine "
        "cannot download it. On a machine with network run\n"
        "  tfds build gsm8k --file_format=array_record --data_dir=DIR\n"
        "then copy DIR here and set data.data_dir=DIR (or $MTCOT_DATA_DIR).") from None
