"""TFDS builders: prepared offline, read back, three disjoint splits, reused (an
older version's files beside them ignored); GSM8K."""

import os
import socket

import pytest
import tensorflow_datasets as tfds

from mtcot_jax.config import load_config
from mtcot_jax.data import builders
from mtcot_jax.data.tasks import get_task


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("network access attempted")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def _files(root):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize("name,difficulty", [("mult", {"digits": 2}), ("perm", {"num_perms": 3}),
                                             ("reach", {"nodes": 8, "depth": 2}),
                                             ("sumorder", {"terms": 3})])
def test_prepare_read_back_and_reuse(tmp_path, no_network, monkeypatch, name, difficulty):
  task = get_task(name, **difficulty)
  builder = builders.prepare(task, str(tmp_path), train_size=60, test_size=20)
  assert builder.data_dir.startswith(str(tmp_path))
  train = builder.as_data_source(split="train")
  validation = builder.as_data_source(split="validation")
  test = builder.as_data_source(split="test")
  assert len(train) == 60 and len(validation) == len(test) == 20
  train_seeds = sorted(int(r["seed"]) for r in train)
  assert train_seeds == list(range(60))
  for r in list(train)[:10] + list(validation)[:10] + list(test)[:10]:
    ex = task.example(int(r["seed"]))
    assert (r["question"].decode(), r["cot"].decode(), r["answer"].decode()) == (
        ex.question, ex.cot, ex.answer)
  assert all(builders.TEST_SEED_OFFSET <= int(r["seed"]) < builders.VALIDATION_SEED_OFFSET
             for r in test)
  assert all(int(r["seed"]) >= builders.VALIDATION_SEED_OFFSET for r in validation)
  questions = [{r["question"] for r in split} for split in (train, validation, test)]
  assert sum(map(len, questions)) == len(set.union(*questions))
  assert len(questions[1]) == len(validation) and len(questions[2]) == len(test)

  before = _files(tmp_path)
  def fail(self, seed):
    raise AssertionError("regenerated on the second prepare")
  monkeypatch.setattr(type(task), "example", fail)
  again = builders.prepare(get_task(name, **difficulty), str(tmp_path), 60, 20)
  assert len(again.as_data_source(split="train")) == 60
  assert _files(tmp_path) == before


def test_split_source_examples(tmp_path, no_network):
  data = load_config(None, [f"data.data_dir={tmp_path}", "data.task=perm",
                            "data.task_args={num_perms: 2}", "data.train_size=30",
                            "data.eval_size=10"]).data
  train = builders.split_source(data, "train")
  test = builders.split_source(data, "test")
  assert len(train) == 30 and len(test) == 10
  assert train[3] == train.__getitems__([3])[0]
  assert train[-1] == train[29]
  with pytest.raises(IndexError):
    train[30]
  with pytest.raises(ValueError, match="split='dev'"):
    builders.split_source(data, "dev")


def _held_out(task, offset, size, seen):
  """The first `size` seeds from `offset` with a new question (a naive rebuild)."""
  seeds, s = [], offset
  while len(seeds) < size:
    q = task.example(s).question
    if q not in seen:
      seen.add(q)
      seeds.append(s)
    s += 1
  return seeds


def test_three_splits_match_a_rebuild_and_are_disjoint(tmp_path, no_network):
  """2-digit products (8,100 questions, so that the splits do meet repeats): the
  split seeds are those of a naive rebuild, pairwise disjoint in seeds and questions;
  test is drawn before validation (test unchanged from version 1.0.0)."""
  data = load_config(None, [f"data.data_dir={tmp_path}", "data.task=mult",
                            "data.task_args={digits: 2}", "data.train_size=400",
                            "data.eval_size=30"]).data
  task = get_task("mult", digits=2)
  seen = {task.example(s).question for s in range(400)}
  want = {"train": list(range(400)),
          "test": _held_out(task, 2 ** 40, 30, seen),
          "validation": _held_out(task, 2 ** 41, 30, seen)}
  got = {split: sorted(builders.split_seeds(data, split).tolist()) for split in want}
  assert got == want
  questions = {split: {task.example(s).question for s in seeds} for split, seeds in got.items()}
  for a, b in (("train", "test"), ("train", "validation"), ("test", "validation")):
    assert not set(got[a]) & set(got[b]) and not questions[a] & questions[b], (a, b)
  source = builders.split_source(data, "validation")
  assert {source[i] for i in range(30)} == {task.example(s) for s in want["validation"]}
  for bad in ("dev", "valid", "eval"):
    for fn in (builders.split_source, builders.split_seeds):
      with pytest.raises(ValueError, match=f"split='{bad}' is not accepted: one of "
                                           r"\('train', 'validation', 'test'\)"):
        fn(data, bad)


