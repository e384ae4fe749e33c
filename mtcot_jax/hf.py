"""Hugging Face checkpoints in and out: `LlamaForCausalLM` and `Qwen2ForCausalLM`.

    hf = mt.load_hf("path/to/hf_dir", ["head.k=5"], key=jax.random.key(0))
    hf.cfg, hf.params, hf.tokenizer       # the main model from the checkpoint, a fresh head
    mt.save_hf(run, "out_dir")            # config.json + model.safetensors (+ head, tokenizer)

Import reads `config.json` and the safetensors weights (one file or an index of
shards) with the `safetensors` package; no torch. The main model maps one to
one: both are pre-RMSNorm decoders with rotate-half RoPE, grouped-query
attention and SwiGLU. A Hugging Face linear weight is (out, in) and is applied
as x @ W.T; ours are (in, ...) einsum kernels, so q_proj (H*Dh, D) becomes q
(D, H, Dh) = W.T reshaped, o_proj (D, H*Dh) becomes o (H, Dh, D). Qwen2's q/k/v
biases become `model.qkv_bias`; RoPE's theta and `linear`/`llama3` scaling,
RMSNorm's eps, tied or untied embeddings and the head dimension come from the
config (a tied checkpoint that stores an lm_head.weight unlike its embedding is
untied, as transformers does). Where the tokenizer lacks `<think>`/`</think>`
they are appended (`data/hf_tokenizer.py`) and the embedding (and unembedding)
grow by rows set to the mean of the existing ones (in a padded vocabulary they
take unused rows, set the same way), so the new tokens start as an average token.

Export writes a `LlamaForCausalLM` directory that `transformers` loads: a model
with q/k/v biases (imported from Qwen2) is a Llama with `attention_bias` and an
o_proj bias of zeros. The head goes beside it as `mtcot_head.safetensors` (its
parameters by their path, `/`-joined) and `mtcot_head.json` (the head config,
what it reads and how to load it back), with the run's tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtcot_jax.config import Config, ConfigError, config_from_dict, load_config

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
HEAD_WEIGHTS, HEAD_CONFIG = "mtcot_head.safetensors", "mtcot_head.json"


@dataclasses.dataclass
class HFModel:
  """What `load_hf` returns: like a loaded run (`cfg`, `params`, `tokenizer`)."""
  cfg: Config
  params: Any
  tokenizer: Any            # data.hf_tokenizer.HFTokenizer, or None without tokenizer files
  added_tokens: tuple[str, ...]   # pieces appended to the vocabulary (`<think>`, `</think>`)
  path: str


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
  (compute/param dtypes, scan_layers and remat kept from `base`) and `overrides`
  applied after. The vocabulary grows by the thinking tokens the tokenizer lacks,
  and decode.eos_id / decode.think_end_id are the tokenizer's."""
  from mtcot_jax.config import parse_override
  hf = read_config(path)
  fields = model_fields(hf)
  if fields["tie_embeddings"] and _unties(path):
    fields["tie_embeddings"] = False
  from mtcot_jax.data.hf_tokenizer import from_hf_dir
  tok, _ = from_hf_dir(path)
  sections = (base or Config()).to_dict()
  if tok is not None:   # the vocabulary grows by the thinking tokens; generate's stop ids
    fields["vocab_size"] = max(fields["vocab_size"], tok.vocab_size)
    sections["decode"].update(eos_id=tok.eos_id, think_end_id=tok.think_end_id)
  for text in overrides:
    section, key, value = parse_override(text)
    if section == "model" and key in fields:
      raise ConfigError(f"override {text!r}: model.{key} comes from the checkpoint "
                        f"({fields[key]!r}); accepted: overrides of dtype, param_dtype, "
                        "scan_layers, remat and the other sections")
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


def _fresh_head(cfg: Config, key) -> Any:
  from mtcot_jax.model import api
  return jax.tree.map(np.asarray, api.init_head_params(cfg, key))


def load_hf(path: str, overrides: Sequence[str] = (), key: jax.Array | None = None,
            base: Config | None = None) -> HFModel:
  """A Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` directory as a run-like
  object: `cfg` (the checkpoint's model section on `base` or the defaults, then
  `overrides`, e.g. "head.k=5"), `params` {"main": from the checkpoint, "head":
  initialised from `key` (default key 0)} and the tokenizer (None if the
  directory has none) with the thinking tokens appended where missing."""
  from mtcot_jax.data.hf_tokenizer import from_hf_dir
  from mtcot_jax.model import api
  from mtcot_jax.tokens import THINK
  cfg = config_for(path, base, overrides)
  tok, added = from_hf_dir(path)
  plain = cfg.replace(model={"scan_layers": False})
  new_ids = [tok.think_id if piece == THINK else tok.think_end_id for piece in added]
  main = main_params_from_hf(plain, read_weights(path), new_ids)
  pdt = jnp.dtype(cfg.model.param_dtype)
  params = {"main": jax.tree.map(lambda x: jnp.asarray(x, pdt), main),
            "head": _fresh_head(cfg, jax.random.key(0) if key is None else key)}
  shapes = api.param_shapes(plain)
  if jax.tree.structure(shapes) != jax.tree.structure(params):
    raise ValueError("the imported parameter tree does not match the model's "
                     f"({jax.tree.structure(shapes)} vs {jax.tree.structure(params)})")
  params = jax.tree.map(lambda x: jnp.asarray(x), params)
  if cfg.model.scan_layers:
    params = api.to_scan_layout(params)
  return HFModel(cfg=cfg, params=params, tokenizer=tok, added_tokens=tuple(added), path=path)


