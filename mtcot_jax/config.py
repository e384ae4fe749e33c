"""Typed, frozen configuration. Every default lives here and only here.

A preset (YAML) holds only what it changes, by section:

    base: base.yaml          # optional: a preset to inherit from (relative path)
    model: {num_layers: 2}
    head: {k: 5}

`load_config(path, ["head.k=3", ...])` applies overrides after the presets; each
value is parsed as YAML and converted to the field's type. Unknown keys, wrong
types and impossible values raise `ConfigError` naming the key and what is
accepted (`config_checks.py`; the YAML reading and type conversion are in
`config_io.py`). Checks that need the devices (the mesh, the batch split) live in
`mtcot_jax.sharding.make_mesh`, so that loading a config never starts a backend.

The config is hashable, so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from mtcot_jax import config_io
from mtcot_jax.config_checks import validate
from mtcot_jax.errors import ConfigError  # noqa: F401  (re-exported: mt.ConfigError)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """The main transformer (Llama family)."""
  vocab_size: int = 1024       # V
  d_model: int = 128           # D
  num_layers: int = 4          # L
  num_heads: int = 4           # H
  num_kv_heads: int = 2        # K (grouped-query attention)
  head_dim: int = 0            # 0: d_model // num_heads
  mlp_dim: int = 512           # F (SwiGLU hidden width)
  rope_theta: float = 10000.0
  # RoPE frequency scaling, as Hugging Face configs write it: () none;
  # {type: linear, factor: f}; {type: llama3, factor, low_freq_factor,
  # high_freq_factor, original_max_position_embeddings}.
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  qkv_bias: bool = False       # biases on the q, k, v projections (Qwen2)
  # The positions an imported checkpoint was made for (config.json's
  # max_position_embeddings, GGUF's context_length), written back by save_hf;
  # nothing else reads it. 0: not known (save_hf writes max(data.seq_len, 2048)).
  max_position_embeddings: int = 0
  init_std: float = 0.02
  dtype: str = "float32"       # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = False    # nn.scan over layers (stacked parameters)
  remat: str = "none"          # none | full | dots
  # The teacher-forced pass's attention (`model/attention.py`): auto (cudnn on a
  # GPU, splash on a TPU, xla elsewhere) | xla (einsums) | cudnn | splash.
  attention: str = "auto"

  @property
  def dh(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadConfig:
  """The multi-token head: a small transformer over a chain of k tokens."""
  k: int = 5                   # tokens the head writes per CoT block
  num_layers: int = 1
  width: int = 0               # 0: the main model's d_model
  num_heads: int = 4
  mlp_dim: int = 0             # 0: 4 * width
  # Main-model layers whose output the head reads; -1 is the last layer's
  # output (the pre-final-norm residual stream), i in [0, L) is block i's.
  source_layers: tuple[int, ...] = (-1,)
  loss_weight: float = 0.3
  stop_gradient_residual: bool = False
  # Training runs the head's chains at this many source positions per row, those
  # with a CoT target first (0: every position). Chains elsewhere have no target,
  # and the head's cost grows with the chains it runs.
  train_positions: int = 0
  # Past positions whose memory the head attends to (the head with context, the
  # EAGLE draft model's shape): 0 the projection head (the residual at the source
  # only), C > 0 the last C positions up to the source, -1 all of them.
  context: int = 0
  # The head's loss also covers answer tokens (not only the CoT): what verified
  # answers (decode.verify) need from its drafts.
  answer_targets: bool = False

  def resolved_width(self, model: ModelConfig) -> int:
    return self.width or model.d_model

  def resolved_mlp_dim(self, model: ModelConfig) -> int:
    return self.mlp_dim or 4 * self.resolved_width(model)


# Logical axis -> mesh axes. Parameters: embed, heads, kv_heads, head_dim,
# mlp, vocab, head_embed. Activations: batch, length, act_embed, act_heads,
# act_kv_heads, act_mlp, act_vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("head_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Device mesh (data, fsdp, tensor); one axis may be -1 (the rest)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
  # Multi-host start-up (`mtcot_jax.distributed.initialize`): auto starts JAX's
  # distributed runtime when an address or process count is given here or in the
  # environment, or on a TPU VM or a detected cluster (SLURM, Open MPI); on | off.
  distributed: str = "auto"
  coordinator_address: str = ""  # host:port of process 0; "": $JAX_COORDINATOR_ADDRESS or auto
  num_processes: int = 0         # 0: $JAX_NUM_PROCESSES or auto
  process_id: int = -1           # -1: $JAX_PROCESS_ID or auto

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """The task and input pipeline."""
  task: str = "mult"
  task_args: tuple[tuple[str, Any], ...] = (("digits", 3),)
  data_dir: str = ""           # "" : $MTCOT_DATA_DIR or ~/.cache/mtcot_jax/data
  tokenizer: str = ""          # a .model file; "" : train one on the task corpus
  seq_len: int = 128
  pack: bool = False
  on_too_long: str = "skip"    # skip (and count) | error
  train_size: int = 20000
  eval_size: int = 500         # problems in each held-out split (validation, test)
  eval_split: str = "validation"  # what evaluation reads: validation | test (final tables only)
  seed: int = 0
  cot: bool = True             # train with the chain of thought
  no_cot_fraction: float = 0.0 # share of training examples given no CoT
  num_workers: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Optimisation, checkpoints and evaluation."""
  stage: str = "sft"           # sft | rl
  workdir: str = "runs/demo"
  init_from: str = ""          # a workdir to start from (rl: the SFT run)
  # SFT from a Hugging Face Llama/Qwen2 directory (mtcot_jax.hf): the model section,
  # the main model's weights and the tokenizer come from it; the head starts fresh.
  init_from_hf: str = ""
  # The same from a llama.cpp GGUF file (mtcot_jax.load_gguf; e.g. `make smollm2`'s).
  init_from_gguf: str = ""
  steps: int = 1000
  batch_size: int = 32         # global, in sequences
  grad_accum: int = 1
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  lr_mult_main: float = 1.0
  lr_mult_head: float = 1.0
  freeze_main: bool = False
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0          # 0: only at the end
  eval_examples: int = 200
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  # The SFT loss's cross-entropy over this many vocabulary chunks (a scan, each
  # chunk's logits recomputed in the backward pass): live logits (B, T, V/n)
  # float32 instead of (B, T, V). Need not divide model.vocab_size. 1: whole.
  vocab_chunks: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
  """GRPO."""
  group_size: int = 8          # G rollouts per prompt
  prompts_per_step: int = 8
  beta: float = 0.04           # KL (k3) weight
  epsilon: float = 0.2         # ratio clip
  temperature: float = 1.0
  format_reward: float = 0.0
  reward: str = "exact"        # exact: the task's grade | partial: task.partial_credit
  train_main: bool = True
  train_head: bool = True
  # Bandwidth: the reward loses pass_cost x passes / (the passes the frozen reference
  # (the SFT model) needs for the same prompt at k=0, greedy), so fewer serial passes
  # than k=0's pay and a longer CoT costs (a per-token normaliser would pay it).
  pass_cost: float = 0.0
  updates_per_batch: int = 1   # optimizer steps on each rollout batch (PPO epochs)
  # A k curriculum: (from_step, k) pairs, e.g. [[0, 1], [50, 3], [100, 5]]; () : decode.k.
  k_schedule: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
  """Two-phase decoding."""
  k: int = -1                  # -1: head.k
  max_cot_tokens: int = 256
  max_answer_tokens: int = 32
  # A pass budget: the CoT may spend at most this many main passes after the
  # prefill; a sequence that has spent them has its CoT closed where it stands
  # (budget forcing, as at max_cot_tokens: the answer marker written by force,
  # one token a pass) and answers. 0: none. The regime of a fixed serial budget.
  pass_budget: int = 0
  max_len: int = 0             # cache capacity limit; 0: sized to fit every request
  # Adaptive blocks: cut a CoT block before the first head token whose probability
  # under the head's distribution (its sampling distribution; softmax when greedy)
  # is below this; the next pass starts with the main model's token. 0: fixed k.
  head_threshold: float = 0.0
  # Verified phases: "none" (the head's CoT tokens are the CoT), "answer" (the answer
  # phase drafts with the head and keeps what the main model would write), "all"
  # (the CoT too: lossless). See decode.py.
  verify: str = "none"
  # The dtype of the weights the decode loops read: bfloat16 halves the bytes a pass
  # reads (the bound at small batch on accelerators); compute stays model.dtype.
  # On a CPU without bfloat16 dots XLA converts each pass: much slower there.
  weights_dtype: str = "float32"
  # The layout of the main blocks' matrices in the decode loops: "in_out" reads the
  # parameters as stored; "out_in" reads a copy (decode.prepare_params) in which
  # every block product contracts the matrix's minor dimension. On XLA:CPU that makes
  # one-token passes at batch 1 (the k=0 CoT loop, the answer loop) 6-19% faster and
  # blocks of k+1 tokens or batches > 1 slower (their dots leave YNNPACK): see
  # docs/results.md. Prepare once (prepare_params) for many calls: generate
  # otherwise copies the matrices per call (~12 ms for 95 MB on 2 CPU cores). The
  # copy lives beside the parameters: the main blocks' memory twice while kept.
  weights_layout: str = "in_out"
  # How the main model's cached passes of at most 8 rows (batch x new tokens) run
  # on a CPU: "xla" (XLA:CPU, as everywhere) or "native" (one hand-written C++
  # kernel a pass, mtcot_jax/native: compiled on first use with the system's C++
  # compiler; needs weights_layout=out_in and model.dtype=float32; not with a
  # mesh). Larger passes (the prefill, batches x blocks > 8) and other platforms
  # run XLA's path either way. On the 2-core CPU it makes the one-token loops at
  # batch 1 ~1.3-1.4x as fast; see docs/results.md.
  cpu_kernel: str = "xla"
  # The KV cache's value layout in the decode loops (model/kv_cache.py): "auto" (the
  # platform's: "bkds", values (B, K, Dh, S), on a CPU, where XLA:CPU's dots and the
  # native kernel read it; "bksd", (B, K, S, Dh) Dh minor like the keys, elsewhere),
  # or either one named (e.g. the accelerators' layout on a CPU, for tests).
  kv_layout: str = "auto"
  temperature: float = 0.0     # 0: greedy
  # The ids that end the sequence and the CoT when `generate` is not given them; -1:
  # mtcot_jax's tokenizers' (2, 5). train.init_from_hf records its tokenizer's here.
  # eos_id may also be a list of stop ids (e.g. an instruct model's <|im_end|> and
  # <|endoftext|>): any of them ends the sequence, in the CoT or the answer.
  eos_id: Any = -1             # an int or a tuple of ints (config_checks)
  think_end_id: int = -1
  # Answer markers: token-id sequences (variants, e.g. the ids of "Answer:" and of
  # " Answer:"), each 1-8 ids; the CoT ends where one is completed (its tokens are the
  # CoT's; a frozen instruct model is asked for one in its prompt). max_cot_tokens
  # counts the CoT's tokens before a marker's last one; past it, budget forcing
  # writes the first variant, one token a pass. (): the single token think_end_id.
  answer_markers: tuple[tuple[int, ...], ...] = ()
  top_k: int = 0               # 0: off
  top_p: float = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  model: ModelConfig = ModelConfig()
  head: HeadConfig = HeadConfig()
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  rl: RLConfig = RLConfig()
  decode: DecodeConfig = DecodeConfig()

  def replace(self, **sections) -> "Config":
    """Returns a copy with some fields changed: `cfg.replace(head={"k": 3})`."""
    new = {}
    for name, changes in sections.items():
      if name not in _SECTIONS:
        raise ConfigError(f"unknown config section {name!r}; accepted: {sorted(_SECTIONS)}")
      section = getattr(self, name)
      new[name] = _build_section(name, {**_as_dict(section), **changes})
    cfg = dataclasses.replace(self, **new)
    validate(cfg)
    return cfg

  def to_dict(self) -> dict[str, dict[str, Any]]:
    return {name: _as_dict(getattr(self, name)) for name in _SECTIONS}


_SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _as_dict(section) -> dict[str, Any]:
  return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def _build_section(name: str, values: dict[str, Any]):
  cls = _SECTIONS[name]
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      raise ConfigError(
          f"unknown config key {name}.{key}; accepted keys of {name}: {sorted(fields)}")
    kwargs[key] = config_io.coerce(f"{name}.{key}", value, hints[key])
  return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
  """'section.key=value' -> (section, key, YAML-parsed value)."""
  return config_io.parse_override(text, _SECTIONS)


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
  """Loads a preset (or the defaults, with path None) and applies overrides."""
  sections = config_io.read_preset(path, _SECTIONS) if path else {}
  for text in overrides:
    section, key, value = parse_override(text)
    sections.setdefault(section, {})[key] = value
  cfg = Config(**{name: _build_section(name, values) for name, values in sections.items()})
  validate(cfg)
  return cfg


def config_from_dict(sections: dict[str, dict[str, Any]]) -> Config:
  """Builds a Config from `Config.to_dict()` output (or a saved config.yaml)."""
  cfg = Config(**{name: _build_section(name, values) for name, values in sections.items()})
  validate(cfg)
  return cfg


def config_yaml(cfg: Config) -> str:
  """The full config (every field) as YAML text; `config_from_dict(yaml.safe_load(text))`
  or `load_config` (from a file) reads it back."""
  plain = {name: {k: config_io.yaml_plain(v) for k, v in values.items()}
           for name, values in cfg.to_dict().items()}
  return yaml.safe_dump(plain, sort_keys=False)


def save_config(cfg: Config, path: str) -> None:
  """Writes the full config (every field) as YAML; `load_config` reads it back."""
  with open(path, "w") as f:
    f.write(config_yaml(cfg))
