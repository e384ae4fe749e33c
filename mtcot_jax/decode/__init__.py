"""Two-phase decoding: the k-token CoT loop, then the filtered one-token answer loop.

    generate.py  generate / make_generate: settings from cfg.decode (or overrides);
                 temperature/top_k/top_p are arguments of the compiled loops
    loop.py      Decoder: the frozen loop object (prefill, main_pass, cot_step,
                 verified_step, answer_step; run_cot / run_answer jitted)
    state.py     the loop state, `commit` (the update every step shares), the result
    blocks.py    the head's draft chain, adaptive cuts, cut_block, speculative_accept
    markers.py   answer markers: token sequences that end the CoT, matched across blocks
    backend.py   the machine-specific seam: prepare_params, the cached main pass
                 (XLA, or the native CPU kernel where it applies)
"""

from mtcot_jax.decode.backend import DecodeParams, prepare_params
from mtcot_jax.decode.blocks import adaptive_keep, cut_block, sample_head_chain, speculative_accept
from mtcot_jax.decode.generate import decode_config, decoder, generate, make_generate
from mtcot_jax.decode.loop import Decoder
from mtcot_jax.decode.state import GenerateResult, State
from mtcot_jax.tokens import EOS_ID, PAD_ID, THINK_END_ID

VERIFY = ("none", "answer", "all")

__all__ = ["DecodeParams", "Decoder", "GenerateResult", "State", "VERIFY", "EOS_ID", "PAD_ID",
           "THINK_END_ID", "adaptive_keep", "cut_block", "decode_config", "decoder", "generate",
           "make_generate", "prepare_params", "sample_head_chain", "speculative_accept"]
