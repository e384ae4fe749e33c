"""decode.cpu_kernel=native: the C++ pass (mtcot_jax/native) against XLA's
(`api.extend` on the same out_in parameters), and its errors."""

import os
import platform
import shutil
import subprocess
import sys

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


def _case(tiny_cfg, variant):
  """The config and prepared (out, in) parameters of a variant: tied embeddings
  (tied_f32), untied with q/k/v biases drawn at random, not their zero init
  (untied_bias_f32), bfloat16 weights (tied_bf16)."""
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
  return cfg, decode.prepare_params(cfg, params).params


def _inputs(cfg, T):
  """A cache of 2 rows at lengths 3 and S - 2 (random keys and values) and T new tokens a row."""
  cache = _random_cache(cfg, 2, [3, S - 2], seed=T)
  block = jnp.asarray(np.random.default_rng(T).integers(0, cfg.model.vocab_size, (2, T)),
                      jnp.int32)
  return cache, block


def _xla(cfg, params, cache, block):
  return jax.jit(lambda p, c, b: api.extend(cfg, p, c, b, out_in=True))(params, cache, block)


def _native(cfg, params, cache, block):
  return jax.jit(lambda p, c, b: native.extend(cfg, p, c, b, source_layers=(0, -1)))(
      params, cache, block)


def _assert_is_xla(got, want, cache, T):
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


@pytest.mark.parametrize("variant", ["tied_f32", "untied_bias_f32", "tied_bf16"])
def test_native_pass_is_xla_pass(tiny_cfg, variant):
  """One cached pass of 1 and 4 new tokens over a cache holding random keys and
  values, rows at different lengths, one row's last new token past the capacity
  (XLA drops its write): the logits, the residual, every head source layer's
  output and the updated caches are XLA's, to float32 summation order.
  Variants (`_case`): tied embeddings; untied with q/k/v biases; bfloat16
  weights (decode.weights_dtype), which both paths widen to float32."""
  cfg, params = _case(tiny_cfg, variant)
  for T in (1, 4):   # 2 and 8 rows a pass (the kernel takes rows 8 at a time)
    cache, block = _inputs(cfg, T)
    _assert_is_xla(_native(cfg, params, cache, block), _xla(cfg, params, cache, block), cache, T)


# Run by test_native_builds_with_each_compiler in a fresh process (argv: this
# directory, the directory holding the caller's mtcot_jax, the variants, the
# output .npz): the kernel built with $CXX into $MTCOT_NATIVE_CACHE, its passes'
# results saved for the caller to compare.
_CHILD = """
import sys
sys.path[:0] = sys.argv[1:3]
import numpy as np
import jax
import conftest
import test_native as t
import mtcot_jax as mt
from mtcot_jax import native
tiny_cfg = mt.load_config(None, conftest.TINY)
out = {"threads": np.int64(native.threads()), "compiler": native.compiler()}
for variant in sys.argv[3].split(","):
  cfg, params = t._case(tiny_cfg, variant)
  for i, leaf in enumerate(jax.tree.leaves(t._native(cfg, params, *t._inputs(cfg, 4)))):
    out[f"{variant}_{i}"] = np.asarray(leaf)
np.savez(sys.argv[4], **out)
"""


@pytest.mark.parametrize("cxx", ["g++", "clang++"])
def test_native_builds_with_each_compiler(tiny_cfg, cxx, tmp_path):
  """The kernel builds with g++ and with clang++ (the compilers
  `native.compiler` may pick), loads, starts its thread pool and computes XLA's
  pass (4 new tokens a row: 8 rows, the kernel's 8-row path) with float32 and
  bfloat16 weights. This process's compiler is checked here on the build it has
  loaded; another one in a fresh process building into an empty cache (one
  process cannot register a second library under the same FFI target)."""
  if platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip(f"compilers checked on x86-64 only, not {platform.machine()}")
  if shutil.which(cxx) is None:
    pytest.skip(f"{cxx} not installed")
  variants = ["tied_f32", "tied_bf16"]
  if shutil.which(cxx) == native.compiler():
    got = {"threads": native.threads(), "compiler": native.compiler()}
    for variant in variants:
      cfg, params = _case(tiny_cfg, variant)
      for i, leaf in enumerate(jax.tree.leaves(_native(cfg, params, *_inputs(cfg, 4)))):
        got[f"{variant}_{i}"] = np.asarray(leaf)
  else:
    cache_dir, out = tmp_path / "cache", tmp_path / "out.npz"
    env = dict(os.environ, CXX=cxx, MTCOT_NATIVE_CACHE=str(cache_dir))
    if jax.config.jax_compilation_cache_dir:   # the session's XLA cache (conftest): ~3 s less
      env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
      env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(
          jax.config.jax_persistent_cache_min_compile_time_secs)
    root = os.path.dirname(os.path.dirname(os.path.abspath(mt.__file__)))
    res = subprocess.run([sys.executable, "-c", _CHILD, os.path.dirname(os.path.abspath(__file__)),
                          root, ",".join(variants), str(out)], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    assert len(list(cache_dir.glob("decode_step-*.so"))) == 1   # built there, with cxx
    got = dict(np.load(out))
  assert str(got["compiler"]) == shutil.which(cxx)
  assert int(got["threads"]) >= 1
  for variant in variants:
    cfg, params = _case(tiny_cfg, variant)
    cache, block = _inputs(cfg, 4)
    want = _xla(cfg, params, cache, block)
    leaves, tree = jax.tree.flatten(want)
    native_out = jax.tree.unflatten(tree, [got[f"{variant}_{i}"] for i in range(len(leaves))])
    print(f"{cxx} {variant}: max |logits - XLA's| = "
          f"{np.max(np.abs(native_out.logits - np.asarray(want.logits))):.3g}")
    _assert_is_xla(native_out, want, cache, 4)


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


def test_native_kernel_loads_only_for_a_cpu_target(tiny_cfg, monkeypatch):
  """decode.cpu_kernel=native on an accelerator host: the decoder runs XLA's pass
  there and never builds or loads the kernel (a host without a C++ compiler must
  not fail on a kernel it would never run). The platform is faked: no GPU here."""
  from mtcot_jax.decode import backend
  cfg = tiny_cfg.replace(decode={"cpu_kernel": "native", "weights_layout": "out_in"})

  def refuse():
    raise AssertionError("native.load() called for a non-CPU target")
  monkeypatch.setattr(native, "load", refuse)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not backend.uses_native(cfg, None)
  extend = backend.extend_fn(cfg, None)
  assert extend.func is api.extend and extend.keywords["out_in"]
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert backend.uses_native(cfg, None)
  with pytest.raises(AssertionError, match="non-CPU target"):
    backend.extend_fn(cfg, None)
