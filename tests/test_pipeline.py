"""Pipeline: the batch format by hand, packing, resume, host shards, too-long examples."""

import collections
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mtcot_jax.config import load_config
from mtcot_jax.data import BATCH_KEYS, Example, encode_prompt, get_task, tokenizer_for
from mtcot_jax.data import describe_batch, make_eval_batches, make_train_iterator

BASE = ["data.task=mult", "data.task_args={digits: 2}", "data.train_size=64",
        "data.eval_size=16", "data.seq_len=32", "train.batch_size=8", "model.vocab_size=512"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def _cfg(data_dir, *overrides):
  return load_config(None, BASE + [f"data.data_dir={data_dir}", *overrides])


@pytest.fixture(scope="module")
def tok(data_dir):
  return tokenizer_for(_cfg(data_dir))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _segments(batch):
  """Every packed example in a batch as a tuple of its input tokens."""
  out = []
  for row in range(batch["inputs"].shape[0]):
    for seg in sorted(set(batch["segment_ids"][row].tolist()) - {0}):
      out.append(tuple(batch["inputs"][row][batch["segment_ids"][row] == seg].tolist()))
  return out


def test_masks_by_hand(data_dir, tok):
  d = {c: tok.encode(c)[0] for c in "0123456789*"}
  assert all(len(tok.encode(c)) == 1 for c in d)
  ex = Example(question="12*3", cot="63", answer="36")
  cfg = _cfg(data_dir, "data.seq_len=16", "train.batch_size=2")
  batch = next(make_train_iterator(cfg, tok, source=[ex], process_index=0, process_count=1))
  assert sorted(batch) == sorted(BATCH_KEYS)
  # BOS 1 2 * 3 <think> 6 3 </think> 3 6 EOS, then 4 PAD.
  inputs = [1, d["1"], d["2"], d["*"], d["3"], 4, d["6"], d["3"], 5, d["3"], d["6"], 2, 0, 0, 0, 0]
  targets = [d["1"], d["2"], d["*"], d["3"], 4, d["6"], d["3"], 5, d["3"], d["6"], 2, 0, 0, 0, 0, 0]
  cot_mask = [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]     # targets 6 3 </think>
  answer_mask = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]  # targets 3 6 EOS
  positions = list(range(12)) + [0] * 4
  segment_ids = [1] * 12 + [0] * 4
  for row in range(2):
    np.testing.assert_array_equal(batch["inputs"][row], inputs)
    np.testing.assert_array_equal(batch["targets"][row], targets)
    np.testing.assert_array_equal(batch["cot_mask"][row], cot_mask)
    np.testing.assert_array_equal(batch["answer_mask"][row], answer_mask)
    np.testing.assert_array_equal(batch["positions"][row], positions)
    np.testing.assert_array_equal(batch["segment_ids"][row], segment_ids)
  assert describe_batch(tok, batch, 1) == [
      "1 2 * 3 <think> 6[c] 3[c] </think>[c] 3[a] 6[a] </s>[a] <pad>"]
  assert {k: v.dtype for k, v in batch.items()} == {
      "inputs": np.int32, "targets": np.int32, "positions": np.int32, "segment_ids": np.int32,
      "cot_mask": np.float32, "answer_mask": np.float32}

  # Without CoT: BOS 1 2 * 3 <think> </think> 3 6 EOS; </think> is prompt.
  batch = next(make_train_iterator(cfg.replace(data={"cot": False}), tok, source=[ex],
                                   process_index=0, process_count=1))
  inputs = [1, d["1"], d["2"], d["*"], d["3"], 4, 5, d["3"], d["6"], 2, 0, 0, 0, 0, 0, 0]
  np.testing.assert_array_equal(batch["inputs"][0], inputs)
  np.testing.assert_array_equal(batch["targets"][0], inputs[1:] + [0])
  np.testing.assert_array_equal(batch["cot_mask"][0], [0] * 16)
  np.testing.assert_array_equal(batch["answer_mask"][0], [0] * 6 + [1, 1, 1] + [0] * 7)


