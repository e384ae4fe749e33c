"""Shared tiny configs and parameters: few distinct shapes, so few compiles."""

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
