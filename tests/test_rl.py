"""GRPO: recomputed log-probs, first-step KL/ratio, the ablation switches, and a
short run whose reward rises."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax import decode, sampling
from mtcot_jax.train import loop, optim, rl, rl_loop
from mtcot_jax.tokens import EOS_ID
from mtcot_jax.train.step import create_state

B, P, G = 4, 5, 2
S = sampling.Sampling(temperature=0.9)

# Jitted (cfg and the sampling settings static): one compile per config instead of
# one per primitive, and a program the persistent cache keeps.
_token_logprobs = jax.jit(rl.token_logprobs, static_argnums=(0, 4))
_grpo_loss = jax.jit(rl.grpo_loss, static_argnums=(0, 4))


@functools.partial(jax.jit, static_argnums=0)
def _grpo_grads(cfg, params, batch):
  total = rl.counts(cfg, batch)
  return jax.grad(lambda p: rl.grpo_loss(cfg, p, batch, total, S)[0])(params)


@pytest.fixture(scope="module")
def rparams(tiny_params):
  return jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x, tiny_params)


def _sample_rollouts(cfg, params, seed, key):
  """Sampled k=3 generations for B ragged random prompts, as GRPO's rollouts."""
  prompt = np.random.default_rng(seed).integers(6, cfg.model.vocab_size, (B, P)).astype(np.int32)
  lengths = np.array([5, 3, 4, 2])
  res = jax.tree.map(np.asarray, decode.generate(
      cfg, params, prompt, lengths, jax.random.key(key), k=3, temperature=S.temperature,
      max_cot_tokens=8, max_answer_tokens=3))
  return res, rl.build_rollouts(prompt, lengths, res)


@pytest.fixture(scope="module")
def rollout(tiny_cfg, rparams):
  res, roll = _sample_rollouts(tiny_cfg, rparams, seed=0, key=5)
  batch = {"tokens": roll.tokens, "source": roll.source, "old_logprobs": roll.old_logprobs,
           "advantages": np.array([1.0, -1.0, 0.5, -0.5], np.float32)}
  return res, roll, batch


def test_recomputed_logprobs_equal_decoders(tiny_cfg, rparams, rollout):
  res, roll, _ = rollout
  lp = np.asarray(_token_logprobs(tiny_cfg, rparams, roll.tokens, roll.source, S))
  gen = roll.source >= 0
  assert set(np.unique(roll.source[gen])) == {0, 1, 2, 3}
  np.testing.assert_allclose(lp[gen], roll.old_logprobs[gen], atol=1e-5, rtol=1e-5)


def _with_ref(cfg, params, batch):
  ref = np.asarray(_token_logprobs(cfg, params, batch["tokens"], batch["source"], S))
  return {**batch, "ref_logprobs": np.where(batch["source"] >= 0, ref, 0).astype(np.float32)}


def test_first_step_kl_zero_ratio_one(tiny_cfg, rparams, rollout):
  batch = jax.tree.map(jnp.asarray, _with_ref(tiny_cfg, rparams, rollout[2]))
  total = rl.counts(tiny_cfg, batch)
  loss, sums = _grpo_loss(tiny_cfg, rparams, batch, total, S)
  m = rl.finalize(sums, total)
  assert abs(float(m["kl"])) < 1e-6 and abs(float(m["ratio"]) - 1) < 1e-5
  assert float(m["clip_frac"]) == 0.0
  # Within the clip range and with lp = ref (no KL), the loss is minus the
  # token average of ratio * advantage, ratio = exp(ref - old) per token. The
  # rest is float32 rounding: the sum over n tokens (<= n eps mean|ratio A|) and
  # lp against ref_logprobs (the same teacher-forced function, ~eps |lp| each).
  mask = np.asarray(batch["source"]) >= 0
  ref, old = (np.asarray(batch[f], np.float64) for f in ("ref_logprobs", "old_logprobs"))
  terms = mask * np.exp(ref - old) * np.asarray(batch["advantages"], np.float64)[:, None]
  want = -terms.sum() / mask.sum()
  scale = np.abs(terms).sum() / mask.sum()
  eps = np.finfo(np.float32).eps
  np.testing.assert_allclose(float(loss), want, rtol=0,
                             atol=(mask.sum() + np.abs(ref[mask]).max()) * eps * scale)


def _step(cfg, params, batch, frozen=()):
  opt = optim.make_optimizer(cfg, frozen)
  state = create_state(cfg, opt, None, params=jax.tree.map(jnp.copy, params))
  fn = rl.make_grpo_step(cfg, None, opt, S)
  new, m = fn(state, jax.tree.map(jnp.asarray, batch))
  return new.params, m