def _reference_sequence(tok, ex, cot=True):
  """The expected tokens, built from the format string, not the pipeline."""
  ids = [1] + tok.encode(ex.question) + [4]
  ids += tok.encode(ex.cot) + [5] if cot else [5]
  return tuple(ids + tok.encode(ex.answer) + [2])


@pytest.mark.parametrize("pack", [False, True])
def test_epoch_covers_train_split_and_reshuffles(data_dir, tok, pack):
  cfg = _cfg(data_dir, f"data.pack={str(pack).lower()}", "data.seq_len=64")
  task = get_task("mult", digits=2)
  expected = collections.Counter(_reference_sequence(tok, task.example(s)) for s in range(64))
  it = make_train_iterator(cfg, tok, process_index=0, process_count=1)
  assert (it.num_examples, it.num_skipped, it.host_batch_size) == (64, 0, 8)
  seen = []
  while len(seen) < 128:
    batch = next(it)
    assert all(v.shape == (8, 64) for v in batch.values())
    seen += _segments(batch)
  epoch0, epoch1 = seen[:64], seen[64:128]
  assert collections.Counter(epoch0) == expected
  if not pack:   # packing may carry an example across the epoch boundary
    assert collections.Counter(epoch1) == expected
    assert epoch0 != epoch1


def test_packing_segments(data_dir, tok):
  cfg = _cfg(data_dir, "data.pack=true", "data.seq_len=64")
  batches = _take(make_train_iterator(cfg, tok, process_index=0, process_count=1), 4)
  packed = 0
  for b in batches:
    for row in range(8):
      seg, pos = b["segment_ids"][row], b["positions"][row]
      n = int((seg > 0).sum())
      assert (seg[n:] == 0).all() and (b["inputs"][row][n:] == 0).all()
      ids = seg[:n]
      assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}   # 1, 1, .., 2, 2, .., 3 ..
      packed += ids[-1] > 1
      for s in range(1, ids[-1] + 1):
        at = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(pos[at], np.arange(len(at)))
        x, y = b["inputs"][row][at], b["targets"][row][at]
        assert x[0] == 1 and x[-1] == 2                          # BOS ... EOS, never cut
        np.testing.assert_array_equal(y, np.append(x[1:], 0))  # no target crosses segments
        think_end = int(np.flatnonzero(x == 5)[0])
        think = int(np.flatnonzero(x == 4)[0])
        np.testing.assert_array_equal(b["cot_mask"][row][at],
                                      (np.arange(len(at)) >= think) & (np.arange(len(at)) < think_end))
        np.testing.assert_array_equal(b["answer_mask"][row][at],
                                      (np.arange(len(at)) >= think_end) & (np.arange(len(at)) < len(at) - 1))
  assert packed > 0


@pytest.mark.parametrize("pack", [False, True])
def test_resume_from_saved_state(data_dir, tok, pack):
  cfg = _cfg(data_dir, f"data.pack={str(pack).lower()}", "data.no_cot_fraction=0.3")
  make = lambda: make_train_iterator(cfg, tok, process_index=0, process_count=1)
  uninterrupted = make()
  _take(uninterrupted, 7)                                # 7 x 8 of 64: near the epoch end
  state = json.dumps(uninterrupted.get_state())         # as a checkpoint would hold it
  expected = _take(uninterrupted, 5)                    # crosses into the next epoch
  resumed = make()
  resumed.set_state(json.loads(state))
  for want, got in zip(expected, _take(resumed, 5)):
    for key in BATCH_KEYS:
      np.testing.assert_array_equal(want[key], got[key])
  fresh = next(make())
  assert not np.array_equal(fresh["inputs"], expected[0]["inputs"])


