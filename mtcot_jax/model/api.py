"""Functional entry points over the parameter pytree {"main": ..., "head": ...}.

The main model's blocks are `main/layer_{i}/...`, or with `model.scan_layers`
one stacked `main/layers/...` (leading axis L, logical name "layers");
`to_scan_layout` / `to_plain_layout` convert between the two.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mtcot_jax import sharding as shd
from mtcot_jax.config import Config
from mtcot_jax.model import cpu
from mtcot_jax.model.heads import Projection, context_mask, head_for, shared
from mtcot_jax.model.transformer import KVCache, MainOutput, Transformer, final_norm
from mtcot_jax.tokens import PAD_ID   # chain positions past the end read it (loss masked)

to_out_in = cpu.to_out_in
__all__ = ["context_mask", "to_out_in"]   # re-exported


class ForwardOutput(NamedTuple):
  """Teacher-forced outputs.

  logits:        (B, T, V) float32, the main model's next-token logits (None
                 from `apply(..., logits=False)`: `final_hidden` and
                 `unembed_matrix` give what they would be computed from).
  residual:      (B, T, D) the last layer's output, before the final norm.
  sources:       tuple of (B, T, D), the layers the head reads (head.source_layers).
  head_features: (B, P, k, D) or None. The head's chain at source position
                 p = head_positions[b, i] (all P = T positions by default):
                 `head_features[b, i, j-1] @ unembed` are the logits for token
                 x[p+1+j], j = 1..k. Kept as D-wide features, not logits, so that
                 memory stays O(B·P·k·D); `head_logits` unembeds one slice at a
                 time, and the training loss reduces per depth without ever
                 materialising (B, T, k, V).
  head_positions: (B, P) int32, the source positions of the chains.
  """
  logits: jax.Array
  residual: jax.Array
  sources: tuple[jax.Array, ...]
  head_features: jax.Array | None
  head_positions: jax.Array | None


def main_module(cfg: Config, shard: shd.Sharder = shd.Sharder(), out_in: bool = False,
                decode: bool = False, logits: bool = True) -> Transformer:
  """The main model; `decode` (or `out_in`): with `cpu.decode_parts`, the blocks
  of cached decode passes (`out_in`: the transposed weight layout); `logits`
  False: without the unembedding (MainOutput.logits None)."""
  parts = cpu.decode_parts(out_in) if (decode or out_in) else Transformer.parts
  return Transformer(cfg.model, cfg.head.source_layers, shard, parts, logits)


def head_module(cfg: Config, shard: shd.Sharder = shd.Sharder()):
  """The head's Flax module (the projection head or the head with context)."""
  return head_for(cfg, shard).module()


def _init_boxed(cfg: Config, key: jax.Array):
  k_main, k_head = jax.random.split(key)
  tokens = jnp.zeros((1, 2), jnp.int32)
  # Parameters do not depend on the attention kernel, and no fused kernel needs to
  # see this 2-token trace (nor the device a cudnn or splash config was written for).
  xla = cfg.replace(model={"attention": "xla"})
  main = main_module(xla).init(k_main, tokens)["params"]
  return {"main": main, "head": head_for(cfg).init(k_head)}


def param_specs(cfg: Config):
  """The logical PartitionSpec of every parameter (a pytree like the params)."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.key(0))
  return nn.get_partition_spec(boxed)


def param_shapes(cfg: Config):
  """jax.ShapeDtypeStruct of every parameter, without allocating them."""
  return nn.meta.unbox(jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.key(0)))


def param_shardings(cfg: Config, mesh: Mesh):
  """NamedSharding of every parameter on `mesh`, by the config's rules."""
  specs = param_specs(cfg)
  shd.check_divisible(param_shapes(cfg), specs, mesh, cfg.mesh.rules)
  return shd.tree_shardings(specs, mesh, cfg.mesh.rules)