def test_train_switches(tiny_cfg, rparams, rollout):
  batch = _with_ref(tiny_cfg, rparams, rollout[2])
  for off in ("main", "head"):
    cfg = tiny_cfg.replace(rl={f"train_{off}": False}, train={"warmup_steps": 0})
    frozen = (off,)
    new, _ = _step(cfg, rparams, batch, frozen)
    jax.tree.map(np.testing.assert_array_equal, new[off], rparams[off])
    on = "head" if off == "main" else "main"
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), new[on],
                                         rparams[on]))
    assert any(moved), f"{on} did not train"


def test_stop_gradient_residual_head_tokens_give_main_no_gradient(tiny_cfg, rparams, rollout):
  batch = _with_ref(tiny_cfg, rparams, rollout[2])
  # Keep only the head's tokens in the loss.
  head_only = {**batch, "source": np.where(batch["source"] > 0, batch["source"], -1)}
  head_only = jax.tree.map(jnp.asarray, head_only)
  g = _grpo_grads(tiny_cfg, rparams, head_only)
  assert any(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g["main"]))
  g = _grpo_grads(tiny_cfg.replace(head={"stop_gradient_residual": True}), rparams, head_only)
  for path, x in jax.tree_util.tree_leaves_with_path(g["main"]):
    assert float(jnp.abs(x).sum()) == 0.0, jax.tree_util.keystr(path)
  assert any(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g["head"]))


def test_group_advantages():
  adv = rl.group_advantages(np.array([1.0, 0.0, 1.0, 1.0]), 2)
  np.testing.assert_allclose(adv, [0.5 / (np.sqrt(0.5) + 1e-4), -0.5 / (np.sqrt(0.5) + 1e-4), 0, 0],
                             rtol=1e-6)


def _one_digit(tmp_path):
  """A tiny model on 1x1-digit products, its data under tmp_path."""
  return ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
          "model.num_kv_heads=2", "model.mlp_dim=64", "head.k=2", "head.width=16",
          "head.num_heads=2", "head.mlp_dim=32", "data.task_args={digits: 1}",
          # 1x1 digits has 100 questions: 250 training seeds leave ~8 for the held-out splits.
          "data.train_size=250", "data.eval_size=3", "data.seq_len=16",
          f"data.data_dir={tmp_path}/data", "train.eval_examples=0", "train.log_every=1",
          "decode.max_cot_tokens=6", "decode.max_answer_tokens=4"]


# GRPO's rollouts in both RL runs below: 8 prompts x 8 samples at temperature 1, no
# KL term. One batch shape and one sampling setting: the two runs' decode loops
# and reference log-probs are the same programs (the second run's come from the
# persistent compile cache).
RL_ROLLOUTS = ["rl.prompts_per_step=8", "rl.group_size=8", "rl.beta=0.0", "rl.temperature=1.0",
               "rl.format_reward=1.0", "train.warmup_steps=0", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  """A tiny model SFT'd briefly on 1x1-digit products (it stays imperfect: wrong
  products, CoTs and answers not closed): the start of both RL runs. Returns
  (the dataset's overrides, the SFT workdir)."""
  tmp = tmp_path_factory.mktemp("rl_sft")
  base = _one_digit(tmp)
  sft = mt.load_config(None, base + ["train.steps=60", "train.batch_size=32",
                                     "train.learning_rate=3e-3", "train.warmup_steps=10",
                                     f"train.workdir={tmp}/sft"])
  loop.train(sft, progress=False)
  return base, sft.train.workdir


def _rl_rows(cfg):
  with open(os.path.join(cfg.train.workdir, "metrics.jsonl")) as f:
    return [row for row in map(json.loads, f) if "reward_mean" in row]


def test_reward_rises(sft_run, tmp_path):
  """GRPO from the briefly SFT'd model with the task reward plus a format reward:
  the mean reward of the last RL steps beats the first ones."""
  base, sft = sft_run
  cfg = mt.load_config(None, base + RL_ROLLOUTS + [
      "train.stage=rl", f"train.init_from={sft}", f"train.workdir={tmp_path}/rl",
      "train.steps=30", "train.learning_rate=1e-3"])
  rl_loop.train_rl(cfg, progress=False)
  r = [row["reward_mean"] for row in _rl_rows(cfg)]
  first, last = np.mean(r[:8]), np.mean(r[-8:])
  assert first < 1.5, f"SFT left no room: {first}"
  assert last > first + 0.05, (first, last)


@pytest.mark.parametrize("context", [0, -1])
def test_recomputed_logprobs_adaptive_blocks(tiny_cfg, context):
  """GRPO's teacher-forced log-probs by writer equal the decoder's with adaptive
  blocks (cut at head_threshold), for the projection head and the head with context."""
  cfg = tiny_cfg.replace(head={"context": context}, decode={"head_threshold": 0.1})
  params = jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x,
                        mt.init_params(cfg, jax.random.key(4)))
  _, roll = _sample_rollouts(cfg, params, seed=1, key=6)
  lp = np.asarray(_token_logprobs(cfg, params, roll.tokens, roll.source, S))
  gen = roll.source >= 0
  assert np.any(roll.source[gen] > 0) and not np.all(roll.source[gen] > 0)
  np.testing.assert_allclose(lp[gen], roll.old_logprobs[gen], atol=1e-5, rtol=1e-5)


