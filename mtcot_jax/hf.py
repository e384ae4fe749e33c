"""Hugging Face checkpoints in and out: `LlamaForCausalLM` and `Qwen2ForCausalLM`.

    hf = mt.load_hf("path/to/hf_dir", ["head.k=5"], key=jax.random.key(0))
    hf.cfg, hf.params, hf.tokenizer       # the main model from the checkpoint, a fresh head
    mt.save_hf(run, "out_dir", dtype="bfloat16", max_shard_size="5GB")

Import reads `config.json` and the safetensors weights (one file or an index of
shards) a tensor at a time, each straight to its sharding in model.param_dtype;
export writes a `LlamaForCausalLM` directory that `transformers` loads, in
shards with an index when the model passes max_shard_size, gathering a tensor
at a time (`hf_io.py`: how, and how several processes share the work).
How the two formats map onto each other (names, layouts, RoPE, biases, the
thinking tokens' rows) is `hf_format.py`'s; its functions are importable from
here too. The head goes beside the model as `mtcot_head.safetensors` (its
parameters by their path, `/`-joined, float32) and `mtcot_head.json` (the head
config, what it reads and how to load it back), with the run's tokenizer files,
its chat template and generation_config.json (its stop ids and sampling).
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
from safetensors.numpy import save_file

from mtcot_jax import hf_io
from mtcot_jax.config import Config, load_config
# The format's functions, also read as mtcot_jax.hf.* (save_hf looks up hf_config here).
from mtcot_jax.hf_format import (ARCHITECTURES, _rope, config_for, config_with,  # noqa: F401
                                 hf_config, main_params_from_hf, main_params_to_hf, model_fields,
                                 read_config)

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
  directory has none) with the thinking tokens appended where missing. The
  weights (model.safetensors, or the shards its index lists) are read one
  tensor at a time, each cast to model.param_dtype and put on its sharding (the
  config's rules) with a `mesh`, on the default device without."""
  from mtcot_jax.data.hf_tokenizer import from_hf_dir
  cfg = config_for(path, base, overrides)
  tok, added = from_hf_dir(path)
  return _model(cfg, hf_io.Checkpoint(path), tok, added, key, mesh, path, _chat_template(path))


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


def _chat_template(path: str) -> str | None:
  """The directory's chat template: chat_template.jinja (transformers 5 writes
  it there, and reads it first) or tokenizer_config.json's chat_template."""
  jinja, tcfg = os.path.join(path, "chat_template.jinja"), os.path.join(path,
                                                                        "tokenizer_config.json")
  if os.path.exists(jinja):
    with open(jinja) as f:
      return f.read()
  if not os.path.exists(tcfg):
    return None
  with open(tcfg) as f:
    return json.load(f).get("chat_template")


def _model(cfg: Config, weights, tok, added, key, mesh, path, template) -> HFModel:
  """The HFModel of Hugging Face-named `weights` (hf_io.Checkpoint, or a dict):
  each tensor mapped and cast on the host, then put on its device(s)."""
  from mtcot_jax.model import api
  from mtcot_jax.tokens import THINK
  new_ids = [tok.think_id if piece == THINK else tok.think_end_id for piece in added]
  main = hf_io.place_main(cfg, weights, new_ids, mesh)
  want = jax.tree.structure(api.param_shapes(cfg)["main"])
  if want != jax.tree.structure(main):
    raise ValueError(f"the imported parameter tree does not match the model's "
                     f"({want} vs {jax.tree.structure(main)})")
  head = api.init_head_params(cfg, jax.random.key(0) if key is None else key, mesh)
  params = {"main": main, "head": head}
  return HFModel(cfg=cfg, params=params, tokenizer=tok, added_tokens=tuple(added), path=path,
                 chat_template=template)


def _flat(tree, prefix=()) -> dict[str, np.ndarray]:
  """The head's leaves by their `/`-joined path, float32, gathered one at a time."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out["/".join(prefix + (k,))] = np.ascontiguousarray(hf_io.host_copy(v), np.float32)
  return out


class _Stage:
  """The directory an export fills beside `path` and renames onto it (process 0;
  elsewhere nothing is written). With several processes a failed write is kept
  and raised at the end, so that this process still takes its part in the
  gathers the others are waiting in."""

  def __init__(self, path: str):
    self.path, self.error = path, None
    self.writer = jax.process_index() == 0
    self.dir = os.path.join(os.path.dirname(path),
                            f".{os.path.basename(path)}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    if self.writer:
      os.makedirs(self.dir)

  def _run(self, fn) -> None:
    """fn() on process 0 (after no failure); with several processes a failure
    is kept for `finish`."""
    if not self.writer or self.error is not None:
      return
    try:
      fn()
    except Exception as e:
      if jax.process_count() == 1:
        raise
      self.error = e

  def write(self, name: str, fn) -> None:
    """fn(file) fills `name`, then it is synced to disk."""
    def make():
      file = os.path.join(self.dir, name)
      fn(file)
      fd = os.open(file, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    self._run(make)

  def text(self, name: str, text: str, mode: str = "w") -> None:
    def fill(file):
      with open(file, mode) as f:
        f.write(text)
    self.write(name, fill)

  def json(self, name: str, obj) -> None:
    self.text(name, json.dumps(obj, indent=2) + "\n")

  def finish(self) -> None:
    """Renames the directory onto `path`, or raises the first failure everywhere."""
    if self.writer:
      # rename(2) replaces an empty directory and fails on a non-empty one (one
      # made meanwhile), so nothing at `path` is ever overwritten.
      self._run(lambda: os.replace(self.dir, self.path))
    if not _on_process_0(self.error is None):
      raise self.error or RuntimeError(f"save_hf: process 0 failed writing {self.path}")

  def discard(self) -> None:
    if self.writer:
      shutil.rmtree(self.dir, ignore_errors=True)


def _on_process_0(value: bool) -> bool:
  """Process 0's `value`, on every process (the value itself with one)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.array(value)))


