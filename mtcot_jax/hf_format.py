"""The Hugging Face checkpoint format, both ways: a `LlamaForCausalLM` /
`Qwen2ForCausalLM` config.json to our model config (`config_for`) and back
(`hf_config`), its safetensors tensors to our parameters and back: which tensor
is which parameter (`tensor_table`), one leaf at a time (`hf_leaves`, `to_hf`) or
a whole tree (`main_params_from_hf`, `main_params_to_hf`). `hf.py` and `hf_io.py`
read and write the directories with these; no torch. The main model
maps one to one: both are pre-RMSNorm decoders with rotate-half RoPE,
grouped-query attention and SwiGLU. A Hugging Face linear weight is (out, in)
and is applied as x @ W.T; ours are (in, ...) einsum kernels, so q_proj
(H*Dh, D) becomes q (D, H, Dh) = W.T reshaped, o_proj (D, H*Dh) becomes o
(H, Dh, D). Qwen2's q/k/v biases become `model.qkv_bias`; RoPE's theta and
`linear`/`llama3` scaling, RMSNorm's eps, tied or untied embeddings and the head
dimension come from the config (a tied checkpoint that stores an lm_head.weight
unlike its embedding is untied, as transformers does). Where the tokenizer lacks
`<think>`/`</think>` they are appended (`data/hf_tokenizer.py`) and the embedding
(and unembedding) grow by rows set to the mean of the existing ones (in a padded
vocabulary they take unused rows, set the same way), so the new tokens start as
an average token. The export is a `LlamaForCausalLM`: a model with q/k/v biases
(imported from Qwen2) is a Llama with `attention_bias` and an o_proj bias of
zeros.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Sequence

import numpy as np

from mtcot_jax.config import Config, ConfigError, config_from_dict

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def read_config(path: str) -> dict:
  """A checkpoint directory's config.json, checked to be an architecture we map."""
  file = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.exists(file):
    raise FileNotFoundError(f"{path!r} is not a Hugging Face checkpoint directory: no "
                            "config.json; accepted: a directory saved by save_pretrained")
  hf = _read_json(file)
  arch = (hf.get("architectures") or [None])[0]
  kind = ARCHITECTURES.get(arch) if arch else hf.get("model_type")
  if kind not in ARCHITECTURES.values():
    raise ValueError(f"{file}: architecture {arch or hf.get('model_type')!r} is not supported; "
                     f"accepted: {sorted(ARCHITECTURES)}")
  return {**hf, "_kind": kind}


def _rope(hf: dict) -> tuple[float, dict]:
  """(theta, scaling) as transformers reads them: `rope_scaling` (older files)
  where set, else transformers 5's `rope_parameters`; theta from that dict or
  the top-level `rope_theta`; llama3's original length from the top level, the
  dict, or max_position_embeddings, in that order."""
  scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  theta = float(scaling.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
  kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
  if kind == "default":
    return theta, {}
  keep = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}
  if kind not in keep:
    raise ValueError(f"RoPE scaling {kind!r} is not supported; accepted: default, "
                     "linear, llama3")
  if kind == "llama3":
    scaling["original_max_position_embeddings"] = (
        hf.get("original_max_position_embeddings")
        or scaling.get("original_max_position_embeddings") or hf.get("max_position_embeddings"))
  missing = [k for k in keep[kind] if scaling.get(k) is None]
  if missing:
    raise ValueError(f"RoPE scaling {kind!r} in config.json lacks {missing}; accepted: "
                     f"{list(keep[kind])} all given")
  return theta, {"type": kind, **{k: scaling[k] for k in keep[kind]}}