def to_scan_layout(params):
  """Plain main-model parameters (`layer_{i}` for i < L) -> the `model.scan_layers`
  layout: one `layers` subtree whose leaves are the L layers' leaves stacked on a
  new leading axis. Other parameters (and the head) are unchanged."""
  main = dict(params["main"])
  names = sorted((n for n in main if n.startswith("layer_")), key=lambda n: int(n[6:]))
  if not names or "layers" in main:
    raise ValueError(f"expected plain-layout main parameters (layer_0, layer_1, ...); got keys "
                     f"{sorted(main)}")
  layers = [main.pop(n) for n in names]
  main["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, "main": main}


def to_plain_layout(params):
  """The inverse of `to_scan_layout`: `layers` (stacked) -> `layer_0` .. `layer_{L-1}`."""
  main = dict(params["main"])
  if "layers" not in main:
    raise ValueError(f"expected scan-layout main parameters (a 'layers' subtree); got keys "
                     f"{sorted(main)}")
  stacked = main.pop("layers")
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    main[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return {**params, "main": main}


def _rbg(key: jax.Array) -> jax.Array:
  # Initializers draw from an RBG key seeded by `key`: XLA compiles one
  # threefry per parameter otherwise, which dominates start-up on a CPU.
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")


@functools.lru_cache(maxsize=16)
def _init_fn(cfg: Config, mesh: Mesh | None, head_only: bool = False):
  if head_only:
    init = lambda key: nn.meta.unbox(  # noqa: E731
        head_for(cfg).init(jax.random.split(_rbg(key))[1]))
    shardings = None if mesh is None else param_shardings(cfg, mesh)["head"]
  else:
    init = lambda key: nn.meta.unbox(_init_boxed(cfg, _rbg(key)))  # noqa: E731
    shardings = None if mesh is None else param_shardings(cfg, mesh)
  return jax.jit(init) if mesh is None else jax.jit(init, out_shardings=shardings)


def init_params(cfg: Config, key: jax.Array, mesh: Mesh | None = None):
  """Random parameters {"main": ..., "head": ...}; sharded by the rules on `mesh`."""
  return _init_fn(cfg, mesh)(key)


def init_head_params(cfg: Config, key: jax.Array, mesh: Mesh | None = None):
  """The head's part of `init_params(cfg, key)`, without initialising the main
  model (for a main model that comes from elsewhere: `mtcot_jax.hf`)."""
  return _init_fn(cfg, mesh, True)(key)


def unembed_matrix(cfg: Config, params) -> jax.Array:
  """(D, V): the main model's output projection (the embedding's transpose if tied)."""
  main = params["main"]
  return main["embed"].T if cfg.model.tie_embeddings else main["unembed"]


def final_hidden(cfg: Config, params, residual_BxTxD: jax.Array) -> jax.Array:
  """(B, T, D) the final norm of `ForwardOutput.residual`, in the compute dtype:
  the main model's logits are `final_hidden @ unembed_matrix`."""
  return final_norm(cfg.model).apply({"params": params["main"]["final_norm"]}, residual_BxTxD)


def head_unembed(cfg: Config, params) -> jax.Array:
  """(D, V): the head's output projection, the main model's as the head sees it
  (a constant under head.stop_gradient_residual); (D, N) over the draft
  vocabulary where params has one (`with_draft_vocab`)."""
  if "draft" in params:
    return params["draft"]["unembed"]
  return shared(cfg, unembed_matrix(cfg, params))


def head_logits(cfg: Config, params, features: jax.Array) -> jax.Array:
  """(..., D) head features -> (..., V) float32 logits through the shared
  unembedding; (..., N) over the draft vocabulary where params has one
  (`with_draft_vocab`: logit i is token params["draft"]["ids"][i]'s)."""
  dt = jnp.dtype(cfg.model.dtype)
  return jnp.matmul(features.astype(dt), head_unembed(cfg, params).astype(dt),
                    preferred_element_type=jnp.float32)


def with_draft_vocab(cfg: Config, params, ids) -> dict:
  """`params` with a draft vocabulary: the head drafts only the tokens `ids` (N,)
  (FR-Spec: the most frequent ones), its chain step unembedding through the (D, N)
  columns of the main model's output matrix, copied here once. The main model
  still scores the whole vocabulary, so verified decoding stays exact; an
  unverified CoT can only use these tokens. Decoding only (not with a mesh)."""
  ids = jnp.asarray(ids, jnp.int32)
  if ids.ndim != 1 or ids.shape[0] < 1:
    raise ValueError(f"draft vocabulary of shape {ids.shape}; accepted: a non-empty (N,) id list")
  return {**params, "draft": {"ids": ids, "unembed": unembed_matrix(cfg, params)[:, ids]}}


def chain_tokens(tokens_BxT: jax.Array, positions_BxP: jax.Array, k: int) -> jax.Array:
  """(B, P, k): x[p+1..p+k] for each source position p, PAD past the end."""
  T = tokens_BxT.shape[1]
  idx_BxPxK = positions_BxP[:, :, None] + 1 + jnp.arange(k)[None, None, :]
  gathered = jnp.take_along_axis(tokens_BxT, jnp.clip(idx_BxPxK, 0, T - 1).reshape(
      tokens_BxT.shape[0], -1), axis=1).reshape(idx_BxPxK.shape)
  return jnp.where(idx_BxPxK < T, gathered, PAD_ID)


def run_head(cfg: Config, params, sources, chain_BxPxC, shard: shd.Sharder = shd.Sharder()):
  """The projection head's features (..., C, D) from source residuals (..., D) and
  chain tokens (..., C). With head.stop_gradient_residual the head's loss gives
  no gradient to any main parameter: the residual and the shared embedding are
  constants to it."""
  return Projection(cfg, shard).run(params, sources, chain_BxPxC)


def apply(cfg: Config, params, tokens_BxT, *, positions=None, segment_ids=None,
          head_positions=None, with_head: bool = True, logits: bool = True,
          shard: shd.Sharder = shd.Sharder()) -> ForwardOutput:
  """The teacher-forced forward (not jitted: call it inside your own jit/grad);
  `logits` False: without the main model's (B, T, V) logits (None)."""
  main: MainOutput = main_module(cfg, shard, logits=logits).apply(
      {"params": params["main"]}, tokens_BxT, positions, segment_ids)
  feats = None
  if with_head and cfg.head.k > 0:
    B, T = tokens_BxT.shape
    if head_positions is None:
      head_positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    feats = head_for(cfg, shard).features(params, main.sources,
                                          chain_tokens(tokens_BxT, head_positions, cfg.head.k),
                                          positions, head_positions, segment_ids)
  return ForwardOutput(main.logits, main.residual, main.sources, feats, head_positions)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "with_head"))
