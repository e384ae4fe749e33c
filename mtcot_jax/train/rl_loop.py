"""The RL stage (`train.stage=rl`): GRPO from an SFT run, with SFT's sharding,
checkpoints, exact resume, logging, progress bar and evaluation."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from mtcot_jax import decode, sampling
from mtcot_jax import sharding as shd
from mtcot_jax.config import Config, ConfigError
from mtcot_jax.data import builders, encode_prompt
from mtcot_jax.model import api
from mtcot_jax.train import checkpoint as ckpt
from mtcot_jax.train import optim, rl
from mtcot_jax.train.evaluate import answer_text, host_array
from mtcot_jax.train.loop import _jsonable, check_finite, run_evals, run_steps
from mtcot_jax.train.step import create_state, global_batch

_PROMPT_BUCKET = 16   # prompts are padded to a multiple of this: few distinct shapes


def _prompts(cfg: Config, tok, source, step: int):
  """The prompts of `step` (examples step*n .. step*n+n-1 of the train split, cycling),
  each repeated group_size times (a group's rollouts are adjacent)."""
  r = cfg.rl
  n, G = r.prompts_per_step, r.group_size
  examples = [source[(step * n + i) % len(source)] for i in range(n)]
  ids = [encode_prompt(tok, ex.question, cot=True) for ex in examples]
  P = -(-max(map(len, ids)) // _PROMPT_BUCKET) * _PROMPT_BUCKET
  prompt = np.zeros((n * G, P), np.int32)
  lengths = np.zeros(n * G, np.int32)
  for i, row in enumerate(ids):
    prompt[i * G:(i + 1) * G, :len(row)] = row
    lengths[i * G:(i + 1) * G] = len(row)
  return prompt, lengths, [ex for ex in examples for _ in range(G)]


def rewards(cfg: Config, tok, task, res, examples, k0_passes=None) -> tuple[np.ndarray, np.ndarray]:
  """Task reward (the grade, or with rl.reward=partial the task's partial credit)
  + rl.format_reward for a CoT closed by the model and an answer ended by EOS
  - rl.pass_cost x passes / k0_passes (each rollout's prompt's k=0 passes,
  `reference_passes`; needed when rl.pass_cost > 0). Returns (rewards, correctness)."""
  res = jax.tree.map(host_array, res)
  texts = [answer_text(tok, res.tokens[b], res.phase[b], res.lengths[b])
           for b in range(len(examples))]
  correct = np.array([task.grade(t, ex) for t, ex in zip(texts, examples)], np.float32)
  task_reward = correct if cfg.rl.reward == "exact" else np.array(
      [task.partial_credit(t, ex) for t, ex in zip(texts, examples)], np.float32)
  well_formed = res.finished & ~res.cot_forced & np.any(res.phase == 1, axis=1)
  reward = task_reward + cfg.rl.format_reward * well_formed.astype(np.float32)
  if cfg.rl.pass_cost:
    if k0_passes is None:
      raise ValueError("rl.pass_cost > 0 needs k0_passes (reference_passes)")
    reward = reward - cfg.rl.pass_cost * pass_fraction(res, k0_passes)
  return reward, correct


def pass_fraction(res, k0_passes) -> np.ndarray:
  """Forward passes ÷ k0_passes: the passes k=0 decoding of the same prompt takes
  (`reference_passes`), a fixed normaliser per prompt, so that writing a longer CoT
  costs passes where a per-token normaliser (passes ÷ generated tokens) would pay
  for it."""
  k0 = np.maximum(np.asarray(k0_passes, np.float32), 1)
  return (np.asarray(res.forward_passes) / k0).astype(np.float32)


def reference_passes(cfg: Config, params, tok, prompt, lengths, mesh=None) -> np.ndarray:
  """Per rollout row, the passes the reference `params` take to answer its prompt
  at k=0, greedy (the rollouts' limits): the pass cost's normaliser. The rows of
  a group (rl.group_size) share a prompt, so one row a group is decoded where the
  mesh's batch shards divide that many."""
  group_size = cfg.rl.group_size
  rows = np.arange(0, len(prompt), group_size)
  if mesh is not None and len(rows) % shd.batch_shards(cfg, tuple(mesh.devices.shape)):
    rows = np.arange(len(prompt))
  res = decode.generate(cfg, params, prompt[rows], lengths[rows], jax.random.key(0), k=0,
                        temperature=0.0, eos_id=tok.eos_id, think_end_id=tok.think_end_id,
                        mesh=mesh, verify="none")
  passes = np.asarray(host_array(res.forward_passes))
  return passes if len(rows) == len(prompt) else np.repeat(passes, group_size)


def k_at(cfg: Config, step: int) -> int:
  """The rollouts' k at `step`: rl.k_schedule's, else decode.k (-1: head.k)."""
  k = cfg.decode.k if cfg.decode.k >= 0 else cfg.head.k
  for start, kk in cfg.rl.k_schedule:
    if step >= start:
      k = kk
  return k


def train_rl(cfg: Config, *, stop_after: int | None = None, progress: bool = True) -> dict:
  """GRPO in cfg.train.workdir, starting from the SFT run in cfg.train.init_from.
  Refuses a workdir another run holds."""
  with ckpt.workdir_lock(cfg.train.workdir):
    return _train_rl(cfg, stop_after, progress)


def _train_rl(cfg: Config, stop_after: int | None, progress: bool) -> dict:
  t_start = time.perf_counter()
  t, r = cfg.train, cfg.rl
  if not t.init_from:
    raise ConfigError("train.stage=rl needs train.init_from=<the SFT run's workdir>")
  ckpt.check_init_from(t.init_from, t.workdir)
  mesh = shd.make_mesh(cfg)
  B = r.prompts_per_step * r.group_size
  split = shd.batch_shards(cfg, tuple(mesh.devices.shape))
  if B % split:
    raise ConfigError(f"rl.prompts_per_step x rl.group_size = {B} is not divisible by the "
                      f"{split} batch shards of the mesh; accepted: a multiple of {split}")
  sft = ckpt.load_run(t.init_from, mesh)
  if api.param_shapes(sft.cfg) != api.param_shapes(cfg):
    raise ConfigError(f"the model/head config differs from the SFT run in {t.init_from}; "
                      "accepted: the same model and head shapes")
  tok = sft.tokenizer
  if jax.process_index() == 0:
    ckpt.write_run_files(t.workdir, cfg, tok)
  task = builders.task_for(cfg.data)
  source = builders.split_source(cfg.data, "train")
  frozen = tuple(m for m, on in (("main", r.train_main), ("head", r.train_head)) if not on)
  optimizer = optim.make_optimizer(cfg, frozen)
  ref_params = sft.params
  state = create_state(cfg, optimizer, mesh, params=jax.tree.map(lambda x: x.copy(), sft.params))
  mngr = ckpt.manager(t.workdir, cfg)
  restored = ckpt.restore_latest(mngr, state, t.workdir)
  if restored is not None:
    state, _ = restored
  s = sampling.Sampling(temperature=r.temperature)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  grpo_step = rl.make_grpo_step(cfg, mesh, optimizer, s, shardings)
  ref_fn = jax.jit(lambda p, toks, src: rl.token_logprobs(cfg, p, toks, src, s,
                                                          shd.sharder(cfg, mesh)))

  def step_fn(state, step):
    prompt, lengths, examples = _prompts(cfg, tok, source, step)
    key = jax.random.fold_in(jax.random.wrap_key_data(np.asarray(state.key)), step)
    k = k_at(cfg, step)
    # Rollouts are unverified whatever decode.verify says (it applies to evaluation):
    # the objective scores each token under its writer, and a verified answer has
    # the main model's distribution anyway.
    res = decode.generate(cfg, state.params, prompt, lengths, key, k=k, temperature=r.temperature,
                          eos_id=tok.eos_id, think_end_id=tok.think_end_id, mesh=mesh,
                          verify="none")
    res = jax.tree.map(host_array, res)
    k0 = reference_passes(cfg, ref_params, tok, prompt, lengths, mesh) if r.pass_cost else None
    rew, correct = rewards(cfg, tok, task, res, examples, k0)
    roll = rl.build_rollouts(prompt, lengths, res)
    ref_lp = np.asarray(ref_fn(ref_params, roll.tokens, roll.source))
    batch = {"tokens": roll.tokens, "source": roll.source, "old_logprobs": roll.old_logprobs,
             "ref_logprobs": np.where(roll.source >= 0, ref_lp, 0).astype(np.float32),
             "advantages": rl.group_advantages(rew, r.group_size)}
    gbatch = global_batch(cfg, mesh, batch)
    for _ in range(r.updates_per_batch):   # PPO epochs: old log-probs stay the decoder's
      state, metrics = grpo_step(state, gbatch)
      check_finite(metrics, step + 1, mngr, t.workdir)
    if r.updates_per_batch > 1:   # the state counts rollout batches, not updates
      state = state.replace(step=jax.device_put(jnp.asarray(step + 1, state.step.dtype),
                                                state.step.sharding))

    def record():
      out = _jsonable(jax.device_get(metrics))
      out.update(step=step + 1, reward_mean=float(rew.mean()), reward_std=float(rew.std()),
                 accuracy=float(correct.mean()), k=k,
                 cot_tokens=float(np.mean(np.sum(res.phase == 0, 1))),
                 forward_passes=float(res.forward_passes.mean()),
                 # the optimizer counts updates, rl.updates_per_batch per step
                 lr=float(optim.schedule(cfg)(step * r.updates_per_batch)))
      if r.pass_cost:   # passes / the reference's k=0 passes, what the reward pays
        out["pass_fraction"] = float(pass_fraction(res, k0).mean())
      return out
    return state, record

  return run_steps(
      cfg, state, mngr, step_fn, desc="rl",
      t_start=t_start, data_state=lambda done: {"step": done},
      evaluate_fn=lambda params: run_evals(cfg, params, tok, mesh, t.seed),
      postfix=lambda m: {"reward": f"{m['reward_mean']:.3f}", "kl": f"{m['kl']:.4f}"},
      stop_after=stop_after, progress=progress)


def summary_table(cfg: Config, summary: dict) -> str:
  f = summary.get("final", {})
  lines = [f"RL run {cfg.train.workdir}: {summary['step']} steps, {summary['train_seconds']}s"]
  if f:
    lines.append(f"  last step: reward {f['reward_mean']:.3f} (std {f['reward_std']:.3f}), "
                 f"accuracy {f['accuracy']:.3f}, KL {f['kl']:.5f}, clip {f['clip_frac']:.3f}, "
                 f"CoT {f['cot_tokens']:.1f} tokens, {f['forward_passes']:.1f} passes")
    lines.append("  head acceptance per depth: " + " ".join(f"{x:.3f}" for x in f["head_accept"]))
  for name, e in summary.get("eval", {}).items():
    lines.append(f"  eval {name:6s} accuracy {e['accuracy']:.3f}  forward passes "
                 f"{e['forward_passes']:.2f}  CoT tokens {e['cot_tokens']:.2f}")
  return "\n".join(lines)
