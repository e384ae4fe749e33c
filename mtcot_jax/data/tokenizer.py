"""Sentencepiece tokenizers with the special tokens of the sequence format.

A trained tokenizer has the special tokens at fixed ids (`mtcot_jax.tokens`):
pad 0, bos 1, eos 2, unk 3, `<think>` 4, `</think>` 5. A user-supplied `.model`
may place them elsewhere, so code should read them from the Tokenizer
(`tok.bos_id`, ...). Trained tokenizers split digits into single tokens,
fall back to bytes for unseen characters and normalize nothing, so that
`decode(encode(text)) == text` for any text.
"""

from __future__ import annotations

import os
import string
import tempfile
from typing import Iterable

import sentencepiece as spm

from mtcot_jax.data import catalog
from mtcot_jax.tokens import (BOS_ID, EOS_ID, PAD_ID, THINK, THINK_END,  # noqa: F401
                              THINK_END_ID, THINK_ID, UNK_ID)


class Tokenizer:
  """A sentencepiece model plus the ids of the special tokens.

  Attributes: pad_id, bos_id, eos_id, unk_id, think_id, think_end_id,
  vocab_size (number of pieces; ids are in [0, vocab_size)), path.
  Picklable (the model travels as bytes), so grain workers can use it.
  """

  def __init__(self, model_proto: bytes, path: str = ""):
    self.path = path
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    sp = self._sp
    self.vocab_size: int = sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
        sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
    self.think_id, self.think_end_id = sp.piece_to_id(THINK), sp.piece_to_id(THINK_END)
    missing = [name for name, i in (("pad", self.pad_id), ("bos", self.bos_id),
                                    ("eos", self.eos_id)) if i < 0]
    # A user-defined symbol is always one piece, wherever it appears in a text.
    missing += [piece for piece, i in ((THINK, self.think_id), (THINK_END, self.think_end_id))
                if i == self.unk_id or i not in sp.encode("a" + piece + "a")]
    if missing:
      raise ValueError(
          f"tokenizer {path or '(in memory)'} lacks the special tokens {missing}; accepted: a "
          f"sentencepiece model with pad, bos and eos ids and the user-defined symbols "
          f"{THINK} and {THINK_END} (train one with mtcot_jax.data.train_tokenizer)")
    self.special_ids = frozenset((self.pad_id, self.bos_id, self.eos_id, self.think_id,
                                  self.think_end_id))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS."""
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
    """The text of `ids`. Special tokens are dropped, or written as their
    pieces (`<s>`, `<think>`, ...) with keep_special. Ids outside the
    vocabulary (a model may have a larger one) decode as unknown (` ⁇ `)."""
    ids = [int(i) if 0 <= int(i) < self.vocab_size else self.unk_id for i in ids]
    if not keep_special:
      return self._sp.decode([i for i in ids if i not in self.special_ids])
    out, run = [], []
    for i in ids:
      if i in self.special_ids:
        out += [self._sp.decode(run), self._sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return "".join(out + [self._sp.decode(run)])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def serialize(self) -> bytes:
    """The .model file's bytes."""
    return self._proto

  def __getstate__(self):
    return {"model_proto": self._proto, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], state["path"])

  def __repr__(self) -> str:
    return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str):
  """Loads a sentencepiece `.model` file, or the `tokenizer.json` a run started
  from a Hugging Face checkpoint keeps (`hf_tokenizer.HFTokenizer`). Raises
  ValueError if it lacks a special token."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer model {path!r} does not exist")
  if path.endswith(".json"):
    from mtcot_jax.data.hf_tokenizer import load_hf_tokenizer_file
    return load_hf_tokenizer_file(path)
  with open(path, "rb") as f:
    proto = f.read()
  try:
    spm.SentencePieceProcessor(model_proto=proto)
  except (RuntimeError, OSError) as e:
    raise ValueError(f"tokenizer {path} is not a sentencepiece model ({e}); accepted: a "
                     "sentencepiece .model file") from None
  return Tokenizer(proto, path)


_SPACE = "\u2581"  # sentencepiece's whitespace symbol
_ASCII = "".join(c for c in string.printable if not c.isspace())


def train_tokenizer(texts: Iterable[str], path: str, vocab_size: int,
                    byte_fallback: bool | None = None) -> Tokenizer:
  """Trains a sentencepiece model on `texts`, writes it to `path` and loads it.

  Unigram; digits split into single tokens; no normalization; special tokens
  at PAD_ID..THINK_END_ID. Every character of the corpus, the space and (if
  room) every printable ASCII character is a piece. `byte_fallback` (None:
  on when `vocab_size` leaves room for the 256 byte pieces) encodes any other
  character as bytes, so that every text round-trips exactly; without it,
  characters outside that set decode as unknown (` ⁇ `). `vocab_size` is an
  upper bound: a corpus with few distinct characters (the synthetic tasks)
  gives fewer pieces. The file appears atomically.
  """
  path = os.fspath(path)
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("train_tokenizer: no (non-empty) texts to train on")
  chars = set().union(*map(set, texts)) - {" "} | {_SPACE}
  need = len(chars) + 6
  if vocab_size < need:
    raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: accepted: >= "
                     f"{need} (6 special tokens and {len(chars)} distinct characters)")
  if vocab_size >= need + len(set(_ASCII) - chars):
    chars |= set(_ASCII)
  if byte_fallback is None:
    byte_fallback = vocab_size >= len(chars) + 6 + 256
  # A character becomes a piece only if the trainer sees it in a sentence.
  texts.insert(0, " ".join(sorted(chars - {_SPACE})))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
    prefix = os.path.join(tmp, "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size,
        hard_vocab_limit=False, model_type="unigram", character_coverage=1.0,
        byte_fallback=byte_fallback,
        split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False,
        max_sentence_length=1 << 16, input_sentence_size=0,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        user_defined_symbols=[THINK, THINK_END], num_threads=1, minloglevel=2)
    os.replace(prefix + ".model", path)
  tok = load_tokenizer(path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.think_id, tok.think_end_id) == (
      PAD_ID, BOS_ID, EOS_ID, UNK_ID, THINK_ID, THINK_END_ID)
  return tok


def unseen_characters(tok: Tokenizer, text: str) -> list[str]:
  """The characters of `text` the tokenizer has no piece for (they encode as the
  unknown token, or as byte pieces no training text produced)."""
  out = []
  for c in dict.fromkeys(text):
    ids = tok.encode(c)
    if tok.unk_id in ids or any(tok.id_to_piece(i).startswith("<0x") for i in ids):
      out.append(c)
  return out


def encode_prompt(tok: Tokenizer, question: str, cot: bool = True) -> list[int]:
  """`BOS question <think>` (cot=False: `BOS question <think> </think>`) as ids.
  Raises ValueError on characters the tokenizer has never seen (a model would
  read them as the unknown token, which it never met in training)."""
  bad = unseen_characters(tok, question)
  if bad:
    raise ValueError(f"question {question!r} has characters the tokenizer "
                     f"{tok.path or '(in memory)'} has never seen: {bad}; accepted: questions "
                     "written with the task's characters (see its training examples)")
  ids = [tok.bos_id] + tok.encode(question) + [tok.think_id]
  return ids if cot else ids + [tok.think_end_id]


def corpus_texts(examples: Iterable) -> Iterable[str]:
  """The question, cot and answer of each example, as separate texts."""
  for ex in examples:
    yield ex.question
    yield ex.cot
    yield ex.answer


def tokenizer_for(cfg, vocab_size: int | None = None) -> Tokenizer:
  """The tokenizer for a `Config` (or a `DataConfig` plus `vocab_size`).

  `data.tokenizer` if set; else one trained on the task's training split, with
  at most `model.vocab_size` pieces, cached under the data directory as
  `tokenizers/<task>/<config>/v<vocab_size>.model` and reused.
  """
  data = getattr(cfg, "data", cfg)
  if data.tokenizer:
    return load_tokenizer(data.tokenizer)
  if vocab_size is None:
    if not hasattr(cfg, "model"):
      raise ValueError("tokenizer_for(DataConfig) needs vocab_size=...; or pass the full Config")
    vocab_size = cfg.model.vocab_size
  task = catalog.task_for(data)
  name = (task.config_name if task.name == "gsm8k" else
          f"{task.config_name},train={data.train_size},test={data.eval_size}")
  path = os.path.join(catalog.default_data_dir(data.data_dir), "tokenizers", task.name,
                      name, f"v{vocab_size}.model")
  if os.path.exists(path):
    return load_tokenizer(path)
  from mtcot_jax.data import builders  # tfds: only to train a tokenizer
  source = builders.split_source(data, "train")
  examples = source.__getitems__(range(len(source)))
  return train_tokenizer(corpus_texts(examples), path, vocab_size)
