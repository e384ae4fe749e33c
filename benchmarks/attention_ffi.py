"""An experiment: one-token GQA attention as a hand-written XLA FFI kernel, against
XLA's own path (`Attention._one_token`: one mat-vec per query head), CPU only.

    .venv/bin/python benchmarks/attention_ffi.py            # needs g++ (not a dependency)

Builds benchmarks/gqa_ffi.cc twice (1 and 2 threads; -O3 -march=native -ffast-math)
into a temporary directory, then times 8 layers of attention chained (the 25M
config's shapes: 4 kv heads x 2 query heads, head_dim 64, distinct caches per
layer, 36 MB at 2,178 slots: more than the 32 MB L3 here) at a short and a long
cache, the variants alternating, and checks the outputs agree. Not used by
mtcot_jax: docs/results.md ("A hand-written attention kernel") says why.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import common  # noqa: F401  (puts the repository root on sys.path)
from mtcot_jax.model.layers import Attention

B, K, G, DH, LAYERS = 1, 4, 2, 64, 8


def build(tmp: str) -> dict[str, str]:
  src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gqa_ffi.cc")
  names = {}
  for nt in (1, 2):
    out = os.path.join(tmp, f"libgqa{nt}.so")
    subprocess.run(["g++", "-O3", "-march=native", "-ffast-math", "-std=c++17", "-shared",
                    "-fPIC", f"-DNTHREADS={nt}", "-w", f"-I{jax.ffi.include_dir()}", src, "-o",
                    out], check=True)
    lib = ctypes.cdll.LoadLibrary(out)
    names[f"kernel, {nt} thread{'s' if nt > 1 else ''}"] = f"mtcot_gqa{nt}"
    jax.ffi.register_ffi_target(f"mtcot_gqa{nt}", jax.ffi.pycapsule(lib.GqaDecode),
                                platform="cpu")
  return names


def xla_path(mask):
  """mtcot_jax's own one-token path (mask: (B, S))."""
  return lambda q, k, v: Attention._one_token(q, k, v, mask[:, None])


def kernel(target: str, mask):
  def f(q, k, v):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))(q, k, v, mask)
  return f


def chained(f):
  def run(q, ks, vs):
    for k, v in zip(ks, vs):       # one layer's attention feeds the next (a dependency)
      q = 0.5 * f(q, k, v) + 0.5 * q
    return q
  return jax.jit(run)


def main() -> None:
  if jax.default_backend() != "cpu":
    sys.exit("a CPU experiment: run it with the CPU backend")
  with tempfile.TemporaryDirectory() as tmp:
    targets = build(tmp)
    rng = np.random.default_rng(0)
    print(f"# jax {jax.__version__}, {os.cpu_count()} cores; 8 layers of one-token attention, "
          f"{K} kv heads x {G} query heads, head_dim {DH}; median of 40 alternating rounds")
    for S in (258, 2178):
      ks = [jnp.asarray(rng.standard_normal((B, K, S, DH)), jnp.float32) for _ in range(LAYERS)]
      vs = [jnp.asarray(rng.standard_normal((B, K, DH, S)), jnp.float32) for _ in range(LAYERS)]
      q = 0.3 * jnp.asarray(rng.standard_normal((B, K, G, DH)), jnp.float32)
      mask = jnp.asarray(np.arange(S) < S - 70)[None]
      fns = {"XLA (one mat-vec per query head)": chained(xla_path(mask))}
      fns.update({name: chained(kernel(t, mask)) for name, t in targets.items()})
      ref = np.asarray(fns["XLA (one mat-vec per query head)"](q, ks, vs))
      times = {name: [] for name in fns}
      for name, f in fns.items():
        err = float(np.abs(np.asarray(f(q, ks, vs)) - ref).max())
        assert err < 1e-5, (name, err)
      for _ in range(40):
        for name, f in fns.items():
          t0 = time.perf_counter()
          jax.block_until_ready(f(q, ks, vs))
          times[name].append(time.perf_counter() - t0)
      nbytes = sum(x.nbytes for x in ks + vs)
      base = statistics.median(times["XLA (one mat-vec per query head)"])
      print(f"\n{S} cache slots ({nbytes / 1e6:.1f} MB of keys and values):")
      for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:34s} {1e3 * m:6.3f} ms  {nbytes / m / 1e9:5.1f} GB/s  {base / m:4.2f}x XLA")


if __name__ == "__main__":
  main()
