"""The multi-token head (DeepSeek-V3 MTP-style projection, one small causal transformer).

For a source position t whose residual produced main token x[t+1]:

    r~_t     = W_r . concat(RMSNorm(residual of each source layer at t))     (width W)
    e_j      = W_p . concat(RMSNorm(r~_t), RMSNorm(E . x[t+j]))             j = 1..k
    s_1..s_k = causal transformer over (e_1..e_k)
    feat_j   = RMSNorm(W_o . s_j)        (W_o only when W != D)
    logits_j = feat_j . Unembed           predicts x[t+1+j]

`E` and `Unembed` are the main model's, passed in as arrays. The head sees the
past only through r_t. Any leading batch shape works: (B, T) source positions in
training, (B,) in decoding; chains are flattened to N = prod(leading) rows.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtcot_jax.config import HeadConfig, ModelConfig
from mtcot_jax.model.kv_cache import LayerCache
from mtcot_jax.model.layers import Block, BlockDims, RMSNorm, SwiGLU, _param, rope
from mtcot_jax.sharding import Sharder


def head_dims(model: ModelConfig, head: HeadConfig) -> BlockDims:
  width = head.resolved_width(model)
  return BlockDims(d_model=width, num_heads=head.num_heads, num_kv_heads=head.num_heads,
                   head_dim=width // head.num_heads, mlp_dim=head.resolved_mlp_dim(model),
                   rope_theta=model.rope_theta, norm_eps=model.norm_eps,
                   init_std=model.init_std, dtype=model.dtype, param_dtype=model.param_dtype,
                   embed_axis="head_embed")


class MultiTokenHead(nn.Module):
  model: ModelConfig
  head: HeadConfig
  shard: Sharder = Sharder()

  @nn.compact
  def __call__(self, sources, chain_tokens, embed_VxD, chain_kv=None, start=0):
    """Chain features for every source position.

    Args:
      sources: tuple of (..., D) residuals, one per `head.source_layers`.
      chain_tokens: (..., C) int tokens x[t+1..t+C], C <= head.k (x[t+1] is the
        main model's token; later ones the head's own or the teacher's).
      embed_VxD: the main model's embedding table.
      chain_kv: decoding: per layer the chain's keys (N, H, k, Dh) and values
        (N, H, Dh, k) so far (N = prod(leading)); chain_tokens are then the chain
        elements at slots start..start+C-1, which attend to the cached ones.
    Returns:
      (..., C, D) features; `features @ unembed` gives logits for x[t+2..t+C+1];
      with chain_kv, also the updated chain_kv.
    """
    m, h = self.model, self.head
    dims = head_dims(m, h)
    W, D = dims.d_model, m.d_model
    dt = jnp.dtype(m.dtype)
    lead = chain_tokens.shape[:-1]
    C = chain_tokens.shape[-1]
    norm = lambda name: RMSNorm(m.norm_eps, m.dtype, m.param_dtype, name=name)  # noqa: E731

    src = [norm(f"source_norm_{i}")(s) for i, s in enumerate(sources)]
    src_NxSD = jnp.concatenate(src, axis=-1).reshape(-1, len(src) * D)
    w_r = _param(self, "w_r", (len(src) * D, W), ("embed", "head_embed"), m.init_std,
                 m.param_dtype)
    r_NxW = norm("r_norm")(src_NxSD.astype(dt) @ w_r.astype(dt))

    emb_NxCxD = jnp.take(embed_VxD, chain_tokens.reshape(-1, C), axis=0)
    emb_NxCxD = norm("token_norm")(self.perturb("chain_embeddings", emb_NxCxD))
    w_p = _param(self, "w_p", (W + D, W), (None, "head_embed"), m.init_std, m.param_dtype)
    r_NxCxW = jnp.broadcast_to(r_NxW[:, None, :], (r_NxW.shape[0], C, W))
    x_NxCxW = jnp.concatenate([r_NxCxW, emb_NxCxD.astype(dt)], axis=-1) @ w_p.astype(dt)

    N = x_NxCxW.shape[0]
    pos_NxC = jnp.broadcast_to(start + jnp.arange(C, dtype=jnp.int32), (N, C))
    slots = jnp.arange(C if chain_kv is None else chain_kv[0][0].shape[2])
    mask_NxCxS = jnp.broadcast_to(pos_NxC[:, :, None] >= slots[None, None, :], (N, C, len(slots)))
    # Chains are short and many: only the chain (batch) axis is sharded.
    block_shard = Sharder()
    new_kv = []
    for i in range(h.num_layers):
      layer_kv = None if chain_kv is None else LayerCache(*chain_kv[i], slots_BxT=pos_NxC)
      x_NxCxW, layer_kv = Block(dims, block_shard, name=f"layer_{i}")(
          x_NxCxW, pos_NxC, mask_NxCxS, layer_kv)
      new_kv.append(None if layer_kv is None else (layer_kv.k, layer_kv.v))

    if W != D:
      w_o = _param(self, "w_o", (W, D), ("head_embed", "embed"), m.init_std, m.param_dtype)
      x_NxCxW = x_NxCxW @ w_o.astype(dt)
    feat = norm("final_norm")(x_NxCxW).reshape(*lead, C, D)
    if len(lead) == 2:
      feat = self.shard(feat, ("batch", "length", None, "act_embed"))
    return feat if chain_kv is None else (feat, tuple(new_kv))


class _ContextLayer(nn.Module):
  """A head layer whose chain attends, in one softmax, to the memory (keys and
  values projected from m_u by this layer) and causally to the chain itself."""
  dims: BlockDims

  def setup(self):
    d = self.dims
    W, H, Dh = d.d_model, d.num_heads, d.head_dim
    ax = d.embed_axis
    self.attn_norm = RMSNorm(d.norm_eps, d.dtype, d.param_dtype)
    self.mem_norm = RMSNorm(d.norm_eps, d.dtype, d.param_dtype)
    self.mlp_norm = RMSNorm(d.norm_eps, d.dtype, d.param_dtype)
    p = lambda name, shape, names: _param(self, name, shape, names, d.init_std,  # noqa: E731
                                          d.param_dtype)
    self.wq = p("q", (W, H, Dh), (ax, "heads", "head_dim"))
    self.wk = p("k", (W, H, Dh), (ax, "heads", "head_dim"))
    self.wv = p("v", (W, H, Dh), (ax, "heads", "head_dim"))
    self.wo = p("o", (H, Dh, W), ("heads", "head_dim", ax))
    self.mlp = SwiGLU(d)

  def kv(self, x_BxTxW, x_norm, pos_BxT):
    dt = jnp.dtype(self.dims.dtype)
    x = x_norm(x_BxTxW).astype(dt)
    k = rope(jnp.einsum("btw,whd->bthd", x, self.wk.astype(dt)), pos_BxT, self.dims.rope_theta)
    return k, jnp.einsum("btw,whd->bthd", x, self.wv.astype(dt))

  def memory_kv(self, m_BxSxW, pos_BxS):
    """This layer's keys and values (B, S, H, Dh) of memory entries at positions pos."""
    return self.kv(m_BxSxW, self.mem_norm, pos_BxS)

  def __call__(self, x_BxPxCxW, pos_BxPxC, mem_kv, mem_mask_BxPxS, chain_kv=None, start=0,
               mem_spec=("bshd", "bshd")):
    """x (B, P, C, W): chain elements at slots start..start+C-1 of P chains.
    mem_kv: the memory's keys and values in the layouts `mem_spec` names (as
    `memory_kv` makes them, or the decode cache's (B, H, S, Dh) keys and
    (B, H, Dh, S) values: "bhsd", "bhds"). chain_kv: decoding: the chains' keys
    and values so far, each (B, P, k, H, Dh), written at those slots and read
    there. Returns x and chain_kv (None without)."""
    d = self.dims
    dt = jnp.dtype(d.dtype)
    B, P, C, W = x_BxPxCxW.shape
    flat = lambda a: a.reshape(B, P * C, *a.shape[3:])  # noqa: E731
    pos = flat(pos_BxPxC)
    h = self.attn_norm(flat(x_BxPxCxW)).astype(dt)
    q = rope(jnp.einsum("btw,whd->bthd", h, self.wq.astype(dt)), pos, d.rope_theta)
    k, v = self.kv(flat(x_BxPxCxW), self.attn_norm, pos)
    shape = lambda a: a.reshape(B, P, C, *a.shape[2:])  # noqa: E731
    q, k, v = shape(q) * jnp.asarray(d.head_dim ** -0.5, dt), shape(k), shape(v)
    if chain_kv is not None:
      put = lambda c, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
          c, new.astype(c.dtype), start, axis=2)
      k, v = chain_kv = put(chain_kv[0], k).astype(dt), put(chain_kv[1], v).astype(dt)
    mem_k, mem_v = mem_kv
    f32 = jnp.float32
    s_mem = jnp.einsum(f"bpchd,{mem_spec[0]}->bhpcs", q, mem_k.astype(dt),
                       preferred_element_type=f32)
    s_chain = jnp.einsum("bpchd,bpehd->bhpce", q, k, preferred_element_type=f32)
    s_mem = jnp.where(mem_mask_BxPxS[:, None, :, None, :], s_mem, -1e30)
    row, col = start + jnp.arange(C), jnp.arange(k.shape[2])
    s_chain = jnp.where(row[:, None] >= col[None, :], s_chain, -1e30)
    S = s_mem.shape[-1]
    probs = jax.nn.softmax(jnp.concatenate([s_mem, s_chain], axis=-1), axis=-1).astype(dt)
    out = (jnp.einsum(f"bhpcs,{mem_spec[1]}->bpchd", probs[..., :S], mem_v.astype(dt))
           + jnp.einsum("bhpce,bpehd->bpchd", probs[..., S:], v))
    x_BxPxCxW = x_BxPxCxW + jnp.einsum("bpchd,hdw->bpcw", out, self.wo.astype(dt))
    return x_BxPxCxW + self.mlp(self.mlp_norm(x_BxPxCxW)), chain_kv


