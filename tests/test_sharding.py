"""Sharded runs on 8 forced CPU devices (in a subprocess: XLA_FLAGS must precede jax)."""

import os
import subprocess
import sys

import pytest

import mtcot_jax as mt
from conftest import subprocess_env
from mtcot_jax.sharding import mesh_shape

HERE = os.path.dirname(__file__)


def test_eight_device_checks():
  env = subprocess_env(xla_flags="--xla_force_host_platform_device_count=8",
                       JAX_PLATFORMS="cpu")
  # Compiled here, not loaded from the persistent cache: with the 8-device
  # executables loaded from it (a second run on one machine), the vocab-chunk
  # train step's in-process collectives (XLA:CPU) stopped at a rendezvous
  # timeout, 3 times in 3 runs, where compiling them passed every time
  # (2026-12-08; the compiles cost about what loading them saved).
  del env["JAX_COMPILATION_CACHE_DIR"], env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]
  proc = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_checks.py")],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
  passed = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")}
  assert {"forward_matches_one_device", "params_sharded_by_rules", "mesh_and_batch_errors",
          "decode_under_mesh", "train_step_matches_one_device", "restore_on_other_meshes",
          "memory_planner_matches_shards", "context_head_under_mesh",
          "gguf_lands_on_its_shardings", "splash_under_mesh", "vocab_chunks_under_mesh",
          "hf_shards_land_on_their_shardings"} <= passed, proc.stdout


@pytest.mark.parametrize("shape,devices,want", [
    ((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 2), 8, (2, 2, 2)), ((1, 1, -1), 4, (1, 1, 4)),
    ((2, 2, 2), 8, (2, 2, 2))])
def test_mesh_shape_fill(shape, devices, want):
  cfg = mt.load_config(None, [f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}",
                              f"mesh.tensor={shape[2]}"])
  assert mesh_shape(cfg.mesh, devices) == want
