"""The tokenizer of a Hugging Face checkpoint, with `<think>` and `</think>` added.

A Hugging Face directory carries `tokenizer.json` (the `tokenizers` package reads
it; Llama 3, Qwen2 and most Llama 2 repositories have one) or only a sentencepiece
`tokenizer.model`; the special tokens are named in `tokenizer_config.json` (or,
for BOS/EOS ids, in `config.json`). Where the vocabulary lacks the thinking
tokens they are appended as new ids (the model's embedding grows to match: see
`mtcot_jax.hf`); where they are ordinary pieces of it, they keep their ids and
become added (user-defined) tokens, so that text matches them whole. Models
without a BOS token (Qwen2) start sequences with their EOS token; without a pad
token, EOS pads (padding is never attended to).

A run that starts from such a checkpoint keeps its tokenizer in the workdir as
one file, `tokenizer.json`: {"format", "backend", "model", "special"} with the
backend's own serialisation and every special id, so that the ids the run was
trained with are recorded next to its checkpoints.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Iterable

from mtcot_jax.tokens import THINK, THINK_END

FORMAT = "mtcot_jax/hf-tokenizer/1"
_SPECIAL_KEYS = ("bos", "eos", "pad", "unk", "think", "think_end")


class HFTokenizer:
  """The same interface as `mtcot_jax.data.Tokenizer` over a `tokenizers`
  tokenizer or a sentencepiece model whose special ids are given explicitly.

  Attributes: pad_id, bos_id, eos_id, unk_id (-1 if none), think_id,
  think_end_id, vocab_size (ids are in [0, vocab_size)), special_ids, path.
  """

  def __init__(self, backend: str, model: str | bytes, special: dict[str, int], path: str = ""):
    if backend not in ("tokenizers", "sentencepiece"):
      raise ValueError(f"backend={backend!r}; accepted: 'tokenizers' or 'sentencepiece'")
    self.backend, self._model, self.path = backend, model, path
    if backend == "tokenizers":
      import tokenizers
      self._tk = tokenizers.Tokenizer.from_str(model)
      self.vocab_size: int = self._tk.get_vocab_size(with_added_tokens=True)
    else:
      import sentencepiece as spm
      self._sp = spm.SentencePieceProcessor(model_proto=model)
      self.vocab_size = self._sp.get_piece_size()
    missing = [k for k in _SPECIAL_KEYS if k not in special]
    bad = {k: v for k, v in special.items()
           if not (isinstance(v, int) and (-1 if k == "unk" else 0) <= v < self.vocab_size)}
    if missing or bad:
      raise ValueError(f"tokenizer {path or '(in memory)'}: special ids {special} are missing "
                       f"{missing} or out of range {bad}; accepted: ids in [0, "
                       f"{self.vocab_size}) for {list(_SPECIAL_KEYS)} (unk may be -1)")
    self.special = dict(special)
    self.bos_id, self.eos_id, self.pad_id = special["bos"], special["eos"], special["pad"]
    self.unk_id, self.think_id, self.think_end_id = (special["unk"], special["think"],
                                                     special["think_end"])
    self.special_ids = frozenset((self.pad_id, self.bos_id, self.eos_id, self.think_id,
                                  self.think_end_id))
    for piece, i in ((THINK, self.think_id), (THINK_END, self.think_end_id)):
      if self.encode("a" + piece + "a").count(i) != 1:
        raise ValueError(f"tokenizer {path or '(in memory)'}: {piece} (id {i}) is not one "
                         "token wherever it appears; accepted: a tokenizer where it is an "
                         "added (special) token")

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS."""
    if self.backend == "tokenizers":
      return self._tk.encode(text, add_special_tokens=False).ids
    return self._sp.encode(text, out_type=int)

  def _decode_run(self, ids: list[int]) -> str:
    if self.backend == "tokenizers":
      return self._tk.decode(ids, skip_special_tokens=False)
    return self._sp.decode(ids)

  def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
    """The text of `ids`; special tokens dropped, or written as their pieces with
    keep_special. Ids outside the vocabulary are dropped."""
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    if not keep_special:
      return self._decode_run([i for i in ids if i not in self.special_ids])
    out, run = [], []
    for i in ids:
      if i in self.special_ids:
        out += [self._decode_run(run), self.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return "".join(out + [self._decode_run(run)])

  def id_to_piece(self, i: int) -> str:
    if self.backend == "tokenizers":
      return self._tk.id_to_token(int(i)) or ""
    return self._sp.id_to_piece(int(i))

  def serialize(self) -> bytes:
    """The one-file form kept in a workdir (`load_hf_tokenizer_file` reads it)."""
    model = (self._model if self.backend == "tokenizers"
             else base64.b64encode(self._model).decode("ascii"))
    return json.dumps({"format": FORMAT, "backend": self.backend, "special": self.special,
                       "model": model}).encode()

  def __getstate__(self):
    return {"backend": self.backend, "model": self._model, "special": self.special,
            "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["backend"], state["model"], state["special"], state["path"])

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, {self.backend}, vocab_size={self.vocab_size})"


def load_hf_tokenizer_file(path: str) -> HFTokenizer:
  """Reads the one-file form (`HFTokenizer.serialize`)."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    d = json.loads(raw)
    ok = isinstance(d, dict) and d.get("format") == FORMAT
  except (json.JSONDecodeError, UnicodeDecodeError):
    ok = False
  if not ok:
    raise ValueError(f"{path} is not a tokenizer file mtcot_jax wrote (format {FORMAT}); "
                     "accepted: a run's tokenizer.json or a sentencepiece .model file")
  model = d["model"] if d["backend"] == "tokenizers" else base64.b64decode(d["model"])
  return HFTokenizer(d["backend"], model, {k: int(v) for k, v in d["special"].items()}, path)


def _token_name(value) -> str | None:
  if isinstance(value, dict):       # {"content": "<s>", ...} (AddedToken's form)
    value = value.get("content")
  return value if isinstance(value, str) else None


def add_think_tokens(tk) -> list[str]:
  """Makes `<think>`/`</think>` added tokens of a `tokenizers.Tokenizer` (in place);
  returns the pieces that were not in its vocabulary (appended as new ids)."""
  import tokenizers
  added = []
  have = {t.content for t in tk.get_added_tokens_decoder().values()}
  for piece in (THINK, THINK_END):
    # A piece of the model's own vocabulary is split by the pre-tokenizer like
    # any text: made an added token, it keeps its id and is matched whole.
    if piece not in have:
      if tk.token_to_id(piece) is None:
        added.append(piece)
      tk.add_special_tokens([tokenizers.AddedToken(piece, special=True, normalized=False)])
  return added


def from_tokenizer(tk, ids: dict[str, int], path: str = "") -> tuple[HFTokenizer, list[str]]:
  """An HFTokenizer over a `tokenizers.Tokenizer` whose special ids are given
  (bos, eos, pad, unk; -1 where the model has none: BOS and pad fall back to EOS),
  with the thinking tokens added as `from_hf_dir` adds them."""
  if ids.get("eos", -1) < 0:
    raise ValueError(f"{path or 'tokenizer'}: no EOS token id; accepted: a tokenizer that "
                     "names one")
  added = add_think_tokens(tk)
  eos = ids["eos"]
  special = {"bos": eos if ids.get("bos", -1) < 0 else ids["bos"], "eos": eos,
             "pad": eos if ids.get("pad", -1) < 0 else ids["pad"], "unk": ids.get("unk", -1),
             "think": tk.token_to_id(THINK), "think_end": tk.token_to_id(THINK_END)}
  return HFTokenizer("tokenizers", tk.to_str(), special, path), added


def from_hf_dir(path: str) -> tuple[HFTokenizer | None, list[str]]:
  """The tokenizer of a Hugging Face directory with `<think>`/`</think>` appended
  where missing, and the pieces appended (in id order). (None, []) if the
  directory has neither tokenizer.json nor tokenizer.model."""
  def read_json(name):
    p = os.path.join(path, name)
    if not os.path.exists(p):
      return {}
    with open(p) as f:
      return json.load(f)
  tcfg, mcfg = read_json("tokenizer_config.json"), read_json("config.json")
  tj, sp_path = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
  added: list[str] = []
  sp_ids: dict[str, int] = {}
  if os.path.exists(tj):
    import tokenizers
    tk = tokenizers.Tokenizer.from_file(tj)
    added = add_think_tokens(tk)
    backend, model, to_id = "tokenizers", tk.to_str(), tk.token_to_id
  elif os.path.exists(sp_path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    with open(sp_path, "rb") as f:
      proto = f.read()
    m = pb.ModelProto()
    m.ParseFromString(proto)
    have = {p.piece: i for i, p in enumerate(m.pieces)}
    user = pb.ModelProto.SentencePiece.USER_DEFINED
    for piece in (THINK, THINK_END):
      if piece not in have:
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, user
        have[piece] = len(m.pieces) - 1
        added.append(piece)
      else:   # a normal (or control) piece: user-defined ones are matched whole in text
        m.pieces[have[piece]].type = user
    model = m.SerializeToString()
    sp = spm.SentencePieceProcessor(model_proto=model)
    backend = "sentencepiece"
    to_id = lambda piece: have.get(piece)  # noqa: E731
    sp_ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
  else:
    return None, []

  def special_id(name: str) -> int | None:
    piece = _token_name(tcfg.get(f"{name}_token"))
    if piece is not None and to_id(piece) is not None:
      return int(to_id(piece))
    i = mcfg.get(f"{name}_token_id")
    if isinstance(i, list):
      i = i[0] if i else None
    if i is None and sp_ids.get(name, -1) >= 0:
      i = sp_ids[name]
    return None if i is None else int(i)

  eos = special_id("eos")
  if eos is None:
    raise ValueError(f"{path}: no EOS token in tokenizer_config.json (eos_token), config.json "
                     "(eos_token_id) or the tokenizer; accepted: a checkpoint that names one")
  bos = special_id("bos")
  pad = special_id("pad")
  unk = special_id("unk")
  special = {"bos": eos if bos is None else bos, "eos": eos, "pad": eos if pad is None else pad,
             "unk": -1 if unk is None else unk,
             "think": int(to_id(THINK)), "think_end": int(to_id(THINK_END))}
  return HFTokenizer(backend, model, special, path), added