def test_old_version_files_are_left_alone(tmp_path, no_network, monkeypatch):
  """A data directory holding version 1.0.0 (train and test only) of the same
  dataset: prepare builds the current version beside it, with a validation split."""
  task = get_task("perm", num_perms=2)
  cls = builders.BUILDERS["perm"]
  new_generators = cls._split_generators
  def old_generators(self, dl_manager):
    splits = new_generators(self, dl_manager)
    del splits["validation"]
    return splits
  with monkeypatch.context() as m:
    m.setattr(cls, "VERSION", tfds.core.Version("1.0.0"))
    m.setattr(cls, "_split_generators", old_generators)
    old = builders.prepare(task, str(tmp_path), 30, 10)
    assert set(old.info.splits) == {"train", "test"}
  old_files = _files(tmp_path)
  new = builders.prepare(task, str(tmp_path), 30, 10)
  assert str(new.version) == "1.1.0" and old.data_dir != new.data_dir
  assert set(new.info.splits) == {"train", "validation", "test"}
  assert [r["seed"] for r in new.as_data_source(split="test")] == [
      r["seed"] for r in old.as_data_source(split="test")]      # test unchanged
  assert all(_files(tmp_path)[f] == t for f, t in old_files.items())


def test_test_split_needs_distinct_questions(tmp_path):
  # 1x1-digit products: 81 questions, all of them in a 2000-example train split.
  with pytest.raises(ValueError, match="every test question tried is also a training"):
    builders.prepare(get_task("mult", digits=1), str(tmp_path), 2000, 10)


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv("MTCOT_DATA_DIR", "/somewhere/data")
  assert builders.default_data_dir("") == "/somewhere/data"
  assert builders.default_data_dir("/explicit") == "/explicit"
  monkeypatch.delenv("MTCOT_DATA_DIR")
  assert builders.default_data_dir("") == os.path.expanduser("~/.cache/mtcot_jax/data")


def _gsm8k_records(self, split, **kwargs):
  del self, kwargs
  n = 6 if split == "train" else 3
  return [{"question": f"Q{i}: what is {i} + {i}?".encode(),
           "annotation": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}".encode(),
           "short_answer": f"{2 * i}".encode(), "answer": b"unused"} for i in range(n)]


def test_gsm8k_through_mock_data(tmp_path):
  data = load_config(None, [f"data.data_dir={tmp_path}", "data.task=gsm8k",
                            "data.task_args={validation: 2}"]).data
  with tfds.testing.mock_data(as_data_source_fn=_gsm8k_records):
    train = builders.split_source(data, "train")
    assert len(train) == 4                      # the last 2 of 6 are the validation split
    assert (train[3].question, train[3].cot, train[3].answer) == (
        "Q3: what is 3 + 3?", "3 + 3 = 6", "6")
    validation = builders.split_source(data, "validation")
    assert [ex.answer for ex in validation.__getitems__([0, 1])] == ["8", "10"]
    assert validation[-1].answer == "10" and len(validation) == 2
    with pytest.raises(IndexError):
      validation[2]
    task = builders.task_for(data)
    assert task.example(2).answer == "4" and task.grade(" 4 ", task.example(2)) == 1.0
    big = load_config(None, [f"data.data_dir={tmp_path}", "data.task=gsm8k",
                             "data.task_args={validation: 6}"]).data
    with pytest.raises(ValueError, match="validation=6 leaves no training problems"):
      builders.split_source(big, "train")
  with pytest.raises(ValueError, match="validation=0; accepted: an int >= 1"):
    builders.get_task("gsm8k", validation=0)
  with tfds.testing.mock_data(num_examples=5):   # tfds's random records
    test = builders.split_source(data, "test")
    assert len(test) == 5 and isinstance(test[0].question, str)


def test_gsm8k_absent_says_how_to_get_it(tmp_path):
  data = load_config(None, [f"data.data_dir={tmp_path}", "data.task=gsm8k",
                            "data.task_args={}"]).data
  with pytest.raises(FileNotFoundError) as err:
    builders.split_source(data, "train")
  msg = str(err.value)
  assert "tfds build gsm8k" in msg and "array_record" in msg and "data.data_dir" in msg
  assert str(tmp_path) in msg
  with pytest.raises(FileNotFoundError, match="tfds build gsm8k"):
    builders.get_task("gsm8k", data_dir=str(tmp_path)).example(0)
  with pytest.raises(ValueError, match="built without its records"):
    get_task("gsm8k", data_dir=str(tmp_path)).example(0)