def model_fields(hf: dict) -> dict[str, Any]:
  """ModelConfig fields of a checkpoint's config.json (as `read_config` returns)."""
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; accepted: silu")
  if hf.get("mlp_bias"):
    raise ValueError("checkpoints with mlp_bias are not supported; accepted: mlp_bias=false")
  if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
    raise ValueError("sliding-window attention is not supported; accepted: "
                     "use_sliding_window=false")
  heads = int(hf["num_attention_heads"])
  theta, scaling = _rope(hf)
  head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
  return {
      "vocab_size": int(hf["vocab_size"]), "d_model": int(hf["hidden_size"]),
      "num_layers": int(hf["num_hidden_layers"]), "num_heads": heads,
      "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
      "head_dim": 0 if head_dim * heads == hf["hidden_size"] else head_dim,
      "mlp_dim": int(hf["intermediate_size"]), "rope_theta": theta,
      "rope_scaling": scaling, "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
      "max_position_embeddings": int(hf.get("max_position_embeddings") or 0),
      # A Llama with attention_bias has an o_proj bias too: accepted where it is
      # zero (what save_hf writes), checked when the weights are read.
      "qkv_bias": hf["_kind"] == "qwen2" or bool(hf.get("attention_bias"))}


def config_for(path: str, base: Config | None = None, overrides: Sequence[str] = ()) -> Config:
  """`base` (or the defaults) with the model section of the checkpoint at `path`
  (compute/param dtypes, scan_layers, remat and attention kept from `base`) and `overrides`
  applied after. The vocabulary grows by the thinking tokens the tokenizer lacks,
  and decode.eos_id / decode.think_end_id are the tokenizer's."""
  hf = read_config(path)
  fields = model_fields(hf)
  if fields["tie_embeddings"] and _unties(path):
    fields["tie_embeddings"] = False
  from mtcot_jax.data.hf_tokenizer import from_hf_dir
  tok, _ = from_hf_dir(path)
  return config_with(fields, tok, base, overrides)


def config_with(fields: dict, tok, base: Config | None = None,
                overrides: Sequence[str] = ()) -> Config:
  """`base` (or the defaults) with a checkpoint's model `fields` (`model_fields`),
  the stop ids of its tokenizer `tok` (None: none), then `overrides`."""
  from mtcot_jax.config import parse_override
  sections = (base or Config()).to_dict()
  if tok is not None:   # the vocabulary grows by the thinking tokens; generate's stop ids
    fields["vocab_size"] = max(fields["vocab_size"], tok.vocab_size)
    sections["decode"].update(eos_id=tok.eos_id, think_end_id=tok.think_end_id)
  for text in overrides:
    section, key, value = parse_override(text)
    if section == "model" and key in fields:
      raise ConfigError(f"override {text!r}: model.{key} comes from the checkpoint "
                        f"({fields[key]!r}); accepted: overrides of dtype, param_dtype, "
                        "scan_layers, remat, attention and the other sections")
    sections[section][key] = value
  sections["model"].update(fields)
  return config_from_dict(sections)


def _weight_files(path: str) -> list[str]:
  """The checkpoint's safetensors files (one, or the shards of its index)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    return sorted(set((_read_json(index).get("weight_map") or {}).values()))  # hf_io checks it
  if os.path.exists(os.path.join(path, "model.safetensors")):
    return ["model.safetensors"]
  raise FileNotFoundError(f"{path} has no model.safetensors (or its index); accepted: "
                          "safetensors weights as save_pretrained writes them")


def _raw_tensor(path: str, name: str) -> tuple | None:
  """(dtype, shape, bytes) of one stored tensor, or None; read without JAX (this
  runs before the distributed runtime starts) and whatever the dtype (bf16)."""
  for file in _weight_files(path):
    with open(os.path.join(path, file), "rb") as f:
      n = struct.unpack("<Q", f.read(8))[0]
      info = json.loads(f.read(n)).get(name)
      if info is not None:
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        return info["dtype"], info["shape"], f.read(end - start)
  return None


def _unties(path: str) -> bool:
  """Whether a checkpoint with tie_word_embeddings stores an lm_head.weight unlike
  its embedding: transformers then leaves the two untied, and so does the import."""
  head = _raw_tensor(path, "lm_head.weight")
  return head is not None and head != _raw_tensor(path, "model.embed_tokens.weight")


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One Hugging Face tensor of the main model and the parameter it is: `path` in
  the plain layout's main tree (None: the o_proj bias, zeros), `shape` the
  file's, `ours` the parameter's. `transposed`: ours is the file's transpose,
  reshaped (an (out, in) linear weight); else the same values reshaped."""
  name: str
  path: tuple[str, ...] | None
  shape: tuple[int, ...]
  ours: tuple[int, ...]
  transposed: bool