def _flat(tree, prefix=()) -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out["/".join(prefix + (k,))] = np.ascontiguousarray(np.asarray(v, np.float32))
  return out


def save_hf(run, path: str) -> None:
  """Writes `run` (a loaded run, `load_hf`'s result, or anything with `cfg`,
  `params` and optionally `tokenizer`) to `path`: config.json and
  model.safetensors of a `LlamaForCausalLM`, the head as mtcot_head.safetensors +
  mtcot_head.json, and the tokenizer (tokenizer.json and tokenizer_config.json,
  or the sentencepiece tokenizer.model). The directory appears whole or not at
  all (written beside it, then renamed); an existing non-empty one is refused."""
  from safetensors.numpy import save_file
  from mtcot_jax.config import save_config
  from mtcot_jax.model import api
  cfg, params = run.cfg, jax.device_get(run.params)
  tok = getattr(run, "tokenizer", None)
  path = os.path.normpath(path)
  if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
    raise FileExistsError(f"{path} exists and is not an empty directory; accepted: a new "
                          "directory (save_hf never overwrites)")
  if "layers" in params["main"]:
    params = api.to_plain_layout(params)
  stage = os.path.join(os.path.dirname(path),
                       f".{os.path.basename(path)}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
  os.makedirs(stage)

  def write(name, fn):
    file = os.path.join(stage, name)
    fn(file)
    fd = os.open(file, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)

  def write_text(file, text, mode="w"):
    with open(file, mode) as f:
      f.write(text)

  def write_json(name, obj):
    write(name, lambda p: write_text(p, json.dumps(obj, indent=2) + "\n"))

  try:
    write("model.safetensors", lambda p: save_file(main_params_to_hf(cfg, params["main"]), p,
                                                   metadata={"format": "pt"}))
    write(HEAD_WEIGHTS, lambda p: save_file(_flat(params["head"]), p))
    write("mtcot_config.yaml", lambda p: save_config(cfg, p))
    write_json(HEAD_CONFIG, {
        "format": "mtcot_jax head", "head": cfg.to_dict()["head"],
        "reads": "the main model's residual stream at head.source_layers (-1: the last "
                 "layer's output before the final norm) and its embedding/unembedding",
        "weights": HEAD_WEIGHTS, "full_config": "mtcot_config.yaml",
        "load": "mtcot_jax.hf.load_head(path)"})
    write_json("config.json", hf_config(cfg, tok))
    if tok is not None:
      _save_tokenizer(tok, write, write_json, write_text)
    # rename(2) replaces an empty directory and fails on a non-empty one (one
    # made meanwhile), so nothing at `path` is ever overwritten.
    os.replace(stage, path)
  except BaseException:
    shutil.rmtree(stage, ignore_errors=True)
    raise


def _save_tokenizer(tok, write, write_json, write_text) -> None:
  names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
  if tok.unk_id >= 0:
    names["unk_token"] = tok.unk_id
  tcfg = {k: tok.id_to_piece(i) for k, i in names.items()}
  if getattr(tok, "backend", "sentencepiece") == "tokenizers":
    write("tokenizer.json", lambda p: write_text(p, tok._model))
    write_json("tokenizer_config.json", {**tcfg, "tokenizer_class": "PreTrainedTokenizerFast"})
  else:
    write("tokenizer.model", lambda p: write_text(
        p, tok._model if hasattr(tok, "backend") else tok.serialize(), "wb"))
    write_json("tokenizer_config.json", {**tcfg, "tokenizer_class": "LlamaTokenizer"})


def load_head(path: str) -> tuple[Config, dict]:
  """(cfg, head params) from a directory `save_hf` wrote."""
  from safetensors.numpy import load_file
  cfg = load_config(os.path.join(path, "mtcot_config.yaml"))
  flat = load_file(os.path.join(path, HEAD_WEIGHTS))
  head: dict = {}
  for name, value in flat.items():
    node = head
    *parents, leaf = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jnp.asarray(value)
  return cfg, head
