"""The Hugging Face checkpoint format, both ways: a `LlamaForCausalLM` /
`Qwen2ForCausalLM` config.json to our model config (`config_for`) and back
(`hf_config`), its safetensors tensors to our parameter tree
(`main_params_from_hf`) and back (`main_params_to_hf`). `hf.py` reads and writes
the directories with these.

The weights are read with the `safetensors` package; no torch. The main model
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

import json
import os
import struct
from typing import Any, Sequence

import jax.numpy as jnp
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
    return sorted(set(_read_json(index)["weight_map"].values()))
  if os.path.exists(os.path.join(path, "model.safetensors")):
    return ["model.safetensors"]
  raise FileNotFoundError(f"{path} has no model.safetensors (or its index); accepted: "
                          "safetensors weights as save_pretrained writes them")


def read_weights(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint (model.safetensors, or the shards its
  model.safetensors.index.json lists) as float32 numpy arrays."""
  from safetensors import safe_open
  out = {}
  for name in _weight_files(path):
    with safe_open(os.path.join(path, name), framework="flax") as f:
      for key in f.keys():
        out[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
  return out


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


def main_params_from_hf(cfg: Config, weights: dict[str, np.ndarray],
                        new_ids: Sequence[int] = ()) -> dict:
  """The main model's parameters (plain layout, float32 numpy) from Hugging Face
  tensors. Rows past the checkpoint's vocabulary (up to cfg.model.vocab_size) and
  those of `new_ids` (tokens appended to the tokenizer, which in a padded
  vocabulary take unused rows) are the mean of the rows below them."""
  m = cfg.model
  H, K, Dh, D = m.num_heads, m.num_kv_heads, m.dh, m.d_model
  used = set()

  def get(name, shape):
    if name not in weights:
      raise ValueError(f"the checkpoint has no tensor {name!r}; it does not match its "
                       "config.json")
    w = weights[name]
    if w.shape != shape:
      raise ValueError(f"tensor {name} has shape {w.shape}; config.json implies {shape}")
    used.add(name)
    return w

  def grow(w_VxD):
    V0 = w_VxD.shape[0]
    mean_1xD = w_VxD[:min([V0, *new_ids])].mean(0, keepdims=True)
    out = np.concatenate([w_VxD, np.repeat(mean_1xD, max(0, m.vocab_size - V0), 0)])
    out[[i for i in new_ids if i < V0]] = mean_1xD
    return out

  V0 = weights["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in \
      weights else m.vocab_size
  main = {"embed": grow(get("model.embed_tokens.weight", (V0, D))),
          "final_norm": {"scale": get("model.norm.weight", (D,))}}
  if not m.tie_embeddings:
    main["unembed"] = grow(get("lm_head.weight", (V0, D))).T
  for i in range(m.num_layers):
    p = f"model.layers.{i}."
    a = p + "self_attn."
    attn = {"q": get(a + "q_proj.weight", (H * Dh, D)).T.reshape(D, H, Dh),
            "k": get(a + "k_proj.weight", (K * Dh, D)).T.reshape(D, K, Dh),
            "v": get(a + "v_proj.weight", (K * Dh, D)).T.reshape(D, K, Dh),
            "o": get(a + "o_proj.weight", (D, H * Dh)).T.reshape(H, Dh, D)}
    if m.qkv_bias:
      attn.update(q_bias=get(a + "q_proj.bias", (H * Dh,)).reshape(H, Dh),
                  k_bias=get(a + "k_proj.bias", (K * Dh,)).reshape(K, Dh),
                  v_bias=get(a + "v_proj.bias", (K * Dh,)).reshape(K, Dh))
    if a + "o_proj.bias" in weights and np.any(get(a + "o_proj.bias", (D,)) != 0):
      raise ValueError(f"{a}o_proj.bias is not zero: an output-projection bias is not "
                       "supported; accepted: Llama attention_bias checkpoints whose o_proj "
                       "bias is zero, or Qwen2's q/k/v biases")
    main[f"layer_{i}"] = {
        "attn": attn,
        "attn_norm": {"scale": get(p + "input_layernorm.weight", (D,))},
        "mlp": {"gate": get(p + "mlp.gate_proj.weight", (m.mlp_dim, D)).T,
                "up": get(p + "mlp.up_proj.weight", (m.mlp_dim, D)).T,
                "down": get(p + "mlp.down_proj.weight", (D, m.mlp_dim)).T},
        "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight", (D,))}}
  left = sorted(k for k in set(weights) - used - {"lm_head.weight"}   # a tied one may keep it
                if not k.endswith("rotary_emb.inv_freq"))   # old files; transformers skips them
  if left:
    raise ValueError(f"the checkpoint has tensors this model does not use: {left[:5]}"
                     f"{' ...' if len(left) > 5 else ''}")
  return main


def main_params_to_hf(cfg: Config, main: dict) -> dict[str, np.ndarray]:
  """The inverse of `main_params_from_hf` (Llama names; an o_proj bias of zeros
  when the model has q/k/v biases)."""
  m = cfg.model
  H, K, Dh, D = m.num_heads, m.num_kv_heads, m.dh, m.d_model
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
  out = {"model.embed_tokens.weight": f32(main["embed"]),
         "model.norm.weight": f32(main["final_norm"]["scale"])}
  if not m.tie_embeddings:
    out["lm_head.weight"] = f32(np.asarray(main["unembed"]).T)
  for i in range(m.num_layers):
    layer = main[f"layer_{i}"]
    attn = layer["attn"]
    p = f"model.layers.{i}."
    a = p + "self_attn."
    out[a + "q_proj.weight"] = f32(np.asarray(attn["q"]).reshape(D, H * Dh).T)
    out[a + "k_proj.weight"] = f32(np.asarray(attn["k"]).reshape(D, K * Dh).T)
    out[a + "v_proj.weight"] = f32(np.asarray(attn["v"]).reshape(D, K * Dh).T)
    out[a + "o_proj.weight"] = f32(np.asarray(attn["o"]).reshape(H * Dh, D).T)
    if m.qkv_bias:
      out[a + "q_proj.bias"] = f32(np.asarray(attn["q_bias"]).reshape(-1))
      out[a + "k_proj.bias"] = f32(np.asarray(attn["k_bias"]).reshape(-1))
      out[a + "v_proj.bias"] = f32(np.asarray(attn["v_bias"]).reshape(-1))
      out[a + "o_proj.bias"] = np.zeros((D,), np.float32)
    out[p + "input_layernorm.weight"] = f32(layer["attn_norm"]["scale"])
    out[p + "post_attention_layernorm.weight"] = f32(layer["mlp_norm"]["scale"])
    out[p + "mlp.gate_proj.weight"] = f32(np.asarray(layer["mlp"]["gate"]).T)
    out[p + "mlp.up_proj.weight"] = f32(np.asarray(layer["mlp"]["up"]).T)
    out[p + "mlp.down_proj.weight"] = f32(np.asarray(layer["mlp"]["down"]).T)
  return out


def hf_config(cfg: Config, tokenizer=None) -> dict:
  """config.json of the exported `LlamaForCausalLM`."""
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
         "mlp_bias": False, "max_position_embeddings": max(cfg.data.seq_len, 2048),
         "torch_dtype": "float32", "dtype": "float32"}
  if tokenizer is not None:
    out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
               pad_token_id=tokenizer.pad_id)
  return out
