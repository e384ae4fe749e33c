"""One interface for both multi-token heads, so that callers never branch on
`head.context`: `head_for(cfg)` gives the projection head (head.context == 0) or
the head with context, each a frozen object with

    init(key)                                    boxed parameters of the head
    features(params, sources, chains, ...)       teacher-forced chain features
    decode_state(batch, capacity)                what decoding keeps between passes
    remember(params, state, sources, slots)      the state after a main pass
    chain(params, state, sources, chain, lengths)  decode-time chain features
    chain_start(params, state, sources, lengths, k)   a block's chain, empty
    chain_step(params, state, chain, token, j)   depth j+1's features from token
                                                 x[t+1+j], the chain's own KV cache

`params` is always the whole {"main": ..., "head": ...} tree: the heads read the
main model's embedding. The projection head keeps no decode state (an empty
tuple); the head with context keeps per layer the keys and values of its memory
of every processed position (slot = position), so cached = teacher-forced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtcot_jax import sharding as shd
from mtcot_jax.config import Config
from mtcot_jax.model.head import ContextHead, MultiTokenHead, head_dims


def shared(cfg: Config, x: jax.Array) -> jax.Array:
  """A main-model array as the head sees it: a constant under stop_gradient_residual."""
  return jax.lax.stop_gradient(x) if cfg.head.stop_gradient_residual else x


def context_mask(cfg: Config, head_positions_BxP, T: int, segment_ids_BxT=None):
  """(B, P, T): the memory the chain at each source t reads: u <= t, u > t - C
  (head.context = C > 0), and u in t's packed segment."""
  u = jnp.arange(T)[None, None, :]
  t = head_positions_BxP[:, :, None]
  mask = u <= t
  if cfg.head.context > 0:
    mask = mask & (u > t - cfg.head.context)
  if segment_ids_BxT is not None:
    b = jnp.arange(head_positions_BxP.shape[0])[:, None]
    mask = mask & (segment_ids_BxT[:, None, :] == segment_ids_BxT[b, head_positions_BxP][..., None])
  return mask


MEMORY_CACHE = ("bhsd", "bhds")   # the decode state's memory keys and values (`decode_state`)


@dataclasses.dataclass(frozen=True)
class Projection:
  """The projection head: the chain at t reads the residual at t only."""
  cfg: Config
  shard: shd.Sharder = shd.Sharder()

  def module(self, sharded: bool = True):
    return MultiTokenHead(self.cfg.model, self.cfg.head, self.shard if sharded else shd.Sharder())

  def _sources(self, sources):
    return tuple(shared(self.cfg, s) for s in sources)

  def init(self, key):
    c = self.cfg
    sources = tuple(jnp.zeros((1, c.model.d_model), jnp.dtype(c.model.dtype))
                    for _ in c.head.source_layers)
    embed = jnp.zeros((c.model.vocab_size, c.model.d_model), jnp.dtype(c.model.param_dtype))
    return self.module().init(key, sources, jnp.zeros((1, 1), jnp.int32), embed)["params"]

  def run(self, params, sources, chain):
    """Features (..., C, D) from source residuals (..., D) and chain tokens (..., C)."""
    return self.module().apply({"params": params["head"]}, self._sources(sources), chain,
                               shared(self.cfg, params["main"]["embed"]))

  def features(self, params, sources_BxTxD, chain_BxPxK, positions_BxT, head_positions_BxP,
               segment_ids_BxT=None):
    b = jnp.arange(chain_BxPxK.shape[0])[:, None]
    return self.run(params, tuple(s[b, head_positions_BxP] for s in sources_BxTxD), chain_BxPxK)

  def decode_state(self, batch: int, capacity: int) -> tuple:
    return ()

  def remember(self, params, state, sources_BxTxD, slots_BxT):
    return state

  def chain(self, params, state, sources_BxD, chain_BxC, lengths_B):
    return self.run(params, sources_BxD, chain_BxC)

  def _empty_chain_kv(self, batch: int, k: int):
    hd = head_dims(self.cfg.model, self.cfg.head)
    H, Dh, dt = hd.num_heads, hd.head_dim, jnp.dtype(self.cfg.model.dtype)
    return tuple((jnp.zeros((batch, H, k, Dh), dt), jnp.zeros((batch, H, Dh, k), dt))
                 for _ in range(self.cfg.head.num_layers))

  def chain_start(self, params, state, sources_BxD, lengths_B, k: int):
    """A block's chain before its first element: the sources and an empty KV
    cache of k chain slots per head layer (keys (B, H, k, Dh), values (B, H, Dh, k))."""
    return (tuple(sources_BxD), self._empty_chain_kv(sources_BxD[0].shape[0], k))

  def chain_step(self, params, state, chain, token_B, j):
    """Depth j+1's features (B, D) from chain element j (token x[t+1+j]), which
    attends to elements < j through the chain's cache; and the updated chain.
    The same features as `chain(...)[:, j]` over the whole prefix."""
    sources, chain_kv = chain
    feat, chain_kv = self.module().apply(
        {"params": params["head"]}, self._sources(sources), token_B[:, None],
        shared(self.cfg, params["main"]["embed"]), chain_kv, j)
    return feat[:, 0], (sources, chain_kv)


