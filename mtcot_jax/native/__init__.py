"""decode.cpu_kernel=native: the main model's cached passes as one hand-written
C++ kernel on the CPU (`decode_step.cc`), for the one-token loops at small batch.

XLA:CPU runs a one-token pass of the 25M model as well over a hundred thunks
(162 dots alone), each with microseconds of dispatch; the kernel runs it as 5 phases a layer on a pool of
persistent threads, and its attention reads each kv head's keys and values once
(docs/results.md, "A native CPU pass"). It computes what `Transformer.__call__`
with a cache computes, in float32, from the (out, in) weights of
`api.to_out_in` (float32 or bfloat16); the float32 sums are ordered
differently, so logits agree with XLA's to float32 rounding, not bit for bit.

The kernel is compiled on first use with the system's C++ compiler ($CXX, else
g++, else clang++) for this CPU (-march=native) into a cache directory
($MTCOT_NATIVE_CACHE, else ~/.cache/mtcot_jax/native), keyed by the source, the
flags, the compiler, JAX's FFI headers and the CPU's features; a build is
written to a temporary file and renamed into place. g++ and clang++ both build
it (tests/test_native.py builds and checks it with each one present); their
builds agree with each other to float32 rounding, not bit for bit, as each fuses
different multiply-adds (-ffp-contract=fast; with it off they are identical).
MTCOT_NATIVE_THREADS sets the threads a pass runs on (default: the CPUs the
process may use, at most 32).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from mtcot_jax.config import Config
from mtcot_jax.model.layers import rope_frequencies
from mtcot_jax.model.kv_cache import CPU_LAYOUT, KVCache
from mtcot_jax.model.transformer import MainOutput

TARGET = "mtcot_native_decode_step"
# Passes of more rows (batch x new tokens) run XLA's path: the kernel computes
# them as dot products, arithmetic-bound past ~8 rows on a CPU core, where XLA's
# matrix kernels (YNNPACK) are faster (docs/results.md); the prefill too.
MAX_ROWS = 8
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_step.cc")
# No -ffast-math: the kernel orders its sums itself (explicit vector accumulators)
# and its exp's range reduction must not be reassociated.
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
          "-ffp-contract=fast", "-pthread", "-w"]


def compiler() -> str | None:
  """The C++ compiler the kernel is built with: $CXX, else g++, else clang++."""
  for name in (os.environ.get("CXX"), "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_features() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line
  except OSError:
    pass
  return platform.processor()


def _library_path() -> str:
  cxx = compiler()
  if cxx is None:
    raise RuntimeError(
        "decode.cpu_kernel=native needs a C++ compiler to build its kernel ($CXX, g++ or "
        "clang++); none was found. Accepted: install one, or decode.cpu_kernel=xla")
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
  include = jax.ffi.include_dir()
  with open(_SOURCE, "rb") as f:
    source = f.read()
  with open(os.path.join(include, "xla", "ffi", "api", "c_api.h"), "rb") as f:
    header = f.read()
  key = hashlib.sha256(b"\0".join([source, header, " ".join(_FLAGS).encode(), version.encode(),
                                   platform.machine().encode(), _cpu_features().encode()]))
  cache = os.environ.get("MTCOT_NATIVE_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mtcot_jax", "native")
  os.makedirs(cache, exist_ok=True)
  path = os.path.join(cache, f"decode_step-{key.hexdigest()[:16]}.so")
  if not os.path.exists(path):
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
      res = subprocess.run([cxx, *_FLAGS, f"-I{include}", _SOURCE, "-o", tmp],
                           capture_output=True, text=True)
      if res.returncode != 0:
        raise RuntimeError(f"building the native decode kernel failed ({cxx}):\n{res.stderr}")
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return path


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
  """Builds (once per machine and source) and registers the kernel; returns the library."""
  lib = ctypes.cdll.LoadLibrary(_library_path())
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MtcotDecodeStep), platform="cpu")
  return lib


def threads() -> int:
  """The threads a native pass runs on (starts the kernel's thread pool)."""
  return int(load().MtcotNativeThreads())


def extend(cfg: Config, params, cache: KVCache, tokens_BxT, num_new_B=None,
           source_layers=(-1,)) -> MainOutput:
  """`api.extend`'s result for (out, in) parameters in the plain layer layout
  (`decode.prepare_params` with decode.cpu_kernel=native), from the kernel.
  CPU only; traced inside the caller's jit (the kernel must be loaded: `load`)."""
  load()
  m = cfg.model
  main = params["main"]
  if cache.stacked or cache.layout != CPU_LAYOUT:
    raise ValueError(
        f"decode.cpu_kernel=native reads one cache array a layer with values (B, K, Dh, S) "
        f"(layout {CPU_LAYOUT!r}); got stacked={cache.stacked}, layout={cache.layout!r}. "
        "Accepted: decode.backend.empty_cache with the native config")
  if "layer_0" not in main:
    raise ValueError(
        f"decode.cpu_kernel=native reads the plain layer layout (layer_0, layer_1, ...); the "
        f"main parameters have keys {sorted(main)}. Accepted: decode.prepare_params with the "
        "native config (it unstacks scanned layers), or the parameters themselves")
  B, T = tokens_BxT.shape
  L, H, K, Dh = m.num_layers, m.num_heads, m.num_kv_heads, m.dh
  pos_BxT = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  ang = pos_BxT.astype(jnp.float32)[..., None] * rope_frequencies(Dh, m.rope_theta,
                                                                   m.rope_scaling)
  args = [tokens_BxT.astype(jnp.int32), cache.lengths, jnp.cos(ang), jnp.sin(ang), main["embed"],
          main["final_norm"]["scale"]]
  if not m.tie_embeddings:
    args.append(main["unembed"])
  for i in range(L):
    p = main[f"layer_{i}"]
    a = p["attn"]
    args += [p["attn_norm"]["scale"], a["q"], a["k"], a["v"]]
    if m.qkv_bias:
      args += [a["q_bias"], a["k_bias"], a["v_bias"]]
    args += [a["o"], p["mlp_norm"]["scale"], p["mlp"]["gate"], p["mlp"]["up"], p["mlp"]["down"]]
  wdt = main["embed"].dtype
  for w in args[4:]:
    if w.ndim >= 2 and w.dtype != wdt:
      raise ValueError(f"the native kernel reads one weight dtype; got {w.dtype} beside {wdt}")
  n_in = len(args)
  args += list(cache.k) + list(cache.v)
  src = [int(s) % L for s in source_layers]
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  out_types = ([f32((B, T, m.vocab_size)), f32((B, T, m.d_model))]
               + [f32((B, T, m.d_model)) for _ in src]
               + [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*cache.k, *cache.v)])
  first_cache = 2 + len(src)
  aliases = {n_in + i: first_cache + i for i in range(2 * L)}
  outs = jax.ffi.ffi_call(TARGET, out_types, input_output_aliases=aliases)(
      *args, num_layers=np.int64(L), num_heads=np.int64(H), num_kv_heads=np.int64(K),
      tied=bool(m.tie_embeddings), has_bias=bool(m.qkv_bias), eps=np.float32(m.norm_eps),
      sources=np.asarray(src, np.int64))
  logits, x = outs[0], outs[1]
  sources = tuple(outs[2:first_cache])
  new_k, new_v = outs[first_cache:first_cache + L], outs[first_cache + L:]
  num_new_B = jnp.full((B,), T, jnp.int32) if num_new_B is None else num_new_B
  new_cache = cache.replace(k=tuple(new_k), v=tuple(new_v),
                            lengths=cache.lengths + num_new_B.astype(jnp.int32))
  return MainOutput(logits, x, sources, new_cache)
