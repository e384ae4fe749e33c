"""Validation of a `Config`: every value checked, and every error names the key,
the value given and what is accepted (`ConfigError`). `config.py` builds configs
and calls `validate` on each one."""

from __future__ import annotations

from typing import Any

from mtcot_jax import tokens
from mtcot_jax.errors import ConfigError  # noqa: F401  (re-exported)


_DTYPES = ("float32", "bfloat16", "float16")
_REMAT = ("none", "full", "dots")
_ATTENTION = ("auto", "xla", "cudnn", "splash")
_DISTRIBUTED = ("auto", "on", "off")
MAX_MARKER_TOKENS = 8          # decode.answer_markers: tokens per marker
EVAL_SPLITS = ("validation", "test")   # data.eval_split: the held-out splits (data/builders.py)


def _check(ok: bool, key: str, value: Any, accepted: str) -> None:
  if not ok:
    raise ConfigError(f"{key}={value!r} is not accepted: {accepted}")


_ROPE_SCALING = {"linear": {"factor"},
                 "llama3": {"factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings"}}


def _check_rope_scaling(scaling) -> None:
  if not scaling:
    return
  s = dict(scaling)
  kind = s.get("type")
  accepted = ("() (none), {type: linear, factor: F} or {type: llama3, factor, low_freq_factor, "
              "high_freq_factor, original_max_position_embeddings}")
  _check(kind in _ROPE_SCALING, "model.rope_scaling", scaling, accepted)
  need = _ROPE_SCALING[kind]
  _check(set(s) == need | {"type"}, "model.rope_scaling", scaling, accepted)
  for key in need:
    _check(isinstance(s[key], (int, float)) and not isinstance(s[key], bool) and s[key] > 0,
           f"model.rope_scaling.{key}", s[key], "a number > 0")
  if kind == "llama3":
    _check(s["high_freq_factor"] > s["low_freq_factor"], "model.rope_scaling.high_freq_factor",
           s["high_freq_factor"], f"a number > low_freq_factor={s['low_freq_factor']}")


def _check_model(m) -> None:
  """`model.*`: sizes, dtypes, norm and RoPE settings."""
  for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
    _check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "an int >= 1")
  _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
         f"a divisor of model.num_heads={m.num_heads}")
  _check(m.max_position_embeddings >= 0, "model.max_position_embeddings",
         m.max_position_embeddings, "0 (not known) or an int >= 1")
  _check(m.head_dim >= 0, "model.head_dim", m.head_dim, "0 (d_model // num_heads) or an int >= 1")
  if m.head_dim == 0:
    _check(m.d_model % m.num_heads == 0, "model.num_heads", m.num_heads,
           f"a divisor of model.d_model={m.d_model} (or set model.head_dim)")
  _check(m.dh % 2 == 0, "model.head_dim", m.dh, "an even head dimension (RoPE rotates pairs)")
  _check(m.dtype in _DTYPES, "model.dtype", m.dtype, f"one of {_DTYPES}")
  _check(m.param_dtype in _DTYPES, "model.param_dtype", m.param_dtype, f"one of {_DTYPES}")
  _check(m.remat in _REMAT, "model.remat", m.remat, f"one of {_REMAT}")
  _check_attention(m)
  _check(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "a number > 0")
  _check_rope_scaling(m.rope_scaling)


def _check_attention(m) -> None:
  """`model.attention`; cuDNN's flash attention takes bfloat16/float16 and a head
  dim that is a multiple of 8, at most 256 (128 before Hopper: cuDNN says so)."""
  _check(m.attention in _ATTENTION, "model.attention", m.attention, f"one of {_ATTENTION}")
  if m.attention == "cudnn":
    _check(m.dtype in ("bfloat16", "float16"), "model.attention", m.attention,
           f"auto or xla with model.dtype={m.dtype!r} (cuDNN's flash attention takes "
           "bfloat16 or float16)")
    _check(m.dh % 8 == 0 and m.dh <= 256, "model.attention", m.attention,
           f"auto or xla with head dim {m.dh} (cuDNN's flash attention takes a multiple "
           "of 8 up to 256)")


