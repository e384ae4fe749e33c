"""TFDS builders: prepared offline, read back, disjoint splits, reused; GSM8K."""

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
                                             ("reach", {"nodes": 8, "depth": 2})])
def test_prepare_read_back_and_reuse(tmp_path, no_network, monkeypatch, name, difficulty):
  task = get_task(name, **difficulty)
  builder = builders.prepare(task, str(tmp_path), train_size=60, test_size=20)
  assert builder.data_dir.startswith(str(tmp_path))
  train = builder.as_data_source(split="train")
  test = builder.as_data_source(split="test")
  assert len(train) == 60 and len(test) == 20
  train_seeds = sorted(int(r["seed"]) for r in train)
  assert train_seeds == list(range(60))
  for r in list(train)[:10] + list(test)[:10]:
    ex = task.example(int(r["seed"]))
    assert (r["question"].decode(), r["cot"].decode(), r["answer"].decode()) == (
        ex.question, ex.cot, ex.answer)
  assert all(int(r["seed"]) >= builders.TEST_SEED_OFFSET for r in test)
  assert not {r["question"] for r in train} & {r["question"] for r in test}

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
                            "data.task_args={}"]).data
  with tfds.testing.mock_data(as_data_source_fn=_gsm8k_records):
    train = builders.split_source(data, "train")
    assert len(train) == 6
    assert (train[4].question, train[4].cot, train[4].answer) == (
        "Q4: what is 4 + 4?", "4 + 4 = 8", "8")
    task = builders.task_for(data)
    assert task.example(2).answer == "4" and task.grade(" 4 ", task.example(2)) == 1.0
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
