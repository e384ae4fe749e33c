"""The main model: a Llama-family decoder with a KV cache of fixed capacity.

With `model.scan_layers` the blocks run under `nn.scan` and their parameters are
stacked (see `api.to_scan_layout` / `api.to_plain_layout` to convert); the
results are the unrolled model's. `model.remat` rematerialises each block.

Teacher-forced mode runs over a whole (possibly packed) sequence. Cached mode
appends T new tokens per sequence at that sequence's own length; `num_new_B`
says how many of the T are real (the rest are written past the new length,
where later calls overwrite them). Positions in cached mode are cache slots,
so prompts are left-aligned from slot 0. The cache (`kv_cache.KVCache`) is one
array per layer, or with scan_layers stacked arrays carried through the scan.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtcot_jax.config import ModelConfig
from mtcot_jax.model.attention import CausalSegments, resolve_attention
from mtcot_jax.model.kv_cache import KVCache, LayerCache
from mtcot_jax.model.layers import Attention, Block, BlockDims, RMSNorm, SwiGLU, _param
from mtcot_jax.sharding import Sharder

__all__ = ["KVCache", "MainOutput", "Transformer"]

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class MainOutput(NamedTuple):
  logits: jax.Array | None     # (B, T, V) float32; None from Transformer(logits=False)
  residual: jax.Array          # (B, T, D) the last layer's output, before the final norm
  sources: tuple[jax.Array, ...]  # (B, T, D) per head source layer
  cache: KVCache | None


def final_norm(cfg: ModelConfig, name: str | None = None) -> RMSNorm:
  """The norm between the last block and the unembedding (`main/final_norm`)."""
  return RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)


def block_dims(cfg: ModelConfig, attention: str = "xla") -> BlockDims:
  """The main blocks' dims; `attention` the resolved model.attention (teacher-forced)."""
  return BlockDims(d_model=cfg.d_model, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                   head_dim=cfg.dh, mlp_dim=cfg.mlp_dim, rope_theta=cfg.rope_theta,
                   norm_eps=cfg.norm_eps, init_std=cfg.init_std, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, rope_scaling=cfg.rope_scaling,
                   qkv_bias=cfg.qkv_bias, attention=attention)