def _check_head(h, m) -> None:
  """`head.*`, some against the model `m` (its width, its layers)."""
  _check(h.k >= 0, "head.k", h.k, "an int >= 0 (0: no head tokens)")
  _check(h.num_layers >= 1, "head.num_layers", h.num_layers, "an int >= 1")
  _check(h.width >= 0, "head.width", h.width, "0 (d_model) or an int >= 1")
  width = h.resolved_width(m)
  _check(h.num_heads >= 1 and width % h.num_heads == 0 and (width // h.num_heads) % 2 == 0,
         "head.num_heads", h.num_heads,
         f"a divisor of the head width {width} leaving an even per-head dimension")
  _check(len(h.source_layers) >= 1, "head.source_layers", h.source_layers, "at least one layer")
  for layer in h.source_layers:
    _check(-1 <= layer < m.num_layers, "head.source_layers", h.source_layers,
           f"layer indices in [-1, {m.num_layers - 1}] (-1: the last layer)")
  _check(len(set(h.source_layers)) == len(h.source_layers), "head.source_layers",
         h.source_layers, "distinct layer indices")
  _check(h.loss_weight >= 0, "head.loss_weight", h.loss_weight, "a number >= 0")
  _check(h.context >= -1, "head.context", h.context,
         "0 (the projection head), -1 (every past position) or an int >= 1 (a window)")
  _check(0 <= h.train_positions, "head.train_positions", h.train_positions,
         "0 (every position) or an int >= 1")


def _check_mesh(mc) -> None:
  """`mesh.*`: axis sizes, the multi-process settings, the sharding rules."""
  mesh_axes = mc.shape
  _check(all(a == -1 or a >= 1 for a in mesh_axes) and mesh_axes.count(-1) <= 1,
         "mesh", dict(zip(("data", "fsdp", "tensor"), mesh_axes)),
         "axis sizes >= 1, at most one of them -1")
  _check(mc.distributed in _DISTRIBUTED, "mesh.distributed", mc.distributed,
         f"one of {_DISTRIBUTED}")
  _check(mc.num_processes >= 0, "mesh.num_processes", mc.num_processes,
         "0 (from the environment / auto-detected) or an int >= 1")
  _check(mc.process_id >= -1, "mesh.process_id", mc.process_id,
         "-1 (from the environment / auto-detected) or an int >= 0")
  if mc.num_processes and mc.process_id >= 0:
    _check(mc.process_id < mc.num_processes, "mesh.process_id", mc.process_id,
           f"an int in [0, mesh.num_processes={mc.num_processes})")
  for name, axes in mc.rules:
    names = axes if isinstance(axes, tuple) else (axes,)
    for a in names:
      _check(a in (None, "data", "fsdp", "tensor"), f"mesh.rules[{name}]", axes,
             "mesh axes among data, fsdp, tensor (or null)")


def _check_data(d) -> None:
  """`data.*`."""
  _check(d.seq_len >= 4, "data.seq_len", d.seq_len, "an int >= 4")
  _check(d.on_too_long in ("skip", "error"), "data.on_too_long", d.on_too_long, "skip or error")
  _check(0.0 <= d.no_cot_fraction <= 1.0, "data.no_cot_fraction", d.no_cot_fraction, "in [0, 1]")
  _check(d.train_size >= 1, "data.train_size", d.train_size, "an int >= 1")
  _check(d.eval_size >= 1, "data.eval_size", d.eval_size, "an int >= 1")
  _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "an int >= 0 (0: no worker processes)")
  _check(d.eval_split in EVAL_SPLITS, "data.eval_split", d.eval_split,
         f"one of {EVAL_SPLITS} (validation: for choosing settings; test: a final table)")
  _check(not (d.task == "jsonl" and d.eval_split == "test"), "data.eval_split", d.eval_split,
         "validation with data.task=jsonl (the file's last `validation` problems); a jsonl "
         "file has no test split (GSM8K's test set is kept outside the project)")


def _check_train(t, m) -> None:
  """`train.*`, vocab_chunks against the model `m`."""
  _check(t.stage in ("sft", "rl"), "train.stage", t.stage, "sft or rl")
  _check(not (t.init_from_hf and (t.init_from or t.stage == "rl")), "train.init_from_hf",
         t.init_from_hf, "a Hugging Face directory for SFT (train.stage=sft) without "
         "train.init_from; RL starts from the SFT run that imported it (train.init_from)")
  _check(not (t.init_from_gguf and (t.init_from or t.init_from_hf or t.stage == "rl")),
         "train.init_from_gguf", t.init_from_gguf, "a GGUF file for SFT (train.stage=sft) "
         "without train.init_from or train.init_from_hf")
  _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "an int >= 1")
  _check(t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0, "train.grad_accum",
         t.grad_accum, f"an int >= 1 dividing train.batch_size={t.batch_size}")
  _check(t.steps >= 0, "train.steps", t.steps, "an int >= 0")
  _check(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "a number > 0")
  _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "in [0, 1]")
  _check(1 <= t.vocab_chunks <= m.vocab_size,
         "train.vocab_chunks", t.vocab_chunks,
         f"an int in [1, model.vocab_size={m.vocab_size}] (it need not divide the vocabulary)")


def _check_rl(r, h) -> None:
  """`rl.*`, the k schedule against `head.k`."""
  _check(r.group_size >= 2, "rl.group_size", r.group_size, "an int >= 2 (advantages need a group)")
  _check(r.epsilon > 0, "rl.epsilon", r.epsilon, "a number > 0")
  _check(r.beta >= 0, "rl.beta", r.beta, "a number >= 0")
  _check(r.pass_cost >= 0, "rl.pass_cost", r.pass_cost, "a number >= 0")
  _check(r.updates_per_batch >= 1, "rl.updates_per_batch", r.updates_per_batch, "an int >= 1")
  steps = [s for s, _ in r.k_schedule]
  _check(all(0 <= k <= h.k for _, k in r.k_schedule) and steps == sorted(set(steps))
         and (not steps or steps[0] == 0), "rl.k_schedule", r.k_schedule,
         f"(from_step, k) pairs with strictly increasing steps from 0 and 0 <= k <= head.k={h.k}")
  _check(r.reward in ("exact", "partial"), "rl.reward", r.reward, "exact or partial")


