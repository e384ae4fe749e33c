"""The special token ids and pieces of mtcot_jax's own tokenizers: the one place
they are declared (imports nothing, so every layer may read it).

A tokenizer that comes with a model (`mtcot_jax.hf`, `load_gguf`) has its own ids:
read them from the tokenizer (`tok.eos_id`, `tok.think_end_id`) or from
`cfg.decode.eos_id` / `cfg.decode.think_end_id`, never from these constants.
"""

PAD_ID, BOS_ID, EOS_ID, UNK_ID, THINK_ID, THINK_END_ID = 0, 1, 2, 3, 4, 5
THINK, THINK_END = "<think>", "</think>"
