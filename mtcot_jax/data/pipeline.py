"""Training batches and evaluation prompts, with grain over a tfds data source.

Training (`make_train_iterator`): when the iterator is made, the train split
is read from its tfds source and tokenized once, as
`BOS question <think> cot </think> answer EOS` (or, without CoT,
`BOS question <think> </think> answer EOS`), and split between hosts. grain
then shuffles this host's share (a new order every epoch, from `data.seed`),
pads or packs it to `data.seq_len` and batches it. Each batch is a dict of
numpy arrays of shape (B_host, T), T = data.seq_len:

  inputs       int32    the tokens, PAD after the last segment
  targets      int32    the next token at each position; PAD at each segment's end
  positions    int32    position within its own segment (0 on padding)
  segment_ids  int32    1, 2, ... per example in the row; 0 on padding
  cot_mask     float32  1 where targets is a CoT token or `</think>`
  answer_mask  float32  1 where targets is an answer token or EOS

The prompt (BOS, question, `<think>`, and `</think>` when there is no CoT) has
no target mask. Examples longer than seq_len are never cut: they are skipped
and counted (`iterator.num_skipped`) or, with `data.on_too_long=error`, raise.

Evaluation (`make_eval_batches`): prompts of the held-out split that
`data.eval_split` names (validation by default, test for a final table),
left-aligned and padded, plus the Examples to grade the generations against.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from absl import flags
import grain
import jax
import numpy as np

from mtcot_jax.data import builders
from mtcot_jax.data.tasks import Example
from mtcot_jax.data.tokenizer import Tokenizer, encode_prompt

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "cot_mask", "answer_mask")
_CHUNK = 1024  # records read at once when tokenizing the split
# Elements come from memory and cost microseconds: a thread pool would cost more
# than it saves (data.num_workers > 0 adds worker processes instead).
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _encode_parts(tok: Tokenizer, ex: Example, cot: bool) -> tuple[list[int], int, int]:
  """(sequence ids, prompt length, CoT length incl. `</think>`)."""
  prompt = encode_prompt(tok, ex.question, cot=cot)
  thought = tok.encode(ex.cot) + [tok.think_end_id] if cot else []
  answer = tok.encode(ex.answer) + [tok.eos_id]
  return prompt + thought + answer, len(prompt), len(thought)


def _segment(inputs: np.ndarray, p: int, c: int, pad_id: int) -> dict[str, np.ndarray]:
  """Targets and masks of one sequence with a p-token prompt and c CoT targets."""
  targets = np.append(inputs[1:], np.int32(pad_id)).astype(np.int32)
  target_pos = np.arange(1, len(inputs) + 1)  # where targets[i] sits in the sequence
  cot_mask = ((target_pos >= p) & (target_pos < p + c)).astype(np.float32)
  answer_mask = ((target_pos >= p + c) & (target_pos < len(inputs))).astype(np.float32)
  return {"inputs": inputs, "targets": targets, "cot_mask": cot_mask,
          "answer_mask": answer_mask}


def encode_example(tok: Tokenizer, ex: Example, cot: bool = True) -> dict[str, np.ndarray]:
  """One example as unpadded arrays of length L (the whole sequence).

  Returns inputs, targets (int32) and cot_mask, answer_mask (float32), as in
  the batch format, for a single segment.
  """
  ids, p, c = _encode_parts(tok, ex, cot)
  return _segment(np.asarray(ids, np.int32), p, c, tok.pad_id)


class _Tokenized:
  """This host's training examples, tokenized once: a random-access source for grain.

  Holds every sequence in one flat int32 array (a few MB for the task sizes
  used here), so that a batch costs no record reads or tokenization.
  """

  def __init__(self, ids: np.ndarray, offsets: np.ndarray, prompt: np.ndarray,
               thought: np.ndarray, pad_id: int):
    self._ids, self._offsets, self._prompt, self._thought = ids, offsets, prompt, thought
    self._pad_id = pad_id

  def __len__(self) -> int:
    return len(self._prompt)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    """Example i, unpadded (for packing)."""
    i = int(i)
    inputs = self._ids[self._offsets[i]:self._offsets[i + 1]]
    return _segment(inputs, int(self._prompt[i]), int(self._thought[i]), self._pad_id)

  def padded_batch(self, idx: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Examples idx (B,), one per row, padded to (B, seq_len): the whole batch
    at once, which costs a fraction of padding example by example."""
    idx = np.asarray(idx, np.int64)
    lengths = (self._offsets[idx + 1] - self._offsets[idx])[:, None]
    inputs = np.full((len(idx), seq_len), self._pad_id, np.int32)
    for row, i in enumerate(idx):
      inputs[row, :lengths[row, 0]] = self._ids[self._offsets[i]:self._offsets[i + 1]]
    targets = np.full_like(inputs, self._pad_id)
    targets[:, :-1] = inputs[:, 1:]                   # PAD follows each sequence's EOS
    pos = np.arange(seq_len)[None, :]
    valid = pos < lengths
    t = pos + 1                                       # where each target sits in its sequence
    p, c = self._prompt[idx][:, None], self._thought[idx][:, None]
    return {"inputs": inputs, "targets": targets,
            "positions": np.where(valid, pos, 0).astype(np.int32),
            "segment_ids": valid.astype(np.int32),
            "cot_mask": ((t >= p) & (t < p + c)).astype(np.float32),
            "answer_mask": ((t >= p + c) & (t < lengths)).astype(np.float32)}