def _check_decode(dec, h, m) -> None:
  """`decode.*`, against `head.k` and the model (vocabulary, dtype for the native kernel)."""
  _check(-1 <= dec.k <= h.k, "decode.k", dec.k, f"-1 (head.k) or an int in [0, head.k={h.k}]")
  _check(dec.max_cot_tokens >= 1, "decode.max_cot_tokens", dec.max_cot_tokens, "an int >= 1")
  _check(dec.pass_budget >= 0, "decode.pass_budget", dec.pass_budget,
         "an int >= 0 (0: no pass budget)")
  _check(dec.max_answer_tokens >= 1, "decode.max_answer_tokens", dec.max_answer_tokens,
         "an int >= 1")
  _check(0.0 <= dec.head_threshold < 1.0, "decode.head_threshold", dec.head_threshold,
         "a number in [0, 1) (0: fixed blocks of k head tokens)")
  _check(dec.weights_dtype in ("float32", "bfloat16"), "decode.weights_dtype",
         dec.weights_dtype, "float32 or bfloat16")
  _check(dec.weights_layout in ("in_out", "out_in"), "decode.weights_layout",
         dec.weights_layout, "in_out (as stored) or out_in (a transposed copy; see config.py)")
  _check(dec.cpu_kernel in ("xla", "native"), "decode.cpu_kernel", dec.cpu_kernel,
         "xla or native (a C++ kernel a pass on the CPU; see config.py)")
  _check(dec.kv_layout in ("auto", "bkds", "bksd"), "decode.kv_layout", dec.kv_layout,
         "auto (the platform's), bkds (values (B, K, Dh, S)) or bksd (values (B, K, S, Dh))")
  if dec.cpu_kernel == "native":
    _check(dec.weights_layout == "out_in", "decode.weights_layout", dec.weights_layout,
           "out_in with decode.cpu_kernel=native (the layout the kernel reads)")
    _check(dec.kv_layout in ("auto", "bkds"), "decode.kv_layout", dec.kv_layout,
           "auto or bkds with decode.cpu_kernel=native (the layout the kernel reads)")
    _check(m.dtype == "float32", "model.dtype", m.dtype,
           "float32 with decode.cpu_kernel=native (the kernel computes in float32)")
  _check(dec.verify in ("none", "answer", "all"), "decode.verify", dec.verify,
         "one of none, answer, all (answer: the answer phase verified; all: the CoT too)")
  _check(dec.temperature >= 0, "decode.temperature", dec.temperature, "a number >= 0 (0: greedy)")
  _check(dec.top_k >= 0, "decode.top_k", dec.top_k, "an int >= 0 (0: off)")
  def is_id(i) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < m.vocab_size
  _check((type(dec.eos_id) is int and dec.eos_id == -1) or is_id(dec.eos_id)
         or (isinstance(dec.eos_id, tuple) and len(dec.eos_id) >= 1
             and all(is_id(i) for i in dec.eos_id)), "decode.eos_id", dec.eos_id,
         f"-1 (mtcot_jax's tokenizers' id), an id in [0, model.vocab_size={m.vocab_size}) "
         "or a non-empty list of such ids (any of them ends the sequence)")
  _check(-1 <= dec.think_end_id < m.vocab_size,
         "decode.think_end_id", dec.think_end_id,
         f"-1 (mtcot_jax's tokenizers' id) or an id in [0, model.vocab_size={m.vocab_size})")
  _check(0 < dec.top_p <= 1, "decode.top_p", dec.top_p, "a number in (0, 1]")
  eos = (dec.eos_id if isinstance(dec.eos_id, tuple)
         else (dec.eos_id if dec.eos_id >= 0 else tokens.EOS_ID,))
  eos_text = f"the EOS id {eos[0]}" if len(eos) == 1 else f"an EOS id {list(eos)}"
  for marker in dec.answer_markers:
    _check(1 <= len(marker) <= MAX_MARKER_TOKENS
           and all(0 <= i < m.vocab_size and i not in eos for i in marker),
           "decode.answer_markers", dec.answer_markers,
           f"lists of 1 to {MAX_MARKER_TOKENS} token ids, each in [0, model.vocab_size="
           f"{m.vocab_size}) and not {eos_text} (e.g. [[12, 34], [56, 34]])")


def validate(cfg) -> None:
  """Checks values that no type can express, one config section after another.
  Raises ConfigError."""
  _check_model(cfg.model)
  _check_head(cfg.head, cfg.model)
  _check_mesh(cfg.mesh)
  _check_data(cfg.data)
  _check_train(cfg.train, cfg.model)
  _check_rl(cfg.rl, cfg.head)
  _check_decode(cfg.decode, cfg.head, cfg.model)