def tensor_table(cfg: Config, vocab: int | None = None) -> list[Tensor]:
  """The main model's tensors in transformers' state-dict order (embedding,
  layers, final norm, lm_head). `vocab`: the embedding rows the file holds
  (default the model's; an import grows them to model.vocab_size)."""
  m = cfg.model
  H, K, Dh, D, F, V = m.num_heads, m.num_kv_heads, m.dh, m.d_model, m.mlp_dim, m.vocab_size
  V0 = V if vocab is None else vocab
  out = [Tensor("model.embed_tokens.weight", ("embed",), (V0, D), (V, D), False)]
  for i in range(m.num_layers):
    p, layer = f"model.layers.{i}.", f"layer_{i}"
    a = p + "self_attn."
    out += [Tensor(a + "q_proj.weight", (layer, "attn", "q"), (H * Dh, D), (D, H, Dh), True),
            Tensor(a + "k_proj.weight", (layer, "attn", "k"), (K * Dh, D), (D, K, Dh), True),
            Tensor(a + "v_proj.weight", (layer, "attn", "v"), (K * Dh, D), (D, K, Dh), True),
            Tensor(a + "o_proj.weight", (layer, "attn", "o"), (D, H * Dh), (H, Dh, D), True)]
    if m.qkv_bias:
      out += [Tensor(a + "q_proj.bias", (layer, "attn", "q_bias"), (H * Dh,), (H, Dh), False),
              Tensor(a + "k_proj.bias", (layer, "attn", "k_bias"), (K * Dh,), (K, Dh), False),
              Tensor(a + "v_proj.bias", (layer, "attn", "v_bias"), (K * Dh,), (K, Dh), False),
              Tensor(a + "o_proj.bias", None, (D,), (D,), False)]
    out += [Tensor(p + "mlp.gate_proj.weight", (layer, "mlp", "gate"), (F, D), (D, F), True),
            Tensor(p + "mlp.up_proj.weight", (layer, "mlp", "up"), (F, D), (D, F), True),
            Tensor(p + "mlp.down_proj.weight", (layer, "mlp", "down"), (D, F), (F, D), True),
            Tensor(p + "input_layernorm.weight", (layer, "attn_norm", "scale"), (D,), (D,), False),
            Tensor(p + "post_attention_layernorm.weight", (layer, "mlp_norm", "scale"), (D,),
                   (D,), False)]
  out.append(Tensor("model.norm.weight", ("final_norm", "scale"), (D,), (D,), False))
  if not m.tie_embeddings:
    out.append(Tensor("lm_head.weight", ("unembed",), (V0, D), (D, V), True))
  return out


def to_hf(t: Tensor, x) -> np.ndarray:
  """Our parameter `x` (shape t.ours) as the file's tensor (shape t.shape)."""
  x = np.asarray(x)
  return np.ascontiguousarray(x.reshape(t.shape[::-1]).T if t.transposed else x.reshape(t.shape))


def checked_table(cfg: Config, names, shape_of) -> list[Tensor]:
  """tensor_table for a checkpoint whose tensors are `names` (shapes by
  `shape_of(name)`; an o_proj bias where it has one), read from the headers
  alone: a missing tensor, a shape
  unlike config.json's or a tensor the model does not use is an error here,
  before any is read."""
  names = set(names)
  embed = "model.embed_tokens.weight"
  table = [t for t in tensor_table(cfg, tuple(shape_of(embed))[0] if embed in names else None)
           if t.path is not None or t.name in names]   # an o_proj bias: Llama's, not Qwen2's
  for t in table:
    if t.name not in names:
      raise ValueError(f"the checkpoint has no tensor {t.name!r}; it does not match its "
                       "config.json")
    if tuple(shape_of(t.name)) != t.shape:
      raise ValueError(f"tensor {t.name} has shape {tuple(shape_of(t.name))}; config.json "
                       f"implies {t.shape}")
  left = sorted(k for k in names - {t.name for t in table} - {"lm_head.weight"}  # tied may keep it
                if not k.endswith("rotary_emb.inv_freq"))   # old files; transformers skips them
  if left:
    raise ValueError(f"the checkpoint has tensors this model does not use: {left[:5]}"
                     f"{' ...' if len(left) > 5 else ''}")
  return table


