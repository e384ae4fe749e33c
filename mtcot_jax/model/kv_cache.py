"""The main model's KV cache: its layouts, and how one layer writes and reads it.

Keys are stored kv-head-major (B, K, S, Dh). Values have two layouts, named by
the einsum spec attention reads them with (`KVCache.layout`):
- "bkds", values (B, K, Dh, S): for XLA:CPU, whose dot kernels take operands
  contracted over their minor dimension (both attention dots then are), and
  what the CPU's one-token split (`model/cpu.py`) and the native kernel read;
- "bksd", values (B, K, S, Dh) like the keys, "Dh minor": the layout fused
  decode kernels take, and on a GPU or TPU a plain (S, Dh) matrix per head.
`layout_for(platform)` picks one; the decoder asks it for the platform its loops
compile for (`decode/backend.py`), `KVCache.empty` for JAX's default backend.

Unrolled layers keep one array per layer: each layer writes its new keys and
values into its own array and attends over it, so that inside the decode loop's
`while_loop` XLA updates every array in place (with one stacked array, read by
every layer and written once after the last, XLA copied the whole cache in every
pass). With `model.scan_layers` the arrays are stacked (L, ...) and are the layer
scan's carry: layer i writes into its slice in place and reads that slice (a
dynamic-slice, as the scan reads its weights), so nothing is stacked, unstacked or
copied per pass (tests/test_kv_cache.py counts the compiled loop's buffers).

A write of T new tokens goes to slots lengths[b] + t, slots past the capacity
dropped, never clamped onto valid entries. Where every row writes at the same
slots (`LayerCache.aligned`: the prefill of an empty cache, or one row off the
CPU, `Transformer`) it is one dynamic-update-slice; otherwise a scatter. Not a
dynamic-update-slice a row (B ops a layer), nor a runtime `lax.cond` between the
two (a host round trip a layer on a GPU). Not for one row on the CPU either:
XLA:CPU fuses that update into the reshape that drops the unit batch dimension
for the attention dot, once for each of its users, and then copies the cache to
keep both in place (8 layer-sized copies a pass in the tests' 2-layer model);
its scatter stays in place.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from mtcot_jax.config import ModelConfig

CPU_LAYOUT = "bkds"        # values (B, K, Dh, S)
DH_MINOR = "bksd"          # values (B, K, S, Dh)
LAYOUTS = (CPU_LAYOUT, DH_MINOR)


def layout_for(platform: str) -> str:
  """The values' layout for JAX platform `platform` (cpu, gpu, tpu)."""
  return CPU_LAYOUT if platform == "cpu" else DH_MINOR