def test_pass_cost_and_k_schedule(tiny_cfg, rparams):
  """The pass cost's normaliser is each prompt's k=0 greedy passes under the
  reference (one decode per group, repeated over its rows); pass_fraction is
  exactly 1 for those k=0 rollouts and passes / that for others, budget-forced
  rows included; the reward pays it; k_schedule picks k by step."""
  rng = np.random.default_rng(2)
  prompt = np.repeat(rng.integers(6, tiny_cfg.model.vocab_size, (B // G, P)).astype(np.int32),
                     G, axis=0)
  lengths = np.repeat(np.array([5, 3]), G)
  cfg = tiny_cfg.replace(rl={"pass_cost": 0.5, "k_schedule": [[0, 1], [10, 3]]},
                         decode={"max_cot_tokens": 8, "max_answer_tokens": 3})

  class Tok:   # answer_text needs decode(); every answer is wrong here
    eos_id, think_end_id = EOS_ID, decode.THINK_END_ID
    def decode(self, ids):
      return "x"
  assert cfg.rl.group_size != G   # the prompts come in groups of G here
  k0 = rl_loop.reference_passes(cfg.replace(rl={"group_size": G}), rparams, Tok(), prompt,
                                lengths)
  greedy = jax.tree.map(np.asarray, decode.generate(cfg, rparams, prompt, lengths,
                                                    jax.random.key(0), k=0, temperature=0.0))
  np.testing.assert_array_equal(k0, greedy.forward_passes)
  np.testing.assert_array_equal(rl_loop.pass_fraction(greedy, k0), np.ones(B, np.float32))
  res = jax.tree.map(np.asarray, decode.generate(   # _sample_rollouts' settings (k=3)
      cfg, rparams, prompt, lengths, jax.random.key(9), k=3, temperature=S.temperature))
  frac = rl_loop.pass_fraction(res, k0)
  np.testing.assert_allclose(frac, res.forward_passes / greedy.forward_passes, rtol=1e-6)
  task = mt.get_task("mult", digits=1)
  examples = [task.example(i) for i in range(B)]
  reward, correct = rl_loop.rewards(cfg, Tok(), task, res, examples, k0)
  np.testing.assert_allclose(reward, -0.5 * frac, rtol=1e-6)
  with pytest.raises(ValueError, match="k0_passes"):
    rl_loop.rewards(cfg, Tok(), task, res, examples)
  assert [rl_loop.k_at(cfg, s) for s in (0, 9, 10, 50)] == [1, 1, 3, 3]
  with pytest.raises(mt.ConfigError, match="rl.k_schedule"):
    tiny_cfg.replace(rl={"k_schedule": [[5, 1]]})


def test_updates_per_batch(sft_run, tmp_path):
  """rl.updates_per_batch=2: two optimizer steps per rollout batch (the second one
  sees a ratio != 1, so the clip can act), the state still counts batches."""
  base, sft = sft_run
  cfg = mt.load_config(None, base + RL_ROLLOUTS + [
      "train.stage=rl", f"train.init_from={sft}", f"train.workdir={tmp_path}/rl",
      "train.steps=2", "train.learning_rate=1e-2", "rl.updates_per_batch=2",
      "rl.pass_cost=0.5"])
  summary = rl_loop.train_rl(cfg, progress=False)
  assert summary["step"] == 2
  rows = _rl_rows(cfg)
  assert [r["step"] for r in rows] == [1, 2]
  assert all(r["pass_fraction"] > 0 for r in rows)   # the loop's reference passes
  assert any(abs(r["ratio"] - 1.0) > 1e-4 for r in rows), rows   # the 2nd update's ratio