def save_hf(run, path: str, *, dtype: str | None = None, max_shard_size: int | str = "5GB"):
  """Writes `run` (a loaded run, `load_hf`'s result, or anything with `cfg`,
  `params` and optionally `tokenizer` and `chat_template`) to `path`: a
  `LlamaForCausalLM` (config.json, generation_config.json, the weights in
  `dtype`: "float32", "bfloat16" or "float16", default model.param_dtype), the
  head (mtcot_head.safetensors, float32, + mtcot_head.json) and the tokenizer
  (tokenizer.json or tokenizer.model, tokenizer_config.json with the chat
  template). The weights are one model.safetensors when they fit
  `max_shard_size` (bytes, or "5GB", "500MB"), else shards with an index, as
  transformers writes them. Parameters are gathered one tensor at a time
  (sharded or not, either layout); with several processes every process calls
  save_hf (they all take part in the gathers) and process 0 writes. The
  directory appears whole or not at all (written beside it, then renamed); an
  existing non-empty one is refused."""
  from mtcot_jax.config import save_config
  cfg, params = run.cfg, run.params
  tok, template = getattr(run, "tokenizer", None), getattr(run, "chat_template", None)
  dtype = hf_io.export_dtype(cfg, dtype)
  hf_io.shard_bytes(max_shard_size)              # a bad size fails before anything is done
  path = os.path.normpath(path)
  taken = os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path))
  if _on_process_0(taken):
    raise FileExistsError(f"{path} exists and is not an empty directory; accepted: a new "
                          "directory (save_hf never overwrites)")
  stage = _Stage(path)
  try:
    hf_io.write_main(cfg, params["main"], dtype, max_shard_size,
                     stage.write if stage.writer else None)
    head = _flat(params["head"])
    stage.write(HEAD_WEIGHTS, lambda p: save_file(head, p))
    del head
    stage.write("mtcot_config.yaml", lambda p: save_config(cfg, p))
    stage.json(HEAD_CONFIG, {
        "format": "mtcot_jax head", "head": cfg.to_dict()["head"],
        "reads": "the main model's residual stream at head.source_layers (-1: the last "
                 "layer's output before the final norm) and its embedding/unembedding",
        "weights": HEAD_WEIGHTS, "full_config": "mtcot_config.yaml",
        "load": "mtcot_jax.hf.load_head(path)"})
    stage.json("config.json", hf_config(cfg, tok, dtype))
    stage.json("generation_config.json", generation_config(cfg, tok))
    if tok is not None:
      _save_tokenizer(tok, template, stage)
    stage.finish()
  except BaseException:
    stage.discard()
    raise


def generation_config(cfg: Config, tok=None) -> dict:
  """generation_config.json: the ids `generate` stops at (decode.eos_id, a list
  when it names several), the tokenizer's BOS and pad, and decode's sampling
  (greedy: do_sample false; else temperature, top_k (0: off) and top_p)."""
  from mtcot_jax import tokens
  d = cfg.decode
  eos = list(d.eos_id) if isinstance(d.eos_id, tuple) else (
      d.eos_id if d.eos_id >= 0 else tokens.EOS_ID)
  out: dict = {"eos_token_id": eos, "do_sample": d.temperature > 0}
  if tok is not None:
    out.update(bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
  if d.temperature > 0:
    out.update(temperature=d.temperature, top_k=d.top_k, top_p=d.top_p)
  return out


def _save_tokenizer(tok, template: str | None, stage: _Stage) -> None:
  names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
  if tok.unk_id >= 0:
    names["unk_token"] = tok.unk_id
  tcfg = {k: tok.id_to_piece(i) for k, i in names.items()}
  if template:
    tcfg["chat_template"] = template
  if getattr(tok, "backend", "sentencepiece") == "tokenizers":
    stage.text("tokenizer.json", tok._model)
    stage.json("tokenizer_config.json", {**tcfg, "tokenizer_class": "PreTrainedTokenizerFast"})
  else:
    stage.text("tokenizer.model", tok._model if hasattr(tok, "backend") else tok.serialize(),
               "wb")
    stage.json("tokenizer_config.json", {**tcfg, "tokenizer_class": "LlamaTokenizer"})


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
