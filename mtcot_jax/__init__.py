"""mtcot_jax: multi-token chain of thought in JAX.

    import mtcot_jax as mt
    cfg = mt.load_config("configs/demo.yaml", ["head.k=5"])
    params = mt.init_params(cfg, jax.random.key(0))
    out = mt.forward(cfg, params, tokens)
"""

from mtcot_jax.config import Config, ConfigError, load_config, save_config
from mtcot_jax.model import (ForwardOutput, KVCache, extend, forward, head_logits, init_params,
                             param_shardings, param_specs)
from mtcot_jax.sharding import make_mesh
