"""The main transformer, the multi-token head and their functional API."""

from mtcot_jax.model.api import (ForwardOutput, apply, chain_tokens, extend, forward, head_logits,
                                 init_params, param_shapes, param_shardings, param_specs,
                                 run_head, to_plain_layout, to_scan_layout, unembed_matrix)
from mtcot_jax.model.head import MultiTokenHead
from mtcot_jax.model.transformer import KVCache, MainOutput, Transformer