def _forward_jit(cfg, mesh, params, tokens, positions, segment_ids, head_positions, with_head):
  return apply(cfg, params, tokens, positions=positions, segment_ids=segment_ids,
               head_positions=head_positions, with_head=with_head,
               shard=shd.sharder(cfg, mesh))


def _check_tokens(cfg: Config, tokens) -> None:
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be (batch, length); got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers; got dtype {tokens.dtype}")
  if not isinstance(tokens, jax.core.Tracer):
    lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
    if lo < 0 or hi >= cfg.model.vocab_size:
      raise ValueError(f"token ids must lie in [0, model.vocab_size={cfg.model.vocab_size}); "
                       f"got values in [{lo}, {hi}]")


def forward(cfg: Config, params, tokens_BxT, *, positions=None, segment_ids=None,
            head_positions=None, with_head: bool = True,
            mesh: Mesh | None = None) -> ForwardOutput:
  """Teacher-forced forward of the main model and the head (jitted, cached per shape).

  tokens_BxT int (B, T); positions/segment_ids (B, T) for packed sequences;
  head_positions (B, P) int: run the head's chains only at these source
  positions (default: all T). See `ForwardOutput` for what comes back.
  """
  tokens_BxT = jnp.asarray(tokens_BxT)
  _check_tokens(cfg, tokens_BxT)
  return _forward_jit(cfg, mesh, params, tokens_BxT.astype(jnp.int32), positions, segment_ids,
                      head_positions, with_head)


def extend(cfg: Config, params, cache: KVCache, tokens_BxT, num_new_B=None,
           shard: shd.Sharder = shd.Sharder(), out_in: bool = False,
           logits_at_B=None, aligned: bool = False) -> MainOutput:
  """Cached main pass: append T tokens per sequence (the first num_new_B[b] real).

  Returns logits/residual/sources of the T new positions and the new cache;
  with `logits_at_B` (B,) the logits (B, 1, V) at that new position of each row only.
  `out_in`: the main blocks' matrices are in `to_out_in`'s layout. `aligned`:
  every row of `cache` has the same length (a promise, not checked inside jit:
  the new tokens are then written by dynamic-update-slice, as at B = 1 off the CPU).
  Raises if a concrete cache would overflow (inside jit the caller sizes it).
  """
  if not isinstance(cache.lengths, jax.core.Tracer):
    T = tokens_BxT.shape[1]
    need = int(jnp.max(cache.lengths)) + T
    if need > cache.capacity:
      raise ValueError(f"KV cache overflow: appending {T} tokens to lengths up to "
                       f"{int(jnp.max(cache.lengths))} needs {need} slots; capacity is "
                       f"{cache.capacity}. Accepted: lengths + new tokens <= capacity")
  return main_module(cfg, shard, out_in, decode=True).apply({"params": params["main"]}, tokens_BxT,
                                               cache=cache, num_new_B=num_new_B,
                                               logits_at_B=logits_at_B, aligned=aligned)