@dataclasses.dataclass(frozen=True)
class WithContext(Projection):
  """The head with context: the chain at t also attends to its memory of every
  position u <= t (u > t - C for head.context = C > 0)."""

  def module(self, sharded: bool = True):
    return ContextHead(self.cfg.model, self.cfg.head, self.shard if sharded else shd.Sharder())

  def init(self, key):
    c = self.cfg
    sources = tuple(jnp.zeros((1, 1, c.model.d_model), jnp.dtype(c.model.dtype))
                    for _ in c.head.source_layers)
    embed = jnp.zeros((c.model.vocab_size, c.model.d_model), jnp.dtype(c.model.param_dtype))
    one = jnp.zeros((1, 1), jnp.int32)
    return self.module().init(key, sources, one[..., None], embed, one, one,
                              jnp.ones((1, 1, 1), bool))["params"]

  def features(self, params, sources_BxTxD, chain_BxPxK, positions_BxT, head_positions_BxP,
               segment_ids_BxT=None):
    T = positions_BxT.shape[1]
    return self.module().apply(
        {"params": params["head"]}, self._sources(sources_BxTxD), chain_BxPxK,
        shared(self.cfg, params["main"]["embed"]), positions_BxT, head_positions_BxP,
        context_mask(self.cfg, head_positions_BxP, T, segment_ids_BxT))

  def decode_state(self, batch: int, capacity: int) -> tuple:
    """Per head layer, the memory's keys (B, H, S, Dh) and values (B, H, Dh, S),
    slot = position: head-major like the main model's cache, so that a chain
    step's two memory dots contract the minor dimension (a (B, S, H, Dh) layout
    made XLA:CPU relayout the whole memory in every step: ~5x the step's time
    at 2,048 positions, benchmarks/decode.py)."""
    hd = head_dims(self.cfg.model, self.cfg.head)
    B, S, H, Dh, dt = batch, capacity, hd.num_heads, hd.head_dim, jnp.dtype(self.cfg.model.dtype)
    return tuple((jnp.zeros((B, H, S, Dh), dt), jnp.zeros((B, H, Dh, S), dt))
                 for _ in range(self.cfg.head.num_layers))

  def memory_kv(self, params, sources_BxTxD, positions_BxT):
    """Per layer (keys, values), each (B, T, H, Dh), of T positions' memory."""
    return self.module(sharded=False).apply(
        {"params": params["head"]}, self._sources(sources_BxTxD), positions_BxT,
        method=lambda mod, s, p: mod.memory_kv(mod.memory(s), p))

  def remember(self, params, state, sources_BxTxD, slots_BxT):
    """The memory of T new positions written at their slots (past the capacity: dropped)."""
    rows = jnp.arange(slots_BxT.shape[0])[:, None]
    new = self.memory_kv(params, sources_BxTxD, slots_BxT)      # (B, T, H, Dh) each
    # The slices between the indices put the indexed dimensions first: both
    # updates are (B, T, H, Dh) (NumPy's rule).
    return tuple((hk.at[rows, :, slots_BxT].set(nk.astype(hk.dtype), mode="drop"),
                  hv.at[rows, :, :, slots_BxT].set(nv.astype(hv.dtype), mode="drop"))
                 for (hk, hv), (nk, nv) in zip(state, new))

  def chain(self, params, state, sources_BxD, chain_BxC, lengths_B):
    """Chain features (B, C, D) at each sequence's last processed position
    t = lengths - 1, reading the memory in `state` at u <= t, u > t - C."""
    S = state[0][0].shape[2]
    t = (lengths_B - 1)[:, None]

    def fn(mod, s, c, e, kv, m, pos):
      return mod.chains(mod.memory(s)[:, None], c[:, None], e, kv, m, pos,
                        mem_spec=MEMORY_CACHE)[:, 0]
    return self.module(sharded=False).apply(
        {"params": params["head"]}, self._sources(sources_BxD), chain_BxC,
        shared(self.cfg, params["main"]["embed"]), state, context_mask(self.cfg, t, S), t,
        method=fn)

  def chain_start(self, params, state, sources_BxD, lengths_B, k: int):
    """The head with context's chain: the memory entry of its source (B, 1, W),
    the memory it may read (B, 1, S), its RoPE base t (B, 1), an empty chain KV
    cache (per layer keys and values (B, 1, k, H, Dh))."""
    B, S = sources_BxD[0].shape[0], state[0][0].shape[2]
    t = (lengths_B - 1)[:, None]
    m_src = self.module(sharded=False).apply(
        {"params": params["head"]}, self._sources(sources_BxD), method=lambda mod, s: mod.memory(s))
    hd = head_dims(self.cfg.model, self.cfg.head)
    zeros = jnp.zeros((B, 1, k, hd.num_heads, hd.head_dim), jnp.dtype(self.cfg.model.dtype))
    return (m_src[:, None], context_mask(self.cfg, t, S), t,
            tuple((zeros, zeros) for _ in range(self.cfg.head.num_layers)))

  def chain_step(self, params, state, chain, token_B, j):
    """As `Projection.chain_step`, reading the memory in `state` too."""
    m_src, mask, t, chain_kv = chain

    def fn(mod, m, c, e, kv, msk, pos, ckv):
      return mod.chains(m, c, e, kv, msk, pos, ckv, j, MEMORY_CACHE)
    feat, chain_kv = self.module(sharded=False).apply(
        {"params": params["head"]}, m_src, token_B[:, None, None],
        shared(self.cfg, params["main"]["embed"]), state, mask, t, chain_kv, method=fn)
    return feat[:, 0, 0], (m_src, mask, t, chain_kv)


def head_for(cfg: Config, shard: shd.Sharder = shd.Sharder()) -> Projection:
  """The configured head: `WithContext` if head.context != 0, else `Projection`."""
  return (WithContext if cfg.head.context else Projection)(cfg, shard)
