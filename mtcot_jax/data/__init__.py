"""Data: tasks, their tfds builders, tokenizers and the grain input pipeline.

    task = get_task("mult", digits=3)            # tasks.py
    tok = tokenizer_for(cfg)                     # tokenizer.py (trained and cached)
    it = make_train_iterator(cfg, tok)           # pipeline.py: dicts of BATCH_KEYS
    evals = make_eval_batches(cfg, tok, 200, 32) # prompts + Examples to grade
"""

from mtcot_jax.data.tasks import TASKS, Example, Task
from mtcot_jax.data.tokenizer import (
    BOS_ID, EOS_ID, PAD_ID, THINK_END_ID, THINK_ID, UNK_ID, Tokenizer, encode_prompt,
    load_tokenizer, tokenizer_for, train_tokenizer)
from mtcot_jax.data.pipeline import (
    BATCH_KEYS, TrainIterator, describe_batch, encode_example, make_eval_batches,
    make_train_iterator)
from mtcot_jax.data.builders import (default_data_dir, get_task, prepare, split_source,
                                     task_for)

__all__ = [
    "TASKS", "Example", "Task", "get_task",
    "BOS_ID", "EOS_ID", "PAD_ID", "THINK_END_ID", "THINK_ID", "UNK_ID", "Tokenizer",
    "encode_prompt", "load_tokenizer", "tokenizer_for", "train_tokenizer",
    "BATCH_KEYS", "TrainIterator", "describe_batch", "encode_example", "make_eval_batches",
    "make_train_iterator",
    "default_data_dir", "prepare", "split_source", "task_for",
]
