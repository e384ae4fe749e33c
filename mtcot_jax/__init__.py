"""mtcot_jax: multi-token chain of thought in JAX.

    import mtcot_jax as mt
    cfg = mt.load_config("configs/demo.yaml", ["head.k=5"])
    params = mt.init_params(cfg, jax.random.key(0))
    out = mt.forward(cfg, params, tokens)
    res = mt.generate(cfg, params, prompt_tokens, prompt_lengths, key, k=5)
    hf = mt.load_hf("hf_llama_dir", ["head.k=5"])      # Hugging Face Llama / Qwen2 in
    hf = mt.load_gguf("model.gguf", ["head.k=5"])      # a llama.cpp GGUF file in
    mt.save_hf(run, "out_dir")                          # ... and out
"""

from mtcot_jax.config import Config, ConfigError, load_config, save_config
from mtcot_jax.data import encode_prompt, get_task, load_tokenizer
from mtcot_jax.decode import DecodeParams, GenerateResult, generate, make_generate, prepare_params
from mtcot_jax.hf import load_gguf, load_hf, save_hf
from mtcot_jax.model import (ForwardOutput, KVCache, extend, forward, head_logits, init_params,
                             param_shardings, param_specs)
from mtcot_jax.sharding import make_mesh


def __getattr__(name: str):
  # orbax (the checkpoints) is imported by the first `mt.load_run`, not by `import mtcot_jax`.
  if name == "load_run":
    from mtcot_jax.train.checkpoint import load_run
    return load_run
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