class TrainIterator(grain.DatasetIterator):
  """grain's checkpointable iterator over training batches, plus statistics.

  `get_state()` / `set_state()` are grain's: a JSON-serialisable dict (orbax's
  grain handler saves it) that restores the exact next batch into an iterator
  made from the same config, tokenizer and host layout. Attributes:
  `num_examples` (train split size), `num_skipped` (examples longer than
  seq_len, all hosts), `num_host_examples` (this host's share per epoch),
  `host_batch_size`. With data.num_workers > 0, call `close()` when done.
  """

  def __init__(self, it: grain.DatasetIterator, **stats: int):
    super().__init__(it)
    self._it = it
    for key, value in stats.items():
      setattr(self, key, value)

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state)


def _host(process_index, process_count) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} is not accepted: an int in [0, {count})")
  return index, count


def _cot_flags(data, n: int) -> np.ndarray:
  """Whether each training example keeps its CoT: fixed per example."""
  if not data.cot:
    return np.zeros(n, bool)
  return np.random.default_rng([data.seed, 1]).random(n) >= data.no_cot_fraction


def _read_all(source, start: int, stop: int) -> list[Example]:
  getitems = getattr(source, "__getitems__", None)
  return getitems(range(start, stop)) if getitems else [source[i] for i in range(start, stop)]


def make_train_iterator(cfg, tokenizer: Tokenizer, *, process_index: int | None = None,
                        process_count: int | None = None,
                        source: Sequence[Example] | None = None) -> TrainIterator:
  """An endless, checkpointable iterator of this host's training batches.

  cfg: the full Config (global batch `train.batch_size`, split evenly over
  `process_count` hosts; error if it does not divide). process_index /
  process_count default to jax.process_index() / jax.process_count(). Each
  host reads a disjoint, equal-sized share of the (kept) training examples.
  Returns a TrainIterator yielding dicts with BATCH_KEYS, each (B_host, seq_len).
  """
  data = cfg.data
  index, count = _host(process_index, process_count)
  if cfg.train.batch_size % count:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} is not accepted: a multiple "
                     f"of the number of hosts ({count})")
  batch = cfg.train.batch_size // count
  if source is None:
    source = builders.split_source(data, "train")
  cot = _cot_flags(data, len(source))
  seqs, prompt, thought = [], np.zeros(len(source), np.int64), np.zeros(len(source), np.int64)
  for start in range(0, len(source), _CHUNK):
    for i, ex in enumerate(_read_all(source, start, min(start + _CHUNK, len(source))), start):
      ids, prompt[i], thought[i] = _encode_parts(tokenizer, ex, bool(cot[i]))
      seqs.append(ids)
  lengths = np.array([len(ids) for ids in seqs])
  too_long = np.flatnonzero(lengths > data.seq_len)
  if len(too_long) and data.on_too_long == "error":
    i = int(too_long[0])
    raise ValueError(
        f"training example {i} (question {source[i].question[:80]!r}) is {lengths[i]} tokens, "
        f"longer than data.seq_len={data.seq_len} ({len(too_long)} such examples); "
        "accepted: raise data.seq_len, or set data.on_too_long=skip to skip them")
  if len(too_long):
    logging.warning("skipping %d of %d training examples longer than data.seq_len=%d",
                    len(too_long), len(source), data.seq_len)
  kept = np.flatnonzero(lengths <= data.seq_len)
  per_host = len(kept) // count
  if per_host < 1:
    raise ValueError(f"no training examples left for {count} host(s): {len(kept)} of "
                     f"{len(source)} fit in data.seq_len={data.seq_len}")
  mine = kept[index::count][:per_host]
  offsets = np.concatenate([[0], np.cumsum(lengths[mine])])
  flat = np.fromiter((t for i in mine for t in seqs[i]), np.int32, count=int(offsets[-1]))

  pad_id, seq_len = tokenizer.pad_id, data.seq_len
  rows = _Tokenized(flat, offsets, prompt[mine], thought[mine], pad_id)
  if not data.pack:   # shuffle indices, batch them, then pad the batch in one go
    ds = grain.MapDataset.range(len(rows)).shuffle(seed=data.seed).repeat()
    ds = ds.batch(batch, drop_remainder=True).map(lambda idx: rows.padded_batch(idx, seq_len))
    it_ds = ds.to_iter_dataset(_READ)
  else:
    ds = grain.MapDataset.source(rows).shuffle(seed=data.seed).repeat()
    it_ds = grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(_READ),
        length_struct={k: seq_len for k in ("inputs", "targets", "cot_mask", "answer_mask")},
        num_packing_bins=batch, shuffle_bins=False,
        meta_features=("targets", "cot_mask", "answer_mask"),
        padding_struct={"inputs": pad_id, "targets": pad_id, "cot_mask": 0, "answer_mask": 0})
    it_ds = it_ds.batch(batch, drop_remainder=True).map(_rename_packed)
  if data.num_workers > 0:
    if not flags.FLAGS.is_parsed():   # grain's workers read absl flags; use their defaults
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  return TrainIterator(iter(it_ds), num_examples=len(source), num_skipped=len(too_long),
                       num_host_examples=per_host, host_batch_size=batch)


