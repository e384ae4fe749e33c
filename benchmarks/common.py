"""Shared helpers for the timing scripts: a median timer and the machine's matmul rate.

Every benchmark reports its rate as a ratio to `matmul_flops()` measured in the
same run, so numbers from different machines (or a busy one) stay comparable.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Runnable as `python benchmarks/<name>.py` from the repo root without installing.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)


def time_fn(fn: Callable[..., Any], *args, warmup: int = 2, repeats: int = 5) -> dict[str, float]:
  """Seconds per call of `fn(*args)`: warm-up calls (compile included), then
  `repeats` timed calls, each ended by `jax.block_until_ready`.

  Returns {"median", "min", "max"} in seconds.
  """
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """FLOP/s of one jitted (n, n) @ (n, n) matmul, best of `repeats` (2 n^3 FLOPs)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(jnp.matmul)
  t = time_fn(f, a, b, warmup=2, repeats=repeats)["min"]
  return 2.0 * n ** 3 / t


def time_with_matmul_probe(fn: Callable[..., Any], *args, warmup: int = 1, repeats: int = 5,
                           n: int = 2048) -> dict[str, Any]:
  """Like `time_fn`, but measures the (n, n) matmul rate before and after every timed
  call, so a rate can be divided by the matmul rate of the same moment.

  Also records process CPU time: on cores shared with other processes, wall time
  counts the time we are descheduled, CPU time does not, so a ratio of CPU-time
  rates is the steadier estimate on a busy machine (spin-waiting threads bias it).

  Returns {"median": wall seconds, "times": [wall s], "mm": [FLOP/s around each call],
  "cpu": [CPU s], "mm_cpu": [FLOP per CPU second of the matmul around each call]}.
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a, b = jax.random.normal(ka, (n, n)), jax.random.normal(kb, (n, n))
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, b))

  def probe() -> tuple[float, float]:
    wall, cpu = float("inf"), float("inf")
    for _ in range(2):
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(mm(a, b))
      wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return 2.0 * n ** 3 / wall, 2.0 * n ** 3 / cpu

  for _ in range(max(warmup, 1)):
    jax.block_until_ready(fn(*args))
  rates, times, cpus = [probe()], [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
    rates.append(probe())
  around = lambda i: [(rates[j][i] + rates[j + 1][i]) / 2 for j in range(repeats)]  # noqa: E731
  return {"median": statistics.median(times), "times": times, "mm": around(0),
          "cpu": cpus, "mm_cpu": around(1)}


def xla_flops(compiled) -> float | None:
  """XLA's own FLOP count from a compiled executable's cost analysis (None if absent)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 -- some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def cpu_info() -> str:
  """A one-line description of the backend and the host's cores."""
  return (f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{len(jax.devices())} device(s), {os.cpu_count()} host cores")


# ----------------------------------------------------------------------------- op profile
# Where a jitted step's time goes, per XLA instruction: the host profiler records
# one event per executed thunk (named like the HLO instruction), and the compiled
# HLO text says what each instruction is (a dot, a copy, an elementwise fusion)
# and which source op it came from (its op_name metadata).

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\((.*)$")


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(",") if d)


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, Any]]:
  """name -> {opcode, op_name, dot_flops, kinds, shapes} for every instruction of a
  compiled module.

  For a fusion, `dot_flops` sums the dots inside its fused computation
  (2 * output elements * contracted size), `kinds` lists the opcodes inside and
  `shapes` the shapes of its instructions.
  """
  shapes, instrs, comps, comp = {}, {}, {}, None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      comp = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else "ENTRY"
      comps[comp] = []
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, _, dims, opcode, rest = m.groups()
    shapes[name] = _dims(dims)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    info = {"opcode": opcode, "op_name": op_name.group(1) if op_name else "",
            "rest": rest, "comp": comp}
    instrs[name] = info
    if comp is not None:
      comps[comp].append(name)

  def dot_flops(name: str) -> float:
    info = instrs[name]
    operands = re.findall(r"%([\w.\-]+)", info["rest"].split(")")[0])
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", info["rest"])
    lhs = shapes.get(operands[0], ()) if operands else ()
    k = math.prod(lhs[int(d)] for d in _dims(contract.group(1))) if contract and lhs else 0
    return 2.0 * math.prod(shapes[name]) * k

  for name, info in instrs.items():
    inner = [name]
    called = re.search(r"calls=%([\w.\-]+)", info["rest"])
    if info["opcode"] == "fusion" and called:
      inner = comps.get(called.group(1), [])
      # The fusion's source op: its root's metadata if the fusion itself has none.
      if not info["op_name"] and inner:
        info["op_name"] = instrs[inner[-1]]["op_name"]
    info["kinds"] = sorted({instrs[i]["opcode"] for i in inner})
    info["shapes"] = sorted({shapes[i] for i in inner} | {shapes[name]})
    info["dot_flops"] = sum(dot_flops(i) for i in inner if instrs[i]["opcode"] == "dot")
  return instrs


def op_times(fn: Callable[..., Any], *args, repeats: int = 1) -> dict[str, float]:
  """Seconds spent in each executed XLA instruction over `repeats` calls of `fn(*args)`
  (summed over threads, so the total can exceed the wall time when ops overlap)."""
  import collections
  import glob
  import tempfile

  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
  times = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for ev in line.events:
        if "ThunkExecutor" not in ev.name:
          times[ev.name] += ev.duration_ns * 1e-9 / repeats
  return dict(times)


# Nominal peak memory bandwidth of accelerators the GPU script may meet, bytes/s.
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def memory_bandwidth(nbytes: int, repeats: int = 30) -> float:
  """Bytes/s of a jitted float32 mat-vec over an array of about `nbytes` (a
  weight-sized read): what one decode pass, which reads every weight once, is
  bounded by on this machine. The best of `repeats` warm calls: what the memory
  delivers; on a shared machine the median moves with the neighbours' load
  (42-77 GB/s between runs of benchmarks/decode.py on the 2-core CPU)."""
  cols = 4096
  rows = max(nbytes // (4 * cols), 1)
  w = jnp.ones((rows, cols), jnp.float32)
  x = jnp.ones((cols,), jnp.float32)
  t = time_fn(jax.jit(lambda w, x: w @ x), w, x, repeats=repeats)["min"]
  return w.nbytes / t


def nominal_bandwidth() -> tuple[str, float] | None:
  """(name, bytes/s) of the first device when it is a GPU we know, else None."""
  kind = getattr(jax.devices()[0], "device_kind", "")
  for name, bw in NOMINAL_BANDWIDTH.items():
    if name in kind:
      return name, bw
  return None

