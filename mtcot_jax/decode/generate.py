"""The public entry points: `generate` (validated, from host arrays) and
`make_generate` (a pure function for the caller's own jit).

What is compiled and what is an argument: the decode loops compile once per
shape and static settings (k, limits, verify, markers, stop ids, mesh, and
greedy or not); temperature, top_k and top_p are arguments of the loops (scalar
arrays), so new values reuse the compiled loops, in `generate` and in
`make_generate`'s function alike (there they may be traced values of the
caller's jit)."""

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
  if "eos_id" in changes:             # an int or a sequence of ids (numpy's included)
    changes["eos_id"] = _stop_ids_value(changes["eos_id"])
  return cfg.replace(decode=changes) if changes else cfg


def _stop_ids_value(value):
  """eos_id as the config takes it: an int, or a list of ints (validated there)."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError("eos_id is a traced value; accepted: Python or numpy ints (an id "
                     "or a list of them): the stop ids are part of the compiled loops")
  if isinstance(value, (list, tuple)):
    return [_stop_ids_value(v) for v in value]
  arr = np.asarray(value)
  if arr.dtype.kind in "iu":
    return int(arr) if arr.ndim == 0 else arr.reshape(-1).tolist()
  return value                        # anything else: the config check names it


def stop_ids(cfg: Config) -> tuple[int, ...]:
  """decode.eos_id as a tuple of ids (-1: mtcot_jax's tokenizers' EOS)."""
  e = cfg.decode.eos_id
  return tuple(e) if isinstance(e, tuple) else (e if e >= 0 else tokens.EOS_ID,)


def sampling_of(cfg: Config) -> sampling.Sampling:
  """cfg.decode's sampling settings (numbers)."""
  d = cfg.decode
  return sampling.Sampling(temperature=d.temperature, top_k=d.top_k, top_p=d.top_p)


def decoder(cfg: Config, mesh: Mesh | None = None, *, greedy: bool | None = None) -> Decoder:
  """The loop object for `cfg.decode`'s static settings; greedy or sampling as
  `greedy` says (None: decode.temperature == 0). Its sampling values are not
  part of it: every sampling Decoder holds temperature 1 and no filter (the
  default of a call given no values) and the same config, so that Decoders that
  differ only in temperature/top_k/top_p are equal and share the compiled loops;
  pass the values to the call (`Decoder.__call__(..., sample)`)."""
  d = cfg.decode
  if mesh is not None and d.cpu_kernel == "native":
    raise ValueError("decode.cpu_kernel=native runs on one CPU device and was given a mesh; "
                     "accepted: mesh=None, or decode.cpu_kernel=xla")
  greedy = d.temperature == 0 if greedy is None else bool(greedy)
  mode = sampling.Sampling(temperature=0.0 if greedy else 1.0)
  if (d.temperature, d.top_k, d.top_p) != (mode.temperature, 0, 1.0):
    cfg = cfg.replace(decode={"temperature": mode.temperature, "top_k": 0, "top_p": 1.0})
  k = d.k if d.k >= 0 else cfg.head.k
  think_end = d.think_end_id if d.think_end_id >= 0 else tokens.THINK_END_ID
  return Decoder(
      cfg=cfg, k=k, sample=mode, max_cot=d.max_cot_tokens, max_answer=d.max_answer_tokens,
      eos_id=stop_ids(cfg),
      markers=tuple(tuple(m) for m in d.answer_markers) or ((think_end,),),
      tau=d.head_threshold, verify=d.verify if k > 0 else "none", pass_budget=d.pass_budget,
      mesh=mesh)


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
  """A pure function
  `fn(params, prompt_tokens, prompt_lengths, key, *, temperature=None, top_p=None,
  top_k=None) -> GenerateResult` with the settings of `cfg.decode` changed by
  `overrides` (see `decode_config`; validated here, before anything compiles).

  Call it inside your own jit: it checks shapes, not values (see `generate`);
  params may be the parameters or `prepare_params(cfg, params)`. The sampling
  settings (None: the config's) may be numbers or scalar JAX arrays, traced
  ones included (`jax.jit(fn)(..., temperature=t)`): they are arguments of the
  compiled loops, so new values do not recompile. The program is chosen when
  `fn` is traced: greedy where the temperature is the number 0, else sampling,
  which also serves an array temperature and is greedy (argmax, the same
  tokens) where that is <= 0 at run time. Numbers are validated; arrays cannot
  be (top_k <= 0 or >= vocab: off; top_p >= 1: off). With the same settings
  and key, `fn` writes what `generate` writes, token for token."""
  cfg = decode_config(cfg, **overrides)
  default = sampling_of(cfg)
  decoders = {default.greedy: decoder(cfg, mesh)}   # the other mode built if asked for

  def generate_fn(params, prompt_tokens, prompt_lengths, key, *, temperature=None,
                  top_p=None, top_k=None) -> GenerateResult:
    s = sampling.Sampling(
        temperature=default.temperature if temperature is None else temperature,
        top_k=default.top_k if top_k is None else top_k,
        top_p=default.top_p if top_p is None else top_p)
    if s.greedy not in decoders:
      decoders[s.greedy] = decoder(cfg, mesh, greedy=s.greedy)
    dec = decoders[s.greedy]
    _check_shapes(dec, jnp.shape(prompt_tokens), jnp.shape(prompt_lengths))
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    lens = jnp.asarray(prompt_lengths, jnp.int32)
    prompt = jnp.where(jnp.arange(prompt.shape[1])[None] < lens[:, None], prompt, 0)
    return dec(prepare_params(cfg, params).params, prompt, lens, key, s)
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
      eos_id (an id or a list of ids: any of them ends the sequence, in the CoT
      or the answer), think_end_id, answer_markers (token-id lists, e.g. [[12, 34], [56, 34]]:
      the CoT ends where one of them is completed, in place of the token
      think_end_id; budget forcing writes the first; see decode/markers.py),
      pass_budget (the CoT's main passes after the prefill, 0 none: past it the
      CoT is closed by force where it stands).
  Returns:
    GenerateResult (see its fields).

  The loops compile once per shape and static settings; temperature, top_k and
  top_p are their arguments (a new value reuses them; temperature 0 is the greedy
  program, compiled apart). Inside your own jit use `make_generate`.
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
  return dec(prepared.params, prompt, lens, key, sampling_of(cfg))