class ContextHead(nn.Module):
  """The head with context (`head.context` != 0): EAGLE's draft-model shape.

  Memory m_u = RMSNorm(W_r . concat(RMSNorm(source layers at u))) for every
  position u; the chain at source t is e_j = W_p . concat(RMSNorm(m_t), RMSNorm(E .
  x[t+j])) (RoPE position t + j), and every layer attends to the memory at the
  positions the mask allows (u <= t, u > t - C) and causally to the chain.
  Methods: `memory` (sources -> m), `memory_kv` (m -> per-layer keys/values, what
  the decoder caches), `chains` (the chains at given sources), and `__call__`
  (all three, teacher-forced).
  """
  model: ModelConfig
  head: HeadConfig
  shard: Sharder = Sharder()

  def setup(self):
    m, h = self.model, self.head
    dims = head_dims(m, h)
    W, D, n_src = dims.d_model, m.d_model, len(h.source_layers)
    norm = lambda: RMSNorm(m.norm_eps, m.dtype, m.param_dtype)  # noqa: E731
    self.source_norms = [norm() for _ in range(n_src)]
    self.w_r = _param(self, "w_r", (n_src * D, W), ("embed", "head_embed"), m.init_std,
                      m.param_dtype)
    self.r_norm, self.src_norm, self.token_norm, self.final_norm = norm(), norm(), norm(), norm()
    self.w_p = _param(self, "w_p", (W + D, W), (None, "head_embed"), m.init_std, m.param_dtype)
    self.layers = [_ContextLayer(dims) for _ in range(h.num_layers)]
    if W != D:
      self.w_o = _param(self, "w_o", (W, D), ("head_embed", "embed"), m.init_std, m.param_dtype)

  def memory(self, sources):
    """(..., D) source residuals (one per source layer) -> (..., W) memory entries."""
    dt = jnp.dtype(self.model.dtype)
    src = jnp.concatenate([n(s) for n, s in zip(self.source_norms, sources)], axis=-1)
    return self.r_norm(src.astype(dt) @ self.w_r.astype(dt))

  def memory_kv(self, m_BxSxW, pos_BxS):
    """Per layer, (keys, values) (B, S, H, Dh) of the memory at positions pos."""
    return tuple(layer.memory_kv(m_BxSxW, pos_BxS) for layer in self.layers)

  def chains(self, m_src_BxPxW, chain_BxPxC, embed_VxD, mem_kv, mem_mask_BxPxS, pos_BxP,
             chain_kv=None, start=0, mem_spec=("bshd", "bshd")):
    """(B, P, C, D) features of the chains at P sources (memory m_t there, at RoPE
    position pos) over tokens x[t+1..t+C], reading the memory `mem_mask` allows.
    Decoding: chain_kv (per layer (B, P, k, H, Dh) keys and values) holds the
    chain elements before slot `start`, and the tokens are x[t+start+1..]; then
    (features, the updated chain_kv) are returned."""
    m, dt = self.model, jnp.dtype(self.model.dtype)
    B, P, C = chain_BxPxC.shape
    emb = self.token_norm(self.perturb("chain_embeddings", jnp.take(embed_VxD, chain_BxPxC,
                                                                    axis=0)))
    r = jnp.broadcast_to(self.src_norm(m_src_BxPxW)[:, :, None, :], (B, P, C, m_src_BxPxW.shape[-1]))
    x = jnp.concatenate([r.astype(dt), emb.astype(dt)], axis=-1) @ self.w_p.astype(dt)
    pos = pos_BxP[:, :, None] + 1 + start + jnp.arange(C, dtype=jnp.int32)
    new_kv = []
    for i, (layer, kv) in enumerate(zip(self.layers, mem_kv)):
      x, layer_kv = layer(x, pos, kv, mem_mask_BxPxS, None if chain_kv is None else chain_kv[i],
                          start, mem_spec)
      new_kv.append(layer_kv)
    if self.model.d_model != x.shape[-1]:
      x = x @ self.w_o.astype(dt)
    feat = self.shard(self.final_norm(x), ("batch", "length", None, "act_embed"))
    return feat if chain_kv is None else (feat, tuple(new_kv))

  def __call__(self, sources, chain_BxPxC, embed_VxD, positions_BxT, head_positions_BxP,
               mem_mask_BxPxT):
    """Teacher-forced: sources (B, T, D) at every position, chains at (B, P) sources."""
    mem = self.memory(sources)
    mem_kv = self.memory_kv(mem, positions_BxT)
    b = jnp.arange(mem.shape[0])[:, None]
    return self.chains(mem[b, head_positions_BxP], chain_BxPxC, embed_VxD, mem_kv,
                       mem_mask_BxPxT, positions_BxT[b, head_positions_BxP])