def hf_leaves(cfg: Config, weights, new_ids: Sequence[int] = ()):
  """(path, float32 numpy parameter) of the main model's every leaf (plain layout),
  one at a time from `weights`: a mapping from Hugging Face names to arrays (a
  dict, or hf_io.Checkpoint, which reads each tensor from its file when asked and
  has `shape(name)` from the headers). Rows past the checkpoint's vocabulary (up
  to cfg.model.vocab_size) and those of `new_ids` (tokens appended to the
  tokenizer, which in a padded vocabulary take unused rows) are the mean of the
  rows below them."""
  m = cfg.model
  shape_of = getattr(weights, "shape", lambda name: np.shape(weights[name]))
  for t in checked_table(cfg, weights.keys(), shape_of):
    w = np.asarray(weights[t.name], np.float32)
    if t.path is None:
      if np.any(w != 0):
        raise ValueError(f"{t.name} is not zero: an output-projection bias is not supported; "
                         "accepted: Llama attention_bias checkpoints whose o_proj bias is "
                         "zero, or Qwen2's q/k/v biases")
      continue
    if t.path in (("embed",), ("unembed",)):   # (V0, D) -> (V, D), new rows the mean
      V0 = w.shape[0]
      mean_1xD = w[:min([V0, *new_ids])].mean(0, keepdims=True)
      w = np.concatenate([w, np.repeat(mean_1xD, max(0, m.vocab_size - V0), 0)])
      w[[i for i in new_ids if i < V0]] = mean_1xD
    yield t.path, (w.T if t.transposed else w).reshape(t.ours)


def main_params_from_hf(cfg: Config, weights, new_ids: Sequence[int] = ()) -> dict:
  """The main model's parameters (plain layout, float32 numpy) from Hugging Face
  tensors (`hf_leaves`, gathered into one tree)."""
  main: dict = {}
  for path, x in hf_leaves(cfg, weights, new_ids):
    node = main
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = x
  return main


def main_params_to_hf(cfg: Config, main: dict) -> dict[str, np.ndarray]:
  """The inverse of `main_params_from_hf` (Llama names, float32; an o_proj bias
  of zeros when the model has q/k/v biases)."""
  out = {}
  for t in tensor_table(cfg):
    x = np.zeros(t.ours, np.float32) if t.path is None else _leaf(main, t.path)
    out[t.name] = np.asarray(to_hf(t, x), np.float32)
  return out


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def hf_config(cfg: Config, tokenizer=None, dtype: str = "float32") -> dict:
  """config.json of the exported `LlamaForCausalLM`, its weights stored in `dtype`.
  max_position_embeddings is the imported checkpoint's (model.max_position_embeddings)
  or, for a model trained here, max(data.seq_len, 2048)."""
  m = cfg.model
  rope = {"rope_theta": m.rope_theta, "rope_type": "default"}
  if m.rope_scaling:
    s = dict(m.rope_scaling)
    rope = {"rope_theta": m.rope_theta, "rope_type": s.pop("type"), **s}
  out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "vocab_size": m.vocab_size, "hidden_size": m.d_model,
         "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers,
         "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
         "head_dim": m.dh, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
         "rope_theta": m.rope_theta, "rope_parameters": rope,
         "rope_scaling": None if not m.rope_scaling else {k: v for k, v in rope.items()
                                                          if k != "rope_theta"},
         "tie_word_embeddings": m.tie_embeddings, "attention_bias": m.qkv_bias,
         "mlp_bias": False,
         "max_position_embeddings": m.max_position_embeddings or max(cfg.data.seq_len, 2048),
         "torch_dtype": dtype, "dtype": dtype}
  if tokenizer is not None:
    out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
               pad_token_id=tokenizer.pad_id)
  return out