def _rename_packed(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"inputs": b["inputs"].astype(np.int32), "targets": b["targets"].astype(np.int32),
          "positions": b["inputs_positions"].astype(np.int32),
          "segment_ids": b["inputs_segment_ids"].astype(np.int32),
          "cot_mask": b["cot_mask"].astype(np.float32),
          "answer_mask": b["answer_mask"].astype(np.float32)}


def make_eval_batches(cfg, tokenizer: Tokenizer, num_examples: int | None = None,
                      batch_size: int | None = None, *, cot: bool = True,
                      process_index: int | None = None,
                      process_count: int | None = None,
                      source: Sequence[Example] | None = None) -> list[dict[str, Any]]:
  """Prompts of the first `num_examples` examples of the `cfg.data.eval_split` split
  (validation or test), in batches.

  num_examples defaults to train.eval_examples, batch_size to train.batch_size.
  Each host gets examples index, index + count, ... (defaults: jax's process
  index and count). Each batch is a dict:
    prompt_tokens   (b, P) int32  `BOS question <think>` (cot=False: `... </think>`),
                                  left-aligned, PAD after; P is the longest prompt
                                  among all num_examples, the same in every batch
    prompt_lengths  (b,)   int32
    examples        list of b Examples (for task.grade)
  with b = batch_size, except in a smaller last batch. source: Examples to use
  instead of the task's split.
  """
  num_examples = cfg.train.eval_examples if num_examples is None else num_examples
  batch_size = cfg.train.batch_size if batch_size is None else batch_size
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} is not accepted: an int >= 1")
  index, count = _host(process_index, process_count)
  if source is None:
    source = builders.split_source(cfg.data, cfg.data.eval_split)
  if not 1 <= num_examples <= len(source):
    raise ValueError(f"num_examples={num_examples} is not accepted: an int in "
                     f"[1, {len(source)}] (the {cfg.data.eval_split} split's size)")
  examples = _read_all(source, 0, num_examples)
  prompts = [encode_prompt(tokenizer, ex.question, cot=cot) for ex in examples]
  width = max(len(p) for p in prompts)
  mine = list(range(index, num_examples, count))
  batches = []
  for start in range(0, len(mine), batch_size):
    rows = mine[start:start + batch_size]
    tokens = np.full((len(rows), width), tokenizer.pad_id, np.int32)
    for r, i in enumerate(rows):
      tokens[r, :len(prompts[i])] = prompts[i]
    batches.append({"prompt_tokens": tokens,
                    "prompt_lengths": np.array([len(prompts[i]) for i in rows], np.int32),
                    "examples": [examples[i] for i in rows]})
  return batches


def describe_batch(tok: Tokenizer, batch: dict[str, np.ndarray], row: int = 0) -> list[str]:
  """A readable view of one row: each segment's text with the masks marked
  (`[c]` CoT target, `[a]` answer target). For debugging."""
  lines = []
  for seg in sorted(set(batch["segment_ids"][row].tolist()) - {0}):
    at = batch["segment_ids"][row] == seg
    pieces = []
    for t, c, a in zip(batch["targets"][row][at], batch["cot_mask"][row][at],
                       batch["answer_mask"][row][at]):
      mark = "[c]" if c else "[a]" if a else ""
      pieces.append(tok.id_to_piece(t) + mark)
    lines.append(" ".join(pieces))
  return lines