class Transformer(nn.Module):
  cfg: ModelConfig
  source_layers: tuple[int, ...] = (-1,)
  shard: Sharder = Sharder()
  # The blocks' (attention, mlp) module classes: cached decode passes use
  # `model/cpu.py`'s variants (`cpu.decode_parts`).
  parts: tuple = (Attention, SwiGLU)
  # False: no unembedding (MainOutput.logits is None), for a loss that unembeds
  # the final norm's output itself, in vocabulary chunks (train.vocab_chunks).
  logits: bool = True

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None,
               cache: KVCache | None = None, num_new_B=None, logits_at_B=None,
               aligned: bool = False) -> MainOutput:
    """logits_at_B (B,) int: the logits (B, 1, V) at that one position of each
    row only (a decode pass that reads one; the unembedding is then done once a
    row, not T times); the residual and sources stay (B, T, D). `aligned`: the
    caller promises every row of `cache` has the same length (the new tokens are
    then written by dynamic-update-slice; so they are for B = 1 off the CPU)."""
    c = self.cfg
    B, T = tokens_BxT.shape
    dt = jnp.dtype(c.dtype)
    embed_VxD = _param(self, "embed", (c.vocab_size, c.d_model), ("vocab", "embed"),
                       c.init_std, c.param_dtype)
    x_BxTxD = jnp.take(embed_VxD, tokens_BxT, axis=0).astype(dt)
    x_BxTxD = self.perturb("embeddings", x_BxTxD)  # a no-op unless tests pass perturbations
    x_BxTxD = self.shard(x_BxTxD, ("batch", "length", "act_embed"))

    attention = "xla"
    if cache is None:
      if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      attention = resolve_attention(c, self._platform(), T)
      # The fused kernels build their own mask from the segment ids.
      mask_BxTxS = CausalSegments(segment_ids_BxT)
      if attention == "xla":
        mask_BxTxS = jnp.broadcast_to(mask_BxTxS.dense(T), (B, T, T))
      write = None
    else:
      # New token t of sequence b goes to slot lengths[b] + t (its position) and
      # attends to every slot up to its own. Slots past the capacity are dropped,
      # never clamped onto valid entries (callers size the cache; `extend` checks).
      slots_BxT = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
      positions_BxT = slots_BxT
      mask_BxTxS = jnp.arange(cache.capacity)[None, None, :] <= slots_BxT[:, :, None]
      self._check_cache(cache)
      # One layer's view; each layer fills in its own arrays (or its index). One
      # row is aligned too, but for XLA:CPU (`kv_cache`: it would copy the cache).
      aligned = aligned or (B == 1 and self._platform() != "cpu")
      write = LayerCache(None, None, slots_BxT, layout=cache.layout, aligned=aligned)

    kv = None if cache is None else (cache.k, cache.v)
    want = {(l % c.num_layers) for l in self.source_layers}
    layers = self._scanned if c.scan_layers else self._unrolled
    x_BxTxD, new_kv, layer_out = layers(block_dims(c, attention), x_BxTxD, positions_BxT,
                                        mask_BxTxS, kv, write, want)

    h_BxTxD = x_BxTxD
    if logits_at_B is not None:
      h_BxTxD = jnp.take_along_axis(x_BxTxD, logits_at_B[:, None, None], axis=1)   # (B, 1, D)
    h_BxTxD = final_norm(c, name="final_norm")(h_BxTxD)
    if c.tie_embeddings:
      unembed_DxV = embed_VxD.T
    else:
      unembed_DxV = _param(self, "unembed", (c.d_model, c.vocab_size), ("embed", "vocab"),
                           c.init_std, c.param_dtype)
    logits_BxTxV = None
    if self.logits:
      logits_BxTxV = jnp.matmul(h_BxTxD, unembed_DxV.astype(dt),
                                preferred_element_type=jnp.float32)
      logits_BxTxV = self.shard(logits_BxTxV, ("batch", "length", "act_vocab"))

    new_cache = None
    if cache is not None:
      num_new_B = jnp.full((B,), T, jnp.int32) if num_new_B is None else num_new_B
      new_cache = cache.replace(k=new_kv[0], v=new_kv[1],
                                lengths=cache.lengths + num_new_B.astype(jnp.int32))
    sources = tuple(layer_out[l % c.num_layers] for l in self.source_layers)
    return MainOutput(logits_BxTxV, x_BxTxD, sources, new_cache)

  def _platform(self) -> str:
    """The platform the blocks run on: the mesh's devices', else the default backend's."""
    mesh = self.shard.mesh
    if isinstance(mesh, jax.sharding.Mesh):
      return mesh.devices.flat[0].platform
    return jax.default_backend()

  def _check_cache(self, cache: KVCache) -> None:
    c = self.cfg
    if cache.stacked != c.scan_layers or cache.num_layers != c.num_layers:
      form = "stacked (L, ...) arrays" if cache.stacked else "a tuple of arrays"
      raise ValueError(
          f"a KV cache of {cache.num_layers} layers in {form} for a model of {c.num_layers} "
          f"layers with scan_layers={c.scan_layers}. Accepted: KVCache.empty(cfg.model, ...) "
          "for this model (stacked exactly when scan_layers)")

  def _block(self, scanned: bool):
    if self.cfg.remat == "none":
      return Block
    # Inside a scan the loop boundary already keeps XLA from merging the
    # recomputation into the forward pass, so CSE prevention is not needed there.
    return nn.remat(Block, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=not scanned)

  def _unrolled(self, dims, x_BxTxD, positions_BxT, mask_BxTxS, kv, write, want):
    """One `layer_{i}` per layer. `kv`: the cache's (keys, values) tuples, and
    `write` the LayerCache they are written through (None without a cache).
    Returns x, the layers' updated caches (tuples of keys and values; None
    without a cache) and {i: layer i's output} for `want`."""
    c = self.cfg
    block_cls = self._block(scanned=False)
    layer_out, new_k, new_v = {}, [], []
    for i in range(c.num_layers):
      layer_kv = None if kv is None else write.replace(k=kv[0][i], v=kv[1][i])
      x_BxTxD, layer_kv = block_cls(dims, self.shard, self.parts, name=f"layer_{i}")(
          x_BxTxD, positions_BxT, mask_BxTxS, layer_kv)
      if kv is not None:
        new_k.append(layer_kv.k)
        new_v.append(layer_kv.v)
      if i in want:
        layer_out[i] = x_BxTxD
    new_kv = None if kv is None else (tuple(new_k), tuple(new_v))
    return x_BxTxD, new_kv, layer_out

  def _scanned(self, dims, x_BxTxD, positions_BxT, mask_BxTxS, kv, write, want):
    """`nn.scan` over one block whose parameters are stacked under `layers` with a
    leading (L,) axis, logical name "layers"; same arguments and returns as
    `_unrolled`, but `kv` holds stacked (L, ...) keys and values.

    The stacked cache is the scan's carry, and layer i writes into and reads its
    slice i (`LayerCache.layer`): nothing is stacked or unstacked per call, and
    inside the decode loop the caches are updated in place. The residual stream
    of every layer is kept as a scan output only when a head source layer is
    not the last.
    """
    c = self.cfg
    last = c.num_layers - 1
    emit = bool(want - {last})

    def body(block, carry, layer, pos_BxT, mask, write):
      x_BxTxD, kv = carry
      cache = None if kv is None else write.replace(k=kv[0], v=kv[1], layer=layer)
      x_BxTxD, cache = block(x_BxTxD, pos_BxT, mask, cache)
      kv = None if cache is None else (cache.k, cache.v)
      return (x_BxTxD, kv), (x_BxTxD if emit else None)

    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    block = self._block(scanned=True)(dims, self.shard, self.parts, name="layers")
    (x_BxTxD, new_kv), outs_LxBxTxD = scan(block, (x_BxTxD, kv),
                                           jnp.arange(c.num_layers, dtype=jnp.int32),
                                           positions_BxT, mask_BxTxS, write)
    layer_out = {i: (x_BxTxD if i == last else outs_LxBxTxD[i]) for i in want}
    return x_BxTxD, new_kv, layer_out
