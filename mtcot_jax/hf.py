"""Hugging Face checkpoints in and out: `LlamaForCausalLM` and `Qwen2ForCausalLM`.

    hf = mt.load_hf("path/to/hf_dir", ["head.k=5"], key=jax.random.key(0))
    hf.cfg, hf.params, hf.tokenizer       # the main model from the checkpoint, a fresh head
    mt.save_hf(run, "out_dir")            # config.json + model.safetensors (+ head, tokenizer)

Import reads `config.json` and the safetensors weights (one file or an index of
shards); export writes a `LlamaForCausalLM` directory that `transformers` loads.
How the two formats map onto each other (names, layouts, RoPE, biases, the
thinking tokens' rows) is `hf_format.py`'s; its functions are importable from
here too. The head goes beside the model as `mtcot_head.safetensors` (its
parameters by their path, `/`-joined) and `mtcot_head.json` (the head config,
what it reads and how to load it back), with the run's tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtcot_jax.config import Config, load_config
# The format's functions, also read as mtcot_jax.hf.* (save_hf looks up hf_config here).
from mtcot_jax.hf_format import (ARCHITECTURES, _rope, config_for, config_with,  # noqa: F401
                                 hf_config, main_params_from_hf, main_params_to_hf, model_fields,
                                 read_config, read_weights)

HEAD_WEIGHTS, HEAD_CONFIG = "mtcot_head.safetensors", "mtcot_head.json"


@dataclasses.dataclass
class HFModel:
  """What `load_hf` returns: like a loaded run (`cfg`, `params`, `tokenizer`)."""
  cfg: Config
  params: Any
  tokenizer: Any            # data.hf_tokenizer.HFTokenizer, or None without tokenizer files
  added_tokens: tuple[str, ...]   # pieces appended to the vocabulary (`<think>`, `</think>`)
  path: str
  chat_template: str | None = None   # the model's Jinja chat template, where it has one


def load_hf(path: str, overrides: Sequence[str] = (), key: jax.Array | None = None,
            base: Config | None = None, mesh=None) -> HFModel:
  """A Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` directory as a run-like
  object: `cfg` (the checkpoint's model section on `base` or the defaults, then
  `overrides`, e.g. "head.k=5"), `params` {"main": from the checkpoint, "head":
  initialised from `key` (default key 0)} and the tokenizer (None if the
  directory has none) with the thinking tokens appended where missing. With a
  `mesh` the parameters land on their shardings (the config's rules)."""
  from mtcot_jax.data.hf_tokenizer import from_hf_dir
  cfg = config_for(path, base, overrides)
  tok, added = from_hf_dir(path)
  template = _read_json_key(os.path.join(path, "tokenizer_config.json"), "chat_template")
  return _model(cfg, read_weights(path), tok, added, key, mesh, path, template)


def gguf_config(path: str, base: Config | None = None, overrides: Sequence[str] = ()):
  """(cfg, tokenizer, added pieces, reader, config.json dict) of a GGUF file."""
  from mtcot_jax import gguf_format
  from mtcot_jax.data.hf_tokenizer import from_tokenizer
  reader = gguf_format.read(path)
  meta = gguf_format.fields(reader)
  hf = gguf_format.hf_config(meta, {t.name for t in reader.tensors})
  tok, added = from_tokenizer(*gguf_format.tokenizer(meta), path=path)
  return config_with(model_fields(hf), tok, base, overrides), tok, added, reader, hf, meta


def load_gguf(path: str, overrides: Sequence[str] = (), key: jax.Array | None = None,
              base: Config | None = None, mesh=None) -> HFModel:
  """A llama.cpp GGUF file (Llama or Qwen2; any type `gguf` dequantises) as
  `load_hf` returns a directory: the config, tokenizer and chat template from its
  metadata, the main model's weights dequantised (llama.cpp's query/key row
  order undone: `gguf_format`), a fresh head. The weights reach the devices in
  model.param_dtype, each on its sharding when a `mesh` is given."""
  from mtcot_jax import gguf_format
  cfg, tok, added, reader, hf, meta = gguf_config(path, base, overrides)
  return _model(cfg, gguf_format.hf_tensors(reader, hf), tok, added, key, mesh, path,
                gguf_format.chat_template(meta))


def _read_json_key(file: str, key: str):
  if not os.path.exists(file):
    return None
  with open(file) as f:
    return json.load(f).get(key)


def _model(cfg: Config, weights: dict, tok, added, key, mesh, path, template) -> HFModel:
  """The HFModel of Hugging Face-named float32 `weights`: mapped on the host, cast
  to the parameter dtype there, then put on the devices (sharded with a mesh)."""
  from mtcot_jax.model import api
  from mtcot_jax.tokens import THINK
  plain = cfg.replace(model={"scan_layers": False})
  new_ids = [tok.think_id if piece == THINK else tok.think_end_id for piece in added]
  main = main_params_from_hf(plain, weights, new_ids)
  weights.clear()                              # the float32 copies go as soon as mapped
  pdt = np.dtype(jnp.dtype(cfg.model.param_dtype))
  main = jax.tree.map(lambda x: np.asarray(x, pdt), main)
  shapes = api.param_shapes(plain)
  if jax.tree.structure(shapes["main"]) != jax.tree.structure(main):
    raise ValueError("the imported parameter tree does not match the model's "
                     f"({jax.tree.structure(shapes['main'])} vs {jax.tree.structure(main)})")
  if cfg.model.scan_layers:
    main = dict(main)
    names = [f"layer_{i}" for i in range(cfg.model.num_layers)]
    layers = [main.pop(n) for n in names]
    main["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  shardings = None if mesh is None else api.param_shardings(cfg, mesh)
  main = jax.device_put(main, None if shardings is None else shardings["main"])
  head = api.init_head_params(cfg, jax.random.key(0) if key is None else key, mesh)
  params = {"main": main, "head": head}
  return HFModel(cfg=cfg, params=params, tokenizer=tok, added_tokens=tuple(added), path=path,
                 chat_template=template)


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
