"""Data: tasks, their tfds builders, tokenizers and the grain input pipeline.

    task = get_task("mult", digits=3)            # catalog.py (tasks.py)
    tok = tokenizer_for(cfg)                     # tokenizer.py (trained and cached)
    it = make_train_iterator(cfg, tok)           # pipeline.py: dicts of BATCH_KEYS
    evals = make_eval_batches(cfg, tok, 200, 32) # prompts + Examples to grade

Importing the package reads neither tfds nor grain: the names from pipeline.py
and builders.py import their module on first use (`__getattr__` below).
"""

import importlib

from mtcot_jax.data.tasks import TASKS, Example, Task
from mtcot_jax.data.tokenizer import (
    BOS_ID, EOS_ID, PAD_ID, THINK_END_ID, THINK_ID, UNK_ID, Tokenizer, encode_prompt,
    load_tokenizer, tokenizer_for, train_tokenizer)
from mtcot_jax.data.catalog import default_data_dir, get_task, task_for

_LAZY = {name: "pipeline" for name in ("BATCH_KEYS", "TrainIterator", "describe_batch",
                                       "encode_example", "make_eval_batches",
                                       "make_train_iterator")}
_LAZY.update(prepare="builders", split_source="builders")

__all__ = [
    "TASKS", "Example", "Task", "get_task",
    "BOS_ID", "EOS_ID", "PAD_ID", "THINK_END_ID", "THINK_ID", "UNK_ID", "Tokenizer",
    "encode_prompt", "load_tokenizer", "tokenizer_for", "train_tokenizer",
    "default_data_dir", "task_for", *_LAZY,
]


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
  globals()[name] = value
  return value
