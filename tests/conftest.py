"""Shared tiny configs and parameters: few distinct shapes, so few compiles."""

import os

import jax
import pytest

import mtcot_jax as mt

TINY = [
    "model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "model.mlp_dim=64",
    "head.k=5", "head.width=16", "head.num_heads=2", "head.mlp_dim=32",
    "head.source_layers=[0,-1]",
    "train.batch_size=8",
]


@pytest.fixture(scope="session")
def tiny_cfg():
  return mt.load_config(None, TINY)


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
  return mt.init_params(tiny_cfg, jax.random.key(0))


def pytest_configure(config):
  # Compiles dominate test time on a CPU: share them across the runs in this
  # session (train() builds a new jitted step per call) through XLA's cache.
  cache = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax")
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