def test_two_hosts_disjoint_and_covering(data_dir, tok):
  cfg = _cfg(data_dir)
  task = get_task("mult", digits=2)
  everything = collections.Counter(_reference_sequence(tok, task.example(s)) for s in range(64))
  shards = []
  for host in range(2):
    it = make_train_iterator(cfg, tok, process_index=host, process_count=2)
    assert it.host_batch_size == 4 and it.num_host_examples == 32
    shards.append(collections.Counter(s for b in _take(it, 8) for s in _segments(b)))
  assert sum(shards[0].values()) == sum(shards[1].values()) == 32
  assert shards[0] + shards[1] == everything
  assert not set(shards[0]) & set(shards[1])
  with pytest.raises(ValueError, match="batch_size=8 .* hosts \\(3\\)"):
    make_train_iterator(cfg, tok, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index=2"):
    make_train_iterator(cfg, tok, process_index=2, process_count=2)


def _digit_examples(lengths):
  """Examples whose sequence length is known without the pipeline: each digit
  is one token, so BOS q <think> cot </think> a EOS has len(q) + len(cot) + 5."""
  return [Example("1" * (n - 7), "22", "3") for n in lengths]


def test_too_long_examples_skipped_and_counted(data_dir, tok):
  lengths = [10, 16, 17, 12, 30, 16, 9, 40]
  examples = _digit_examples(lengths)
  assert [len(_reference_sequence(tok, ex)) for ex in examples] == lengths
  cfg = _cfg(data_dir, "data.seq_len=16", "train.batch_size=4")
  it = make_train_iterator(cfg, tok, source=examples, process_index=0, process_count=1)
  assert it.num_skipped == 3 and it.num_examples == 8
  seen = collections.Counter(s for b in _take(it, 5) for s in _segments(b))
  assert sorted({len(s) for s in seen}) == [9, 10, 12, 16]   # never truncated
  with pytest.raises(ValueError) as err:
    make_train_iterator(cfg.replace(data={"on_too_long": "error"}), tok, source=examples,
                        process_index=0, process_count=1)
  assert "training example 2" in str(err.value) and "seq_len=16" in str(err.value)
  with pytest.raises(ValueError, match="no training examples left"):
    make_train_iterator(cfg, tok, source=_digit_examples([20, 30]), process_index=0,
                        process_count=1)


def test_no_cot_fraction(data_dir, tok):
  def no_cot_rows(*overrides):
    cfg = _cfg(data_dir, *overrides)
    batches = _take(make_train_iterator(cfg, tok, process_index=0, process_count=1), 8)
    flags = []
    for b in batches:
      for row in range(8):
        x = b["inputs"][row]
        no_cot = x[int(np.flatnonzero(x == 4)[0]) + 1] == 5
        assert no_cot == (b["cot_mask"][row].sum() == 0)
        assert b["answer_mask"][row].sum() > 0
        flags.append(bool(no_cot))
    return flags
  assert not any(no_cot_rows())
  assert all(no_cot_rows("data.cot=false"))
  half = no_cot_rows("data.no_cot_fraction=0.5")
  assert 16 <= sum(half) <= 48
  assert half == no_cot_rows("data.no_cot_fraction=0.5")   # fixed per example


def test_eval_batches(data_dir, tok):
  cfg = _cfg(data_dir)
  for cot in (True, False):
    batches = make_eval_batches(cfg, tok, 10, 4, cot=cot, process_index=0, process_count=1)
    assert [len(b["examples"]) for b in batches] == [4, 4, 2]
    width = batches[0]["prompt_tokens"].shape[1]
    examples = [ex for b in batches for ex in b["examples"]]
    assert len({ex.question for ex in examples}) == 10
    for b in batches:
      assert b["prompt_tokens"].dtype == np.int32 and b["prompt_tokens"].shape[1] == width
      for row, ex in enumerate(b["examples"]):
        want = [1] + tok.encode(ex.question) + ([4] if cot else [4, 5])
        n = b["prompt_lengths"][row]
        assert n == len(want) and b["prompt_tokens"][row, :n].tolist() == want
        assert (b["prompt_tokens"][row, n:] == 0).all()
        assert encode_prompt(tok, ex.question, cot=cot) == want
  train_questions = {get_task("mult", digits=2).example(s).question for s in range(64)}
  assert not {ex.question for ex in examples} & train_questions
  hosts = [make_eval_batches(cfg, tok, 10, 4, process_index=h, process_count=2) for h in (0, 1)]
  qs = [[ex.question for b in h for ex in b["examples"]] for h in hosts]
  assert len(qs[0]) == len(qs[1]) == 5 and not set(qs[0]) & set(qs[1])
  assert hosts[0][0]["prompt_tokens"].shape[1] == hosts[1][0]["prompt_tokens"].shape[1]
  with pytest.raises(ValueError, match="num_examples=17"):
    make_eval_batches(cfg, tok, 17, 4, process_index=0, process_count=1)


def _first_new(task, seed, n, seen):
  """The examples of the first n seeds from `seed` whose question is not in `seen`."""
  out = []
  while len(out) < n:
    ex = task.example(seed)
    if ex.question not in seen:
      seen.add(ex.question)
      out.append(ex)
    seed += 1
  return out


def test_eval_batches_read_data_eval_split(data_dir, tok):
  """Validation by default, test when asked: each the split a naive rebuild gives
  (test: seeds from 2**40 not in train; validation: from 2**41, in neither)."""
  task = get_task("mult", digits=2)
  seen = {task.example(s).question for s in range(64)}
  want = {"test": _first_new(task, 2 ** 40, 16, seen)}
  want["validation"] = _first_new(task, 2 ** 41, 16, seen)
  for overrides, split in (((), "validation"), (("data.eval_split=validation",), "validation"),
                           (("data.eval_split=test",), "test")):
    cfg = _cfg(data_dir, *overrides)
    batches = make_eval_batches(cfg, tok, 16, 16, process_index=0, process_count=1)
    assert set(batches[0]["examples"]) == set(want[split]), overrides
  with pytest.raises(ValueError, match="data.eval_split='train' is not accepted: one of "
                                       r"\('validation', 'test'\)"):
    _cfg(data_dir, "data.eval_split=train")
  from mtcot_jax.cli import decode as decode_cli    # decode.py --examples N [--split S]
  for flags, split in (([], "validation"), (["--split", "test"], "test"),
                       (["--split", "validation"], "validation")):
    args = decode_cli.parse_args(["--config", "x.yaml", "--examples", "16", *flags])
    questions, examples = decode_cli._questions(args, _cfg(data_dir), tok)
    assert set(examples) == set(want[split]) and questions == [ex.question for ex in examples]


def _gsm8k_records(self, split, **kwargs):
  del self, kwargs
  return [{"question": f"Tom has {i} apples and buys {i + 1} more. How many?".encode(),
           "annotation": f"{i} + {i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1} apples.".encode(),
           "short_answer": f"{2 * i + 1}".encode(), "answer": b""} for i in range(12)]


def test_gsm8k_pipeline_with_mock_data(tmp_path):
  cfg = load_config(None, [f"data.data_dir={tmp_path}", "data.task=gsm8k",
                           "data.task_args={validation: 4}", "data.seq_len=64",
                           "train.batch_size=4", "model.vocab_size=512"])
  with tfds.testing.mock_data(as_data_source_fn=_gsm8k_records):
    tok = tokenizer_for(cfg)
    batch = next(make_train_iterator(cfg, tok, process_index=0, process_count=1))
    evals = make_eval_batches(cfg, tok, 4, 4, process_index=0, process_count=1)
  row = batch["inputs"][0][batch["segment_ids"][0] > 0]
  text = tok.decode(row, keep_special=True)
  assert text.startswith("<s>Tom has ") and "<think>" in text and "<<" not in text
  answer = batch["targets"][0][batch["answer_mask"][0] > 0]
  assert tok.decode(answer[:-1]).isdigit() and answer[-1] == 2
  ex = evals[0]["examples"][1]            # the validation split: records 8..11
  assert ex.cot == "9 + 10 = 19 apples." and ex.answer == "19"
