"""mtcot_jax: multi-token chain of thought in JAX.

    import mtcot_jax as mt
    cfg = mt.load_config("configs/demo.yaml", ["head.k=5"])
    params = mt.init_params(cfg, jax.random.key(0))
    out = mt.forward(cfg, params, tokens)
    res = mt.generate(cfg, params, prompt_tokens, prompt_lengths, key, k=5)
    hf = mt.load_hf("hf_llama_dir", ["head.k=5"])      # Hugging Face Llama / Qwen2 in
    hf = mt.load_gguf("model.gguf", ["head.k=5"])      # a llama.cpp GGUF file in
    mt.save_hf(run, "out_dir")                          # ... and out

`import mtcot_jax` reads jax, flax, numpy and yaml only: the data stack
(sentencepiece, and tensorflow-datasets / grain behind it) comes with the first
use of `mt.encode_prompt`, `mt.get_task` or `mt.load_tokenizer`, orbax with the
first `mt.load_run` (`__getattr__` below), so that the model, decoding and the
training step run where only jax, flax, optax, orbax and chex are installed.
"""

import importlib

from mtcot_jax.config import Config, ConfigError, load_config, save_config
from mtcot_jax.decode import DecodeParams, GenerateResult, generate, make_generate, prepare_params
from mtcot_jax.hf import load_gguf, load_hf, save_hf
from mtcot_jax.model import (ForwardOutput, KVCache, extend, forward, head_logits, init_params,
                             param_shardings, param_specs)
from mtcot_jax.sharding import make_mesh

# name -> the module that defines it, imported on first use.
_LAZY = {"encode_prompt": "mtcot_jax.data", "get_task": "mtcot_jax.data",
         "load_tokenizer": "mtcot_jax.data", "load_run": "mtcot_jax.train.checkpoint"}


def __getattr__(name: str):
  if name == "data":   # the subpackage, as `import mtcot_jax` used to make it an attribute
    return importlib.import_module("mtcot_jax.data")
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(_LAZY[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY) | {"data"})
