"""Fused attention for the teacher-forced pass, chosen by `model.attention`.

The teacher-forced (full-sequence, no cache) main blocks run one of:
- `xla`: `Attention.attend`'s einsums (the (B, K, G, T, T) float32 scores
  materialised; the reference the kernels are tested against);
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's flash
  attention on a GPU (bfloat16/float16 only);
- `splash`: Pallas's splash attention kernel for TPUs (`splash_interpret`: the same
  kernel through Pallas's interpreter off a TPU, for tests: correct but slow).
`auto` is cudnn on a GPU (where the dtype and head size fit), splash on a TPU
(sequences of a multiple of 128), xla elsewhere: `resolve_attention`.

Cached passes (decoding, prefill) and the head's short chains always run the xla
path. The mask the kernels take is `CausalSegments` (causal within packed
segments), not the dense (B, T, T) array: each kernel builds its own.
Shapes: B batch, T positions, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from mtcot_jax.config import ModelConfig
from mtcot_jax.sharding import Sharder, logical_spec

CUDNN_DTYPES = ("bfloat16", "float16")   # cuDNN's flash attention takes no float32
SPLASH_BLOCK = 128                        # splash tiles are multiples of the TPU's 128 lanes


@flax.struct.dataclass
class CausalSegments:
  """The teacher-forced mask, described: query t sees keys s <= t of its own packed
  segment (`segment_ids_BxT` None: each row one segment)."""
  segment_ids_BxT: jax.Array | None

  def dense(self, T: int) -> jax.Array:
    """(B, T, T) bool, or (1, T, T) without segment ids."""
    idx = jnp.arange(T)
    causal_1xTxT = (idx[:, None] >= idx[None, :])[None]
    if self.segment_ids_BxT is None:
      return causal_1xTxT
    seg = self.segment_ids_BxT
    return causal_1xTxT & (seg[:, :, None] == seg[:, None, :])


def cudnn_fits(model: ModelConfig, max_head_dim: int = 128) -> bool:
  """Whether cuDNN's flash attention takes this model: a bfloat16/float16 compute
  dtype and a head dim that is a multiple of 8 up to `max_head_dim` (128 on every
  GPU cuDNN supports, 256 from Hopper on)."""
  return model.dtype in CUDNN_DTYPES and model.dh % 8 == 0 and model.dh <= max_head_dim


def resolve_attention(model: ModelConfig, platform: str, length: int) -> str:
  """The attention the teacher-forced pass of `length` positions runs on `platform`
  (jax's platform name: cpu, gpu, tpu): xla, cudnn, splash or splash_interpret.

  `auto`: cudnn on a GPU if `cudnn_fits`, splash on a TPU if `length` is a multiple
  of 128, else xla. An explicit `cudnn` off a GPU, or `splash` with a length that is
  not a multiple of 128, raises ValueError; an explicit `splash` off a TPU runs
  the interpreter (`splash_interpret`).
  """
  name = model.attention
  if name == "auto":
    if platform == "gpu" and cudnn_fits(model):
      return "cudnn"
    if platform == "tpu" and length % SPLASH_BLOCK == 0:
      return "splash"
    return "xla"
  if name == "cudnn" and platform != "gpu":
    raise ValueError(f"model.attention='cudnn' needs a GPU; this program runs on "
                     f"{platform!r}. Accepted there: model.attention=auto or xla")
  if name == "splash":
    if length % SPLASH_BLOCK:
      raise ValueError(f"model.attention='splash' needs a sequence length that is a multiple "
                       f"of {SPLASH_BLOCK}; got {length}. Accepted: such a length, or "
                       "model.attention=auto (xla there) or xla")
    return "splash" if platform == "tpu" else "splash_interpret"
  return name


def dot_product_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask: CausalSegments,
                          implementation: str | None = "cudnn") -> jax.Array:
  """`jax.nn.dot_product_attention` over q already scaled by Dh^-1/2 (scale 1), GQA
  (H a multiple of K, query head h reading kv head h // (H/K)), causal. Its API
  takes no segment ids: packing goes in as a (B, 1, T, T) boolean mask, which
  cuDNN adds as a bias (MaxText's cuDNN paths do the same or drop packing).
  Returns (B, T, H, Dh)."""
  T = q_BxTxHxDh.shape[1]
  seg_mask = None if mask.segment_ids_BxT is None else mask.dense(T)[:, None]
  return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask=seg_mask,
                                      scale=1.0, is_causal=True,
                                      implementation=implementation)


def _splash_block(T: int) -> int:
  # MaxText's default tiles are 512 (sa_block_q); shorter sequences take the
  # largest multiple of 128 that divides them.
  return next(b for b in (512, 256, SPLASH_BLOCK) if T % b == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(H: int, T: int, interpret: bool):
  """Splash attention for H heads over T positions, causal. The mask's block
  tables are numpy work, made once per shape; kept as concrete arrays."""
  b = _splash_block(T)
  blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                             block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                             block_kv_dq=b)
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((T, T)) for _ in range(H)])
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                  interpret=interpret)


def splash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask: CausalSegments,
                     interpret: bool = False, shard: Sharder = Sharder()) -> jax.Array:
  """Pallas splash attention (causal, GQA, packed segments by their ids) over q
  already scaled by Dh^-1/2; T a multiple of 128. The kernel sees one sequence's
  (heads, T, Dh) and is vmapped over the batch; with a mesh it runs under
  `shard_map`, each device on its batch rows and heads (a Pallas call has no
  partitioning rule of its own). Returns (B, T, H, Dh)."""
  args = (q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh)
  if mask.segment_ids_BxT is not None:
    args += (mask.segment_ids_BxT,)

  def run(q, k, v, *seg):
    kernel = _splash_kernel(q.shape[2], q.shape[1], interpret)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  (B, N, T, Dh)
    one = lambda q, k, v, *s: kernel(  # noqa: E731
        q, k, v, segment_ids=splash.SegmentIds(s[0], s[0]) if s else None)
    return heads_first(jax.vmap(one)(heads_first(q), heads_first(k), heads_first(v), *seg))

  if shard.mesh is None:
    return run(*args)
  spec = lambda *names: logical_spec(names, shard.rules)  # noqa: E731
  q_spec = spec("batch", None, "act_heads", None)
  kv_spec = spec("batch", None, "act_kv_heads", None)
  specs = (q_spec, kv_spec, kv_spec, spec("batch", None))[:len(args)]
  return jax.shard_map(run, mesh=shard.mesh, in_specs=specs, out_specs=q_spec,
                       check_vma=False)(*args)


def fused_attention(implementation: str, q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh,
                    mask: CausalSegments, shard: Sharder = Sharder()) -> jax.Array:
  """The resolved non-xla `implementation` (cudnn, splash, splash_interpret) over q
  already scaled by Dh^-1/2. Returns (B, T, H, Dh) in q's dtype."""
  if implementation == "cudnn":
    return dot_product_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask, "cudnn")
  if implementation in ("splash", "splash_interpret"):
    return splash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask,
                            interpret=implementation == "splash_interpret", shard=shard)
  raise ValueError(f"fused attention {implementation!r} is not one of: cudnn, splash, "
                   "splash_interpret")

