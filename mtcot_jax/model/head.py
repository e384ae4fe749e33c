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
import jax.numpy as jnp

from mtcot_jax.config import HeadConfig, ModelConfig
from mtcot_jax.model.layers import Block, BlockDims, RMSNorm, _param
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
  def __call__(self, sources, chain_tokens, embed_VxD):
    """Chain features for every source position.

    Args:
      sources: tuple of (..., D) residuals, one per `head.source_layers`.
      chain_tokens: (..., C) int tokens x[t+1..t+C], C <= head.k (x[t+1] is the
        main model's token; later ones the head's own or the teacher's).
      embed_VxD: the main model's embedding table.
    Returns:
      (..., C, D) features; `features @ unembed` gives logits for x[t+2..t+C+1].
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
    pos_NxC = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (N, C))
    idx = jnp.arange(C)
    mask_NxCxC = jnp.broadcast_to(idx[:, None] >= idx[None, :], (N, C, C))
    # Chains are short and many: only the chain (batch) axis is sharded.
    block_shard = Sharder()
    for i in range(h.num_layers):
      x_NxCxW, _ = Block(dims, block_shard, name=f"layer_{i}")(x_NxCxW, pos_NxC, mask_NxCxC)

    if W != D:
      w_o = _param(self, "w_o", (W, D), ("head_embed", "embed"), m.init_std, m.param_dtype)
      x_NxCxW = x_NxCxW @ w_o.astype(dt)
    feat = norm("final_norm")(x_NxCxW).reshape(*lead, C, D)
    if len(lead) == 2:
      feat = self.shard(feat, ("batch", "length", None, "act_embed"))
    return feat
