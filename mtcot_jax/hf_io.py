"""Hugging Face safetensors weights a tensor at a time, for models larger than a
host's memory: read straight to each parameter's sharding, written in shards.

Reading (`Checkpoint`, `place_main`): the checkpoint's index
(model.safetensors.index.json) or its single model.safetensors is opened by its
headers alone; each tensor is read when asked (`safetensors.safe_open`, numpy,
bfloat16 through ml_dtypes), mapped, cast on the host to model.param_dtype and
put on its parameter's NamedSharding (`jax.make_array_from_callback`: each
device takes its slice), then dropped. Under model.scan_layers each layer's
tensor is written into its stacked parameter on the devices (a donated update),
so the host holds one tensor at a time, never the model. With several processes
every process reads the files (a shared filesystem, as transformers needs) and
puts the slices of its own devices.

Writing (`write_main`): the shards are planned from the shapes alone with
huggingface_hub's splitter (transformers' rule: tensors in order, a new shard
when the next would pass max_shard_size, a larger tensor alone), then each
shard's tensors are gathered one at a time (`host_copy`), converted to the
export dtype and written; the host holds one shard at most. Every process takes
part in the gathers (a sharded array spans processes); process 0 alone writes.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mtcot_jax.config import Config
from mtcot_jax.hf_format import hf_leaves, tensor_table, to_hf

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def shard_bytes(max_shard_size) -> int:
  """max_shard_size as bytes: an int > 0, or a string like "5GB", "500MB" (units
  TB, GB, MB, KB, powers of 10, as huggingface_hub and transformers read them)."""
  from huggingface_hub.serialization._base import parse_size_to_int
  accepted = ('accepted: an int number of bytes > 0 or a string like "5GB", "500MB", '
              '"100KB" (units TB, GB, MB, KB)')
  if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, str)):
    raise ValueError(f"max_shard_size={max_shard_size!r} is not accepted; {accepted}")
  try:
    size = (max_shard_size if isinstance(max_shard_size, int)
            else parse_size_to_int(max_shard_size))
  except ValueError:
    size = 0
  if size <= 0:
    raise ValueError(f"max_shard_size={max_shard_size!r} is not accepted; {accepted}")
  return size


def export_dtype(cfg: Config, dtype: str | None) -> str:
  """The dtype the export stores: `dtype`, or model.param_dtype when None."""
  name = cfg.model.param_dtype if dtype is None else dtype
  if name not in EXPORT_DTYPES:
    raise ValueError(f"dtype={dtype!r} is not accepted; accepted: None (model.param_dtype) "
                     f"or one of {EXPORT_DTYPES}")
  return name


class Checkpoint(Mapping):
  """A checkpoint directory's tensors by name, read from their files when asked
  (`ckpt[name]`: a numpy array in the stored dtype); `shape(name)` from the
  headers. The files are those of model.safetensors.index.json, or
  model.safetensors."""

  def __init__(self, path: str):
    from safetensors import safe_open
    self.path = path
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        listed = json.load(f).get("weight_map")
      if not isinstance(listed, dict) or not listed:
        raise ValueError(f"{index} has no weight_map; accepted: an index as save_pretrained "
                         "writes it ({'metadata': ..., 'weight_map': {tensor: file}})")
    elif os.path.exists(os.path.join(path, SINGLE)):
      listed = None
    else:
      raise FileNotFoundError(f"{path} has no {SINGLE} (or its index); accepted: safetensors "
                              "weights as save_pretrained writes them")
    self._file, self._shape = {}, {}
    for name in sorted(set(listed.values())) if listed else [SINGLE]:
      file = os.path.join(path, name)
      if not os.path.exists(file):
        raise FileNotFoundError(f"{file}, listed in {INDEX}, does not exist")
      with safe_open(file, framework="numpy") as f:
        for key in f.keys():
          self._file[key] = file
          self._shape[key] = tuple(f.get_slice(key).get_shape())
    missing = sorted(set(listed or ()) - set(self._file))
    if missing:
      raise ValueError(f"{INDEX} lists tensors its files lack: {missing[:5]}")

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shape[name]

  def __getitem__(self, name: str) -> np.ndarray:
    from safetensors import safe_open
    with safe_open(self._file[name], framework="numpy") as f:
      return f.get_tensor(name)

  def __iter__(self):
    return iter(self._file)

  def __len__(self) -> int:
    return len(self._file)


def _to_devices(x: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jax.device_put(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _zeros(shape, dtype, sharding) -> jax.Array:
  """Zeros on the devices from the host's (calloc'd pages: nothing compiled)."""
  zeros = np.zeros(shape, dtype)
  if sharding is None:
    return jax.device_put(zeros)
  return jax.make_array_from_callback(shape, sharding, lambda index: zeros[index])


@functools.lru_cache(maxsize=None)
def _set_layer(sharding):
  """stacked.at[i].set(layer), `stacked` donated: no second copy on the devices."""
  fn = lambda s, x, i: jax.lax.dynamic_update_index_in_dim(s, x, i, 0)  # noqa: E731
  if sharding is None:
    return jax.jit(fn, donate_argnums=0)
  return jax.jit(fn, donate_argnums=0, out_shardings=sharding)


def place_main(cfg: Config, weights, new_ids=(), mesh=None) -> dict:
  """The main model's parameters from Hugging Face `weights` (a `Checkpoint`, or
  a dict of arrays), in model.param_dtype, each leaf on its sharding with a
  `mesh` (the config's rules), on the default device without; the layout is
  cfg's (stacked under model.scan_layers). One tensor is on the host at a time."""
  from mtcot_jax.model import api
  pdt = np.dtype(jnp.dtype(cfg.model.param_dtype))
  shardings = None if mesh is None else api.param_shardings(cfg, mesh)["main"]
  plain = cfg.replace(model={"scan_layers": False})
  L = cfg.model.num_layers
  main: dict = {}
  for path, x in hf_leaves(plain, weights, new_ids):
    x = np.asarray(x, pdt)
    layer = None
    if cfg.model.scan_layers and path[0].startswith("layer_"):
      layer, path = int(path[0][len("layer_"):]), ("layers", *path[1:])
    node = main
    for key in path[:-1]:
      node = node.setdefault(key, {})
    sharding = None if shardings is None else _leaf(shardings, path)
    if layer is None:
      node[path[-1]] = _to_devices(x, sharding)
      continue
    if path[-1] not in node:
      node[path[-1]] = _zeros((L, *x.shape), pdt, sharding)
    one = None if sharding is None else NamedSharding(
        sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    node[path[-1]] = _set_layer(sharding)(node[path[-1]], _to_devices(x, one), layer)
  return main


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def host_copy(x) -> np.ndarray:
  """The whole of array `x` on this host. Every process must call it (in the same
  order) when `x` spans processes: the gather is collective."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


@jax.jit
def _layer_of(stacked, i):
  return jax.lax.dynamic_index_in_dim(stacked, i, 0, keepdims=False)


def _hf_tensor(cfg: Config, main: dict, t, dtype: np.dtype) -> np.ndarray:
  """Tensor `t` of the table from `main` (either layout), gathered, in `dtype`."""
  if t.path is None:
    return np.zeros(t.shape, dtype)
  if "layers" in main and t.path[0].startswith("layer_"):   # scan layout: layer i's slice
    x = _layer_of(_leaf(main["layers"], t.path[1:]), int(t.path[0][len("layer_"):]))
  else:
    x = _leaf(main, t.path)
  return np.ascontiguousarray(to_hf(t, host_copy(x)).astype(dtype))


def write_main(cfg: Config, main: dict, dtype: str, max_shard_size,
               write: Callable[[str, Callable[[str], None]], None] | None) -> list[str]:
  """Writes the main model as transformers does: one model.safetensors when it fits
  `max_shard_size`, else model-0000i-of-0000n.safetensors and
  model.safetensors.index.json ({"metadata": {"total_parameters", "total_size"},
  "weight_map"}). `write(name, fn)` makes a file (fn(path) fills it); None on
  the processes that only gather. Returns the files' names."""
  from huggingface_hub import split_state_dict_into_shards_factory
  from safetensors.numpy import save_file
  limit = shard_bytes(max_shard_size)
  np_dtype = np.dtype(jnp.dtype(dtype))
  table = {t.name: t for t in tensor_table(cfg)}
  split = split_state_dict_into_shards_factory(
      table, get_storage_size=lambda t: int(np.prod(t.shape)) * np_dtype.itemsize,
      filename_pattern="model{suffix}.safetensors", max_shard_size=limit)
  for file, names in split.filename_to_tensors.items():
    tensors = {name: _hf_tensor(cfg, main, table[name], np_dtype) for name in names}
    if write is not None:
      write(file, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    del tensors
  files = list(split.filename_to_tensors)
  if split.is_sharded and write is not None:
    count = sum(int(np.prod(t.shape)) for t in table.values())
    index = {"metadata": {"total_parameters": count, **split.metadata},
             "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    write(INDEX, lambda p: _write_text(p, json.dumps(index, indent=2) + "\n"))
  return files + ([INDEX] if split.is_sharded else [])


def _write_text(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)
