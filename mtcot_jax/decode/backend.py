"""The machine-specific seam of decoding: the weights as the loops read them and
the function that runs a cached main pass. It picks the KV cache's layout for the
platform (`empty_cache`). The only module of the decoder that
knows about the native CPU kernel (`mtcot_jax/native`), which it builds and loads
only when the pass will run on a CPU; the model's own CPU variants (the one-token
attention split, the out_in layout) are in `model/cpu.py`.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mtcot_jax import sharding as shd
from mtcot_jax.config import Config
from mtcot_jax.model import api, cpu, kv_cache
from mtcot_jax.model.kv_cache import KVCache


@flax.struct.dataclass
class DecodeParams:
  """Parameters as the decode loops read them (`prepare_params`): matrices in
  decode.weights_dtype and the main blocks' in `layout` ("in_out" as stored, or
  "out_in": `model.cpu.to_out_in`). Pass to `generate` in place of the parameters
  to make this copy once for many calls."""
  params: dict
  layout: str = flax.struct.field(pytree_node=False, default="in_out")
  weights_dtype: str = flax.struct.field(pytree_node=False, default="float32")


@functools.lru_cache(maxsize=None)
def _prepare_fn(layout: str, weights_dtype: str, param_dtype: str, plain: bool):
  wdt = jnp.dtype(weights_dtype)

  @jax.jit
  def prepare(params):
    if wdt != jnp.dtype(param_dtype):   # norm scales and biases kept
      params = jax.tree.map(lambda w: w.astype(wdt) if w.ndim >= 2 else w, params)
    if plain and "layers" in params["main"]:   # the native kernel reads layer_{i}
      params = api.to_plain_layout(params)
    return cpu.to_out_in(params) if layout == "out_in" else params
  return prepare


def prepare_params(cfg: Config, params) -> DecodeParams:
  """The weights as the decode loops read them: decode.weights_dtype (every
  matrix cast; the layers still compute in model.dtype) and
  decode.weights_layout. A copy of the matrices where either differs from the
  stored parameters; `generate` makes it per call unless given the result.
  Sharded parameters stay sharded (by propagation). Given a `DecodeParams`,
  returns it if it was prepared for this config."""
  if isinstance(params, DecodeParams):
    if (params.weights_dtype, params.layout) != (cfg.decode.weights_dtype,
                                                 cfg.decode.weights_layout):
      raise ValueError(
          f"params were prepared for weights_dtype={params.weights_dtype}, layout="
          f"{params.layout}; the config asks decode.weights_dtype={cfg.decode.weights_dtype}, "
          f"decode.weights_layout={cfg.decode.weights_layout}. Accepted: prepare_params with "
          "this config, or the parameters themselves")
    return params
  layout, wdt = cfg.decode.weights_layout, cfg.decode.weights_dtype   # validated by Config
  if layout == "in_out" and jnp.dtype(wdt) == jnp.dtype(cfg.model.param_dtype):
    return DecodeParams(params, layout, wdt)
  plain = cfg.decode.cpu_kernel == "native"
  return DecodeParams(_prepare_fn(layout, wdt, cfg.model.param_dtype, plain)(params), layout, wdt)


def target_platform(mesh: Mesh | None) -> str:
  """The platform the decode loops compile for: the mesh's devices', else JAX's default."""
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def uses_native(cfg: Config, mesh: Mesh | None) -> bool:
  """decode.cpu_kernel=native applies: asked for, and the loops run on a CPU."""
  return cfg.decode.cpu_kernel == "native" and target_platform(mesh) == "cpu"


def _decode_model(cfg: Config) -> Config:
  """The config the cached passes run: with decode.cpu_kernel=native the plain
  layer layout (`prepare_params` unstacks scanned layers for the kernel)."""
  return cfg.replace(model={"scan_layers": False}) if cfg.decode.cpu_kernel == "native" else cfg


def cache_layout(cfg: Config, mesh: Mesh | None) -> str:
  """The decode loops' KV value layout: decode.kv_layout, or where "auto" the
  platform's the loops compile for (`kv_cache.layout_for`: (B, K, Dh, S) on a
  CPU, (B, K, S, Dh) elsewhere)."""
  layout = cfg.decode.kv_layout
  return kv_cache.layout_for(target_platform(mesh)) if layout == "auto" else layout


def empty_cache(cfg: Config, mesh: Mesh | None, batch: int, capacity: int) -> KVCache:
  """The decode loops' empty KV cache: values in `cache_layout`, stacked where the
  passes scan their layers, sharded over the batch and kv-head axes."""
  cache = KVCache.empty(_decode_model(cfg).model, batch, capacity,
                        layout=cache_layout(cfg, mesh))
  shard = shd.sharder(cfg, mesh)
  spec = ("batch", "act_kv_heads", None, None)
  if cache.stacked:
    return cache.replace(k=shard(cache.k, (None, *spec)), v=shard(cache.v, (None, *spec)))
  return cache.replace(k=tuple(shard(a, spec) for a in cache.k),
                       v=tuple(shard(a, spec) for a in cache.v))


def extend_fn(cfg: Config, mesh: Mesh | None):
  """extend(params, cache, block_BxT, n_B, logits_at_B=None, aligned=False) ->
  MainOutput: the cached main pass as the decode loops run it, on parameters from
  `prepare_params(cfg, ...)` and a cache from `empty_cache`; with logits_at_B
  (B,), the logits (B, 1, V) at that position of each row only (the native
  kernel computes all and takes that one); `aligned`: every row of the cache
  has the same length (`api.extend`)."""
  shard = shd.sharder(cfg, mesh)
  cfg = _decode_model(cfg)
  xla = functools.partial(api.extend, cfg, shard=shard,
                          out_in=cfg.decode.weights_layout == "out_in")
  if not uses_native(cfg, mesh):
    return xla
  from mtcot_jax import native   # built on first use; registered before the loops are traced
  native.load()

  def extend(params, cache, block_BxT, n_B, logits_at_B=None, aligned=False):
    if block_BxT.shape[0] * block_BxT.shape[1] > native.MAX_ROWS:
      return xla(params, cache, block_BxT, n_B, logits_at_B=logits_at_B, aligned=aligned)

    def fast(params, cache, block_BxT, n_B):
      out = native.extend(cfg, params, cache, block_BxT, n_B, cfg.head.source_layers)
      if logits_at_B is None:
        return out
      return out._replace(logits=jnp.take_along_axis(out.logits, logits_at_B[:, None, None], 1))
    return jax.lax.platform_dependent(
        params, cache, block_BxT, n_B, cpu=fast,
        default=functools.partial(xla, logits_at_B=logits_at_B, aligned=aligned))
  return extend
