"""decode.cpu_kernel=native: the C++ pass (mtcot_jax/native) against XLA's
(`api.extend` on the same out_in parameters), and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax import decode, native
from mtcot_jax.config_checks import ConfigError
from mtcot_jax.model import api
from mtcot_jax.model.transformer import KVCache

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")

S = 48   # cache slots (attention then runs its 8- and 16-slot vector loops and their tails)


def _random_cache(cfg, B, lengths, seed):
  """Keys and values drawn at random in every slot (those past a row's length
  must not be read), and the rows' lengths."""
  rng = np.random.default_rng(seed)
  empty = KVCache.empty(cfg.model, B, S)
  draw = lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype)  # noqa: E731
  return KVCache(k=tuple(map(draw, empty.k)), v=tuple(map(draw, empty.v)),
                 lengths=jnp.asarray(lengths, jnp.int32))


@pytest.mark.parametrize("variant", ["tied_f32", "untied_bias_f32", "tied_bf16"])
def test_native_pass_is_xla_pass(tiny_cfg, variant):
  """One cached pass of 1 and 4 new tokens over a cache holding random keys and
  values, rows at different lengths, one row's last new token past the capacity
  (XLA drops its write): the logits, the residual, every head source layer's
  output and the updated caches are XLA's, to float32 summation order.
  Variants: tied embeddings; untied with q/k/v biases (drawn at random, not
  their zero init); bfloat16 weights (decode.weights_dtype), which both paths
  widen to float32."""
  over = {"untied_bias_f32": {"tie_embeddings": False, "qkv_bias": True}}.get(variant, {})
  cfg = tiny_cfg.replace(model=over, decode={
      "weights_layout": "out_in", "cpu_kernel": "native",
      "weights_dtype": "bfloat16" if variant == "tied_bf16" else "float32"})
  params = mt.init_params(cfg, jax.random.key(1))
  if cfg.model.qkv_bias:   # non-zero biases, the size of the projections' outputs
    rng = np.random.default_rng(2)
    params["main"] = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(size=x.shape), x.dtype)
        if "bias" in str(p[-1]) else x, params["main"])
  params = decode.prepare_params(cfg, params).params
  for T in (1, 4):   # 2 and 8 rows a pass (the kernel takes rows 8 at a time)
    cache = _random_cache(cfg, 2, [3, S - 2], seed=T)
    block = jnp.asarray(np.random.default_rng(T).integers(0, cfg.model.vocab_size, (2, T)),
                        jnp.int32)
    want = jax.jit(lambda p, c, b: api.extend(cfg, p, c, b, out_in=True))(params, cache, block)
    got = jax.jit(lambda p, c, b: native.extend(cfg, p, c, b, source_layers=(0, -1)))(
        params, cache, block)
    # The same float32 products summed in another order (and 1/sqrt against
    # rsqrt): ~1.2e-7 times the magnitudes summed per reduction (at most 64
    # terms here), through 2 layers; every value compared is below 10 in
    # magnitude, so ~1e-5 at worst.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    close(got.logits, want.logits)
    close(got.residual, want.residual)
    assert len(got.sources) == 2
    jax.tree.map(close, got.sources, want.sources)
    jax.tree.map(close, got.cache.k, want.cache.k)
    jax.tree.map(close, got.cache.v, want.cache.v)
    np.testing.assert_array_equal(got.cache.lengths, want.cache.lengths)
    # and the slots the pass does not write keep their random contents
    np.testing.assert_array_equal(got.cache.k[0][0, :, 3 + T:], cache.k[0][0, :, 3 + T:])


def test_native_config_errors(tiny_cfg, tiny_params):
  """The settings the kernel does not compute are refused by name, before any
  compile: the stored in_out layout, a bfloat16 compute dtype, a mesh."""
  with pytest.raises(ConfigError, match="decode.weights_layout='in_out'"):
    tiny_cfg.replace(decode={"cpu_kernel": "native"})
  with pytest.raises(ConfigError, match="model.dtype='bfloat16'"):
    tiny_cfg.replace(model={"dtype": "bfloat16"},
                     decode={"cpu_kernel": "native", "weights_layout": "out_in"})
  with pytest.raises(ConfigError, match="decode.cpu_kernel='triton'"):
    tiny_cfg.replace(decode={"cpu_kernel": "triton"})
  cfg = tiny_cfg.replace(decode={"cpu_kernel": "native", "weights_layout": "out_in"})
  mesh = mt.make_mesh(cfg)
  with pytest.raises(ValueError, match="decode.cpu_kernel=native runs on one CPU device"):
    decode.generate(cfg, tiny_params, np.ones((1, 2), np.int32), np.array([2]),
                    jax.random.key(0), mesh=mesh)