def _check_layout(layout: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"KV cache layout {layout!r}; accepted: {LAYOUTS[0]!r} (values (B, K, Dh, "
                     f"S), the CPU's) or {LAYOUTS[1]!r} (values (B, K, S, Dh))")
  return layout


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, and each sequence's filled length.

  `k`, `v`: one array per layer (a tuple), or with scanned layers one (L, ...)
  array each (`stacked`). Keys (B, K, S, Dh); values in `layout` (module docstring).
  """
  k: tuple[jax.Array, ...] | jax.Array   # L x (B, K, S, Dh), or (L, B, K, S, Dh)
  v: tuple[jax.Array, ...] | jax.Array   # L x values in `layout`, or stacked
  lengths: jax.Array                     # (B,) int32
  layout: str = flax.struct.field(pytree_node=False, default=CPU_LAYOUT)

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k, (tuple, list))

  @property
  def capacity(self) -> int:
    return (self.k if self.stacked else self.k[0]).shape[-2]

  @property
  def num_layers(self) -> int:
    return self.k.shape[0] if self.stacked else len(self.k)

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, capacity: int, layout: str | None = None,
            stacked: bool | None = None) -> "KVCache":
    """Zeros for `capacity` slots a row. layout None: `layout_for` JAX's default
    backend; stacked None: as the model runs its layers (`cfg.scan_layers`)."""
    B, K, Dh, S, L = batch, cfg.num_kv_heads, cfg.dh, capacity, cfg.num_layers
    layout = _check_layout(layout_for(jax.default_backend()) if layout is None else layout)
    stacked = cfg.scan_layers if stacked is None else stacked
    dt = jnp.dtype(cfg.dtype)
    k_shape, v_shape = (B, K, S, Dh), ((B, K, Dh, S) if layout == CPU_LAYOUT else (B, K, S, Dh))
    if stacked:
      k, v = jnp.zeros((L, *k_shape), dt), jnp.zeros((L, *v_shape), dt)
    else:
      k = tuple(jnp.zeros(k_shape, dt) for _ in range(L))
      v = tuple(jnp.zeros(v_shape, dt) for _ in range(L))
    return cls(k=k, v=v, lengths=jnp.zeros((batch,), jnp.int32), layout=layout)


@flax.struct.dataclass
class LayerCache:
  """One attention layer's view of a cache: what `Attention` writes and reads.

  `k`, `v`: this layer's arrays, or (with `layer`, scanned layers) every layer's
  stacked arrays, of which this layer owns slice `layer`. `slots_BxT`: the slots
  the T new tokens take. `aligned`: every row's slots are the same (static; the
  write is then one dynamic-update-slice).
  """
  k: jax.Array
  v: jax.Array
  slots_BxT: jax.Array
  layer: jax.Array | None = None
  layout: str = flax.struct.field(pytree_node=False, default=CPU_LAYOUT)
  aligned: bool = flax.struct.field(pytree_node=False, default=False)

  def write(self, k_BxTxKxDh, v_BxTxKxDh) -> "LayerCache":
    """The cache with the T new keys and values written at their slots."""
    return self.replace(k=self._put(self.k, k_BxTxKxDh, "bksd"),
                        v=self._put(self.v, v_BxTxKxDh, self.layout))

  def read(self):
    """This layer's keys (B, K, S, Dh) and values (in `layout`)."""
    if self.layer is None:
      return self.k, self.v
    at = lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, 0, keepdims=False)  # noqa: E731
    return at(self.k), at(self.v)

  def _put(self, cache, new_BxTxKxDh, spec: str):
    """`cache` (one layer's (B, K, ...) array in `spec`, or the stacked ones) with
    the new tokens at their slots."""
    S, T = cache.shape[-1 if spec == CPU_LAYOUT else -2], new_BxTxKxDh.shape[1]
    new_BxKxTxDh = new_BxTxKxDh.transpose(0, 2, 1, 3).astype(cache.dtype)
    lead = () if self.layer is None else (self.layer,)
    if self.aligned and T <= S:
      return _put_aligned(cache, new_BxKxTxDh, self.slots_BxT[0, 0], lead, spec)
    B, K = new_BxKxTxDh.shape[:2]
    b, k, s = (jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None],
               self.slots_BxT[:, None, :])
    # Values (B, K, Dh, S): the Dh slice between the indices puts the indexed
    # dimensions first, so both updates are (B, K, T, Dh) (NumPy's rule).
    if spec == CPU_LAYOUT:
      return cache.at[(*lead, b, k, slice(None), s)].set(new_BxKxTxDh, mode="drop")
    return cache.at[(*lead, b, k, s)].set(new_BxKxTxDh, mode="drop")


def _put_aligned(cache, new_BxKxTxDh, start, lead: tuple, spec: str):
  """Every row's T tokens at slots start..start+T-1, as one dynamic-update-slice.

  A dynamic-update-slice moves a start past S - T back to S - T; so the window
  written begins at the clamped start, and where the slots were moved (start >
  S - T) it keeps the cache's own entries in the slots before `start` and holds
  the tokens that fit from there: slots past the capacity are dropped, as a
  scatter drops them. The window (B, K, T, Dh) is read and written, nothing more.
  """
  T = new_BxKxTxDh.shape[2]
  S = cache.shape[-1 if spec == CPU_LAYOUT else -2]
  start = start.astype(jnp.int32)
  at = jnp.minimum(start, S - T)
  shift = start - at                                         # > 0 only near the end
  j = jnp.arange(T)
  moved = jnp.take(new_BxKxTxDh, jnp.maximum(j - shift, 0), axis=2)
  zero = jnp.zeros((), jnp.int32)
  if spec == CPU_LAYOUT:                                     # (B, K, Dh, T) windows
    moved, keep = moved.transpose(0, 1, 3, 2), (j >= shift)[None, None, None, :]
    idx = (zero, zero, zero, at)
  else:
    keep, idx = (j >= shift)[None, None, :, None], (zero, zero, at, zero)
  idx = tuple(jnp.asarray(i, jnp.int32) for i in lead) + idx
  size = (1,) * len(lead) + moved.shape
  old = jax.lax.dynamic_slice(cache, idx, size).reshape(moved.shape)
  window = jnp.where(keep, moved, old)
  return jax.lax.dynamic_update_slice(cache, window.reshape(size), idx)
