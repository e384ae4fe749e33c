"""Tokenizer: fixed special ids, exact round trips, clear errors for bad models."""

import os
import pickle

import pytest
import sentencepiece as spm

from mtcot_jax.config import load_config
from mtcot_jax.data import tokenizer as T
from mtcot_jax.data.tasks import get_task

TASKS = [("mult", {"digits": 3}), ("mult", {"digits_a": 5, "digits_b": 2}),
         ("perm", {"num_perms": 4}), ("reach", {"nodes": 12, "depth": 3})]
ODD = ["", " ", "  two  spaces ", "tab\tand\nnewline\n", "Héllo wörld €100 — ok?",
       "Janet’s ducks lay 16 eggs.\n#### 18", "<<48/2=24>>24", "0123456789" * 3]


def _corpus(seeds):
  for name, difficulty in TASKS:
    task = get_task(name, **difficulty)
    for s in seeds:
      ex = task.example(s)
      yield from (ex.question, ex.cot, ex.answer)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "sub" / "task.model"
  return T.train_tokenizer(_corpus(range(300)), str(path), vocab_size=1024)


def test_special_ids(tok):
  assert (T.PAD_ID, T.BOS_ID, T.EOS_ID, T.UNK_ID, T.THINK_ID, T.THINK_END_ID) == (0, 1, 2, 3, 4, 5)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.think_id, tok.think_end_id) == (
      0, 1, 2, 3, 4, 5)
  assert [tok.id_to_piece(i) for i in (4, 5)] == ["<think>", "</think>"]
  assert tok.encode("<think>") == [4] and tok.encode("</think>") == [5]
  assert 262 < tok.vocab_size <= 1024 and os.path.exists(tok.path)


def test_round_trip_task_texts_and_odd_text(tok):
  # Seeds the tokenizer never saw, and text unlike the corpus (byte fallback).
  for text in list(_corpus(range(1000, 1100))) + ODD:
    assert tok.decode(tok.encode(text)) == text, repr(text)


def test_digits_are_single_tokens(tok):
  digit_ids = [tok.encode(d) for d in "0123456789"]
  assert all(len(ids) == 1 for ids in digit_ids)
  ex = get_task("mult", digits=3).example(7)
  for text in (ex.question, ex.cot, ex.answer):
    pieces = [tok.id_to_piece(i) for i in tok.encode(text)]
    assert pieces == list(text)


def test_encode_prompt(tok):
  q = "75*83"
  body = tok.encode(q)
  assert T.encode_prompt(tok, q) == [1] + body + [4]
  assert T.encode_prompt(tok, q, cot=False) == [1] + body + [4, 5]


def test_decode_special_tokens(tok):
  ids = [1] + tok.encode("12*3") + [4] + tok.encode("36") + [5] + tok.encode("36") + [2, 0, 0]
  assert tok.decode(ids) == "12*33636"
  assert tok.decode(ids, keep_special=True) == "<s>12*3<think>36</think>36</s><pad><pad>"
  assert "⁇" in tok.decode(tok.encode("7") + [tok.vocab_size + 5])   # a model id past the vocab
  assert tok.decode([]) == ""


def test_pickle_and_load(tok):
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode("6540+0171=6612") == tok.encode("6540+0171=6612")
  loaded = T.load_tokenizer(tok.path)
  assert loaded.vocab_size == tok.vocab_size and loaded.path == tok.path


def _raw_model(tmp_path, **kwargs):
  prefix = str(tmp_path / "raw")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["hello world 123", "abc def"] * 50), model_prefix=prefix,
      vocab_size=40, hard_vocab_limit=False, minloglevel=2, **kwargs)
  return prefix + ".model"


def test_model_without_special_tokens(tmp_path):
  # sentencepiece's defaults: no pad, no <think>.
  with pytest.raises(ValueError) as err:
    T.load_tokenizer(_raw_model(tmp_path))
  assert "pad" in str(err.value) and "<think>" in str(err.value)
  with pytest.raises(ValueError, match="</think>"):
    T.load_tokenizer(_raw_model(tmp_path, pad_id=3, unk_id=0, user_defined_symbols=["<think>"]))
  with pytest.raises(FileNotFoundError, match="nothing.model"):
    T.load_tokenizer(str(tmp_path / "nothing.model"))


def test_user_model_with_other_ids(tmp_path):
  path = _raw_model(tmp_path, pad_id=3, unk_id=0, bos_id=1, eos_id=2,
                    user_defined_symbols=["</think>", "<think>"])
  tok = T.load_tokenizer(path)
  assert (tok.pad_id, tok.unk_id, tok.think_id, tok.think_end_id) == (3, 0, 5, 4)
  assert T.encode_prompt(tok, "abc", cot=False)[-2:] == [5, 4]


def test_small_vocab_without_byte_fallback(tmp_path):
  # The demo's model.vocab_size=128 leaves no room for 256 byte pieces.
  texts = list(_corpus(range(100))) + ["two lines\nand a\ttab"]
  tok = T.train_tokenizer(texts, str(tmp_path / "small.model"), vocab_size=128)
  assert tok.vocab_size <= 128 and (tok.bos_id, tok.think_id, tok.think_end_id) == (1, 4, 5)
  for text in list(_corpus(range(1000, 1050))) + ["Any ASCII: {x} ~ [y] `z` #1!", "a\nb\tc"]:
    assert tok.decode(tok.encode(text)) == text, repr(text)
  assert "⁇" in tok.decode(tok.encode("é"))           # no bytes to fall back on
  tiny = T.train_tokenizer(texts, str(tmp_path / "tiny.model"), vocab_size=48)
  for text in _corpus(range(1000, 1020)):             # no room for all of ASCII; still exact
    assert tiny.decode(tiny.encode(text)) == text


def test_train_tokenizer_bad_input(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=20 .* >= 2[0-9] .*distinct characters"):
    T.train_tokenizer(list(_corpus(range(20))), str(tmp_path / "a.model"), vocab_size=20)
  with pytest.raises(ValueError, match="no .*texts"):
    T.train_tokenizer(["", ""], str(tmp_path / "b.model"), vocab_size=512)


def test_tokenizer_for_trains_once_then_reuses(tmp_path):
  cfg = load_config(None, [f"data.data_dir={tmp_path}", "data.task=perm",
                           "data.task_args={num_perms: 3}", "data.train_size=50",
                           "data.eval_size=10", "model.vocab_size=512"])
  tok = T.tokenizer_for(cfg)
  assert tok.path.startswith(str(tmp_path)) and tok.vocab_size <= 512
  mtime = os.stat(tok.path).st_mtime_ns
  again = T.tokenizer_for(cfg)
  assert again.path == tok.path and os.stat(tok.path).st_mtime_ns == mtime
  assert T.tokenizer_for(cfg.data, vocab_size=512).path == tok.path
  with pytest.raises(ValueError, match="vocab_size"):
    T.tokenizer_for(cfg.data)
  # A given model file wins.
  mine = cfg.replace(data={"tokenizer": tok.path, "task": "mult", "task_args": {"digits": 2}})
  assert T.tokenizer_for(mine).path == tok.path
