"""The public entry points: `generate` (validated, from host arrays) and
`make_generate` (a pure function for the caller's own jit)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mtcot_jax import sampling
from mtcot_jax import sharding as shd
from mtcot_jax import tokens
from mtcot_jax.config import Config
from mtcot_jax.decode.backend import prepare_params
from mtcot_jax.decode.loop import Decoder
from mtcot_jax.decode.state import GenerateResult


def decode_config(cfg: Config, **overrides) -> Config:
  """`cfg` with decode settings changed: any `DecodeConfig` field by name (k,
  temperature, top_k, top_p, max_cot_tokens, max_answer_tokens, head_threshold,
  verify, eos_id, think_end_id, answer_markers, ...); None leaves a field as it is. Validated
  as the config is: an unknown name or a bad value raises, naming it."""
  changes = {name: value for name, value in overrides.items() if value is not None}
  if "answer_markers" in changes:     # numpy arrays or lists of them, as plain lists
    changes["answer_markers"] = [np.asarray(m).tolist() for m in changes["answer_markers"]]
  return cfg.replace(decode=changes) if changes else cfg


def decoder(cfg: Config, mesh: Mesh | None = None) -> Decoder:
  """The loop object for `cfg.decode`'s settings."""
  d = cfg.decode
  if mesh is not None and d.cpu_kernel == "native":
    raise ValueError("decode.cpu_kernel=native runs on one CPU device and was given a mesh; "
                     "accepted: mesh=None, or decode.cpu_kernel=xla")
  k = d.k if d.k >= 0 else cfg.head.k
  think_end = d.think_end_id if d.think_end_id >= 0 else tokens.THINK_END_ID
  return Decoder(
      cfg=cfg, k=k, sample=sampling.Sampling(temperature=d.temperature, top_k=d.top_k,
                                             top_p=d.top_p),
      max_cot=d.max_cot_tokens, max_answer=d.max_answer_tokens,
      eos_id=d.eos_id if d.eos_id >= 0 else tokens.EOS_ID,
      markers=tuple(tuple(m) for m in d.answer_markers) or ((think_end,),),
      tau=d.head_threshold, verify=d.verify if k > 0 else "none", mesh=mesh)


def _check_shapes(dec: Decoder, prompt_shape, lens_shape) -> None:
  """What can be checked without the values (also under the caller's jit)."""
  if len(prompt_shape) != 2:
    raise ValueError(f"prompt_tokens must be (batch, length); got shape {prompt_shape}")
  if tuple(lens_shape) != (prompt_shape[0],):
    raise ValueError(f"prompt_lengths must be ({prompt_shape[0]},); got shape {lens_shape}")
  limit = dec.cfg.decode.max_len
  need = dec.capacity(prompt_shape[1])
  if limit and need > limit:
    raise ValueError(
        f"a prompt of length {prompt_shape[1]} does not fit the cache: prompt + "
        f"max_cot_tokens + m (the forced answer marker's tokens, 1 for </think>) + (k+1) + "
        f"max_answer_tokens = {need} > decode.max_len={limit}; "
        "accepted: a shorter prompt, smaller limits or a larger decode.max_len")


def _check_values(cfg: Config, prompt, lens) -> None:
  if prompt.shape[1] == 0 or np.any(lens < 1):
    raise ValueError(f"empty prompt: prompt_lengths={lens.tolist()}; accepted: every "
                     "prompt has at least one token (BOS)")
  if np.any(lens > prompt.shape[1]):
    raise ValueError(f"prompt_lengths={lens.tolist()} exceed the prompt array's length "
                     f"{prompt.shape[1]}")
  V = cfg.model.vocab_size
  real = np.arange(prompt.shape[1])[None, :] < lens[:, None]
  bad = real & ((prompt < 0) | (prompt >= V))
  if np.any(bad):
    b, t = np.argwhere(bad)[0]
    raise ValueError(f"prompt token id {int(prompt[b, t])} at [{b}, {t}] is outside the "
                     f"vocabulary; accepted: ids in [0, model.vocab_size={V})")


def make_generate(cfg: Config, *, mesh: Mesh | None = None, **overrides):
  """A pure function (params, prompt_tokens, prompt_lengths, key) -> GenerateResult
  with the settings of `cfg.decode` changed by `overrides` (see `decode_config`).
  Call it inside your own jit: it checks shapes, not values (see `generate`);
  params may be the parameters or `prepare_params(cfg, params)`."""
  cfg = decode_config(cfg, **overrides)
  dec = decoder(cfg, mesh)

  def generate_fn(params, prompt_tokens, prompt_lengths, key) -> GenerateResult:
    _check_shapes(dec, jnp.shape(prompt_tokens), jnp.shape(prompt_lengths))
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    lens = jnp.asarray(prompt_lengths, jnp.int32)
    prompt = jnp.where(jnp.arange(prompt.shape[1])[None] < lens[:, None], prompt, 0)
    return dec(prepare_params(cfg, params).params, prompt, lens, key)
  return generate_fn


def generate(cfg: Config, params, prompt_tokens, prompt_lengths, key: jax.Array, *,
             mesh: Mesh | None = None, **overrides) -> GenerateResult:
  """Two-phase generation for a batch of left-aligned prompts.

  Args:
    params: the parameters, or `prepare_params(cfg, params)`: the copy that
      decode.weights_dtype / decode.weights_layout ask for, made once for many calls.
    prompt_tokens: (B, P) int, each row `BOS question <think>` (or, with no CoT,
      `... <think> </think>`), padded after its length.
    prompt_lengths: (B,) int, tokens per prompt (>= 1).
    key: a PRNG key (split inside; never reused).
    mesh: decode with the batch sharded over the data axes and the params as the rules say.
    **overrides: decode settings by their `DecodeConfig` names, in place of
      cfg.decode's (None: cfg.decode's): k (head tokens per CoT block, 0..head.k;
      -1 head.k), temperature/top_k/top_p, max_cot_tokens/max_answer_tokens,
      head_threshold (adaptive blocks: a block is cut before the first head token
      whose probability is below it; unverified CoT blocks only), verify ("none",
      "answer": the answer phase verified, "all": the CoT too, lossless),
      eos_id/think_end_id, answer_markers (token-id lists, e.g. [[12, 34], [56, 34]]:
      the CoT ends where one of them is completed, in place of the token
      think_end_id; budget forcing writes the first; see decode/markers.py).
  Returns:
    GenerateResult (see its fields).
  """
  cfg = decode_config(cfg, **overrides)
  dec = decoder(cfg, mesh)
  prompt, lens = np.asarray(prompt_tokens), np.asarray(prompt_lengths)
  _check_shapes(dec, prompt.shape, lens.shape)
  _check_values(cfg, prompt, lens)
  prepared = prepare_params(cfg, params)
  prompt = jnp.asarray(np.where(np.arange(prompt.shape[1])[None] < lens[:, None], prompt, 0),
                       jnp.int32)
  lens = jnp.asarray(lens, jnp.int32)
  if mesh is not None:
    batch = shd.sharder(cfg, mesh)
    prompt = jax.device_put(prompt, batch.sharding(("batch", None)))
    lens = jax.device_put(lens, batch.sharding(("batch",)))
  return dec(prepared.params, prompt, lens, key)
