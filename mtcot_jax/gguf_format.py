"""llama.cpp's GGUF files, read into the Hugging Face form `hf_format` maps.

A GGUF file holds the model's configuration and tokenizer as key/value metadata
and its tensors under llama.cpp's names, many of them quantised. This module
reads it with the `gguf` package (the format's own reader) and translates it to
what a Hugging Face directory would hold, so that one mapping (`hf_format`)
serves both:

* `hf_config(fields)`: a config.json dict from the `llama.*` / `qwen2.*` keys
  (layers, width, heads, feed-forward width, RoPE theta, RMSNorm epsilon,
  vocabulary, tied embeddings: a file without `output.weight` ties them).
* `hf_tensors(reader, hf)`: every tensor dequantised to float32 numpy under its
  Hugging Face name (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants: whatever
  `gguf.quants.dequantize` supports), one tensor at a time. llama.cpp's
  converter permutes the rows of Llama's query and key weights (it interleaves
  the two rotary halves of each head, its RoPE pairs neighbouring dimensions);
  `unpermute_rows` undoes it (Qwen2 files are not permuted).
* `tokenizer(fields)`: a `tokenizers` BPE tokenizer from `tokenizer.ggml.*` (the
  byte-level "gpt2" model: SmolLM2, Llama 3, Qwen2), its pre-tokenizer chosen by
  `tokenizer.ggml.pre` as llama.cpp does (SmolLM2's "smollm" splits digits one by
  one before the byte-level split, as its original tokenizer.json does;
  transformers' GGUF import ignores that key), the control tokens as special
  added tokens, and the special ids; `chat_template(fields)` the Jinja template.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

ARCHES = ("llama", "qwen2")

# Pre-tokenizer regexes (llama.cpp's llama-vocab.cpp, by tokenizer.ggml.pre).
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
          r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
PRE_TOKENIZERS = {"default": "gpt2", "gpt2": "gpt2", "smollm": "digits+gpt2",
                  "starcoder": "digits+gpt2", "llama-bpe": "llama3", "llama3": "llama3",
                  "qwen2": "qwen2"}


def read(path: str):
  """A `gguf.GGUFReader` over `path` (memory-mapped: tensors are read when used)."""
  import gguf
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} is not a file; accepted: a llama.cpp .gguf file "
                            "(`python -m mtcot_jax.tools.smollm2` fetches SmolLM2's)")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:   # the reader raises ValueError/struct errors on other files
    raise ValueError(f"{path!r} is not a readable GGUF file ({type(e).__name__}: {e}); "
                     "accepted: a llama.cpp .gguf file (format version 2 or 3)") from None


def fields(reader) -> dict[str, Any]:
  """The metadata as plain Python values (strings, numbers, lists)."""
  return {name: f.contents() for name, f in reader.fields.items()
          if not name.startswith("GGUF.")}


def _need(meta: dict, key: str):
  if key not in meta:
    raise ValueError(f"the GGUF file has no {key!r}; accepted: a file llama.cpp's converter "
                     "wrote for a Llama or Qwen2 model")
  return meta[key]


def hf_config(meta: dict, tensor_names: set[str]) -> dict:
  """config.json (as `hf_format.read_config` returns it) from the metadata."""
  arch = meta.get("general.architecture")
  if arch not in ARCHES:
    raise ValueError(f"GGUF architecture {arch!r} is not supported; accepted: {list(ARCHES)}")
  a = lambda key: _need(meta, f"{arch}.{key}")  # noqa: E731
  heads, d = int(a("attention.head_count")), int(a("embedding_length"))
  head_dim = int(meta.get(f"{arch}.attention.key_length", d // heads))
  tokens = meta.get("tokenizer.ggml.tokens")
  vocab = int(meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else 0))
  if not vocab:
    raise ValueError("the GGUF file gives no vocabulary size (neither "
                     f"{arch}.vocab_size nor tokenizer.ggml.tokens)")
  scaling = meta.get(f"{arch}.rope.scaling.type")
  if scaling not in (None, "none"):
    raise ValueError(f"{arch}.rope.scaling.type={scaling!r} is not supported; accepted: none")
  return {"_kind": arch, "architectures": ["LlamaForCausalLM" if arch == "llama"
                                           else "Qwen2ForCausalLM"],
          "vocab_size": vocab, "hidden_size": d, "num_hidden_layers": int(a("block_count")),
          "num_attention_heads": heads,
          "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
          "head_dim": head_dim, "intermediate_size": int(a("feed_forward_length")),
          "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
          "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
          "tie_word_embeddings": "output.weight" not in tensor_names,
          "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
          "hidden_act": "silu"}


_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(name: str) -> str | None:
  """llama.cpp's tensor name -> Hugging Face's (None: not a weight we read)."""
  stem, _, kind = name.rpartition(".")
  if stem in _TOP:
    return f"{_TOP[stem]}.{kind}"
  parts = stem.split(".")
  if len(parts) == 3 and parts[0] == "blk" and parts[2] in _NAMES:
    return f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.{kind}"
  return None


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of llama.cpp's `permute` of a query/key weight (rows = heads x
  head_dim, or a bias): within each head, row 2i+h (h = 0, 1) goes back to row
  h * head_dim/2 + i."""
  rows = w.shape[0]
  return (w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def dequantize(tensor) -> np.ndarray:
  """One GGUF tensor as float32 numpy in Hugging Face's (out, in) order."""
  import gguf
  try:
    x = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise ValueError(f"tensor {tensor.name}: type {tensor.tensor_type.name} cannot be "
                     "dequantised by the gguf package; accepted: F32, F16, BF16, Q8_0, "
                     "Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants") from None
  return np.asarray(x, np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def hf_tensors(reader, hf: dict) -> dict[str, np.ndarray]:
  """Every weight of the file, dequantised, under its Hugging Face name (query
  and key rows in Hugging Face's order)."""
  out = {}
  for t in reader.tensors:
    name = hf_name(t.name)
    if name is None:
      if t.name.startswith("rope_freqs"):   # llama3 scaling factors: not supported above
        continue
      raise ValueError(f"the GGUF file has a tensor {t.name!r} this model does not use")
    x = dequantize(t)
    if hf["_kind"] == "llama" and (".q_proj." in name or ".k_proj." in name):
      x = unpermute_rows(x, hf["num_attention_heads"] if ".q_proj." in name
                         else hf["num_key_value_heads"])
    out[name] = x
  return out


def _pre_tokenizer(pre: str):
  from tokenizers import Regex, pre_tokenizers as pt
  kind = PRE_TOKENIZERS.get(pre or "default")
  if kind is None:
    raise ValueError(f"tokenizer.ggml.pre={pre!r} is not supported; accepted: "
                     f"{sorted(PRE_TOKENIZERS)}")
  if kind in ("gpt2", "digits+gpt2"):
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    return (pt.Sequence([pt.Digits(individual_digits=True), byte_level])
            if kind == "digits+gpt2" else byte_level)
  regex = _LLAMA3 if kind == "llama3" else _QWEN2
  return pt.Sequence([pt.Split(Regex(regex), behavior="isolated", invert=False),
                      pt.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer(meta: dict):
  """(`tokenizers.Tokenizer`, special ids {bos, eos, pad, unk}: -1 where absent)
  from the file's `tokenizer.ggml.*` keys."""
  import tokenizers
  from tokenizers import decoders, models, processors
  model = meta.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"tokenizer.ggml.model={model!r} is not supported; accepted: 'gpt2' "
                     "(byte-level BPE: SmolLM2, Llama 3, Qwen2)")
  tokens = list(_need(meta, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
  types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
  tk = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                       merges=merges, fuse_unk=False))
  tk.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
  tk.decoder = decoders.ByteLevel()
  tk.post_processor = processors.ByteLevel(trim_offsets=False)
  control, user = 3, 4   # llama.cpp's token types
  tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                         for t, ty in zip(tokens, types) if ty == control])
  tk.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                 for t, ty in zip(tokens, types) if ty == user])
  ids = {name: int(meta.get(f"tokenizer.ggml.{key}_token_id", -1))
         for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"),
                           ("unk", "unknown"))}
  return tk, ids


def chat_template(meta: dict) -> str | None:
  return meta.get("tokenizer.chat_template")
