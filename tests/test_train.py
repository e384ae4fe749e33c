"""SFT: the loss against a numpy reference, accumulation, optimizer switches, and
whole runs (loss falls, exact resume, NaN handling, load_run)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax.train import loop, losses, optim
from mtcot_jax.train.step import create_state
from conftest import TINY, assert_adam_params_close

RUN = TINY + ["data.task_args={digits: 2}", "data.train_size=512", "data.eval_size=16",
              "data.seq_len=32", "train.eval_examples=0", "train.log_every=1",
              "train.warmup_steps=2", "train.learning_rate=3e-3", "decode.max_cot_tokens=16",
              "decode.max_answer_tokens=6"]


# Jitted (cfg static): one compile per config instead of one per primitive.
_loss_and_metrics = jax.jit(losses.loss_and_metrics, static_argnums=0)
_counts = jax.jit(losses.counts, static_argnums=0)


def _cfg(tmp, *extra):
  return mt.load_config(None, RUN + [f"data.data_dir={tmp}/data", f"train.workdir={tmp}/run",
                                     *extra])


def _batch(cfg, seed=0):
  """A small hand-made batch: two packed segments in row 0, one in row 1."""
  rng = np.random.default_rng(seed)
  B, T = 2, 12
  inputs = rng.integers(6, cfg.model.vocab_size, (B, T)).astype(np.int32)
  seg = np.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], np.int32)
  pos = np.array([list(range(7)) + list(range(5)), list(range(9)) + [0] * 3], np.int32)
  targets = np.roll(inputs, -1, axis=1)
  targets[0, 6] = targets[0, 11] = targets[1, 8] = 0      # segment ends
  targets[1, 9:] = 0
  cot = np.zeros((B, T), np.float32)
  ans = np.zeros((B, T), np.float32)
  cot[0, 1:4] = 1
  ans[0, 4:6] = 1
  cot[0, 8:10] = 1
  ans[0, 10] = 1
  cot[1, 2:7] = 1
  ans[1, 7] = 1
  return {"inputs": inputs, "targets": targets, "positions": pos, "segment_ids": seg,
          "cot_mask": cot, "answer_mask": ans}


def _reference_loss(cfg, params, b):
  """Independent: full (B, T, k, V) head logits in numpy, masks built by loops."""
  out = mt.forward(cfg, params, b["inputs"], positions=b["positions"],
                   segment_ids=b["segment_ids"])
  logits = np.asarray(out.logits, np.float64)
  hl = np.asarray(mt.head_logits(cfg, params, out.head_features), np.float64)  # (B,T,k,V)

  def ce(lg, t):
    m = lg.max()
    return np.log(np.exp(lg - m).sum()) + m - lg[t]

  B, T = b["inputs"].shape
  k = cfg.head.k
  main_sum, main_n = 0.0, 0
  head_sum, head_n = np.zeros(k), np.zeros(k)
  for i in range(B):
    for t in range(T):
      if b["cot_mask"][i, t] + b["answer_mask"][i, t]:
        main_sum += ce(logits[i, t], b["targets"][i, t])
        main_n += 1
      for j in range(1, k + 1):      # chain at source t, depth j: predicts x[t+1+j]
        u = t + j                    # = targets[u]
        ans = cfg.head.answer_targets
        target = u < T and (b["cot_mask"][i, u] or (ans and b["answer_mask"][i, u]))
        if target and b["segment_ids"][i, u] == b["segment_ids"][i, t]:
          head_sum[j - 1] += ce(hl[i, t, j - 1], b["targets"][i, u])
          head_n[j - 1] += 1
  head = np.mean(head_sum / np.maximum(head_n, 1))
  return main_sum / main_n + cfg.head.loss_weight * head, head_n


@pytest.mark.parametrize("answer_targets", [False, True])
def test_loss_matches_numpy_reference(tiny_cfg, tiny_params, answer_targets):
  cfg = tiny_cfg.replace(head={"k": 3, "answer_targets": answer_targets})
  b = _batch(cfg)
  want, head_n = _reference_loss(cfg, tiny_params, b)
  jb = jax.tree.map(jnp.asarray, b)
  total = _counts(cfg, jb)
  np.testing.assert_array_equal(np.asarray(total.head), head_n)
  got, _ = _loss_and_metrics(cfg, tiny_params, jb, total)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_head_train_positions_keep_every_target(tiny_cfg, tiny_params):
  """Chains at 6 of 12 positions (those with CoT targets first) give the loss of
  chains everywhere when no row has more than 6 such positions."""
  cfg = tiny_cfg.replace(head={"k": 3})
  b = jax.tree.map(jnp.asarray, _batch(cfg))
  full, _ = _loss_and_metrics(cfg, tiny_params, b, _counts(cfg, b))
  sub = cfg.replace(head={"train_positions": 6})
  src = losses.head_sources(sub, b)
  assert src.shape == (2, 6)
  np.testing.assert_array_equal(_counts(sub, b).head, _counts(cfg, b).head)
  got, _ = _loss_and_metrics(sub, tiny_params, b, _counts(sub, b))
  np.testing.assert_allclose(float(got), float(full), rtol=1e-6)


def test_grad_accumulation_equals_full_batch(tiny_cfg, tiny_params):
  cfg = tiny_cfg.replace(train={"batch_size": 4})
  b = _batch(cfg)
  b = jax.tree.map(lambda x: jnp.concatenate([x, x[::-1]], 0), b)   # 4 rows
  results = []
  for accum in (1, 2):
    c = cfg.replace(train={"grad_accum": accum})
    opt = optim.make_optimizer(c)
    state = create_state(c, opt, None, params=jax.tree.map(jnp.copy, tiny_params))
    step = losses.make_sft_step(c, None, opt)
    new, m = step(state, b)
    results.append((new.params, m["loss"], m["grad_norm"]))
  # The loss and the gradient's norm: sums of a few hundred float32 terms taken in
  # another order (relative error ~ terms x 6e-8); Adam's first update does not
  # see the gradient's scale, hence grad_norm. Parameters: AdamW's bound.
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=2e-5)
  np.testing.assert_allclose(results[0][2], results[1][2], rtol=2e-5)
  assert_adam_params_close(results[0][0], results[1][0], cfg, steps=1)


def test_freeze_main(tiny_cfg, tiny_params):
  cfg = tiny_cfg.replace(train={"freeze_main": True})
  opt = optim.make_optimizer(cfg, frozen=("main",))
  state = create_state(cfg, opt, None, params=jax.tree.map(jnp.copy, tiny_params))
  step = losses.make_sft_step(cfg, None, opt)
  b = jax.tree.map(jnp.asarray, _batch(cfg))
  for _ in range(2):
    state, _ = step(state, b)
  jax.tree.map(np.testing.assert_array_equal, state.params["main"], tiny_params["main"])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                         state.params["head"], tiny_params["head"]))
  assert all(changed)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("full")
  cfg = _cfg(tmp, "train.steps=40", "train.checkpoint_every=20")
  summary = loop.train(cfg, progress=False)
  return cfg, summary


def test_loss_falls_and_files_written(full_run):
  cfg, summary = full_run
  rows = [r for r in _metrics(cfg.train.workdir) if "loss" in r]
  first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
  assert last < 0.7 * first, (first, last)
  assert len(rows[-1]["head_acc"]) == cfg.head.k
  for name in ("config.yaml", "tokenizer.model", "checkpoints"):
    assert os.path.exists(os.path.join(cfg.train.workdir, name))


def test_load_run_and_decode(full_run):
  cfg, summary = full_run
  run = mt.load_run(cfg.train.workdir)
  assert run.cfg == cfg and run.step == cfg.train.steps
  jax.tree.map(np.testing.assert_array_equal, run.params, summary["params"])
  ids = mt.encode_prompt(run.tokenizer, "12*34", cot=True)
  res = mt.generate(run.cfg, run.params, np.array([ids]), np.array([len(ids)]),
                    jax.random.key(0), k=2, eos_id=run.tokenizer.eos_id,
                    think_end_id=run.tokenizer.think_end_id)
  assert int(res.lengths[0]) > 0


def test_resume_is_bit_identical(full_run, tmp_path):
  """The full run's config, interrupted after step 25 (checkpoint at 20) and
  resumed: the uninterrupted run's parameters and losses, bit for bit (its
  compiled step comes from the persistent cache)."""
  a, _ = full_run
  b = a.replace(train={"workdir": str(tmp_path / "run")})
  stopped = loop.train(b, stop_after=25, progress=False)    # interrupted after step 25
  assert stopped == {"stopped_at": 25}
  assert mt.load_run(b.train.workdir).step == 20
  loop.train(b, progress=False)                             # resumes from step 20
  pa, pb = mt.load_run(a.train.workdir).params, mt.load_run(b.train.workdir).params
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  # Steps 21-25, logged before the interruption, are dropped on resume and logged
  # again: every step once, with the uninterrupted run's losses.
  la = [(r["step"], r["loss"]) for r in _metrics(a.train.workdir) if "loss" in r]
  lb = [(r["step"], r["loss"]) for r in _metrics(b.train.workdir) if "loss" in r]
  assert lb == la and [s for s, _ in la] == list(range(1, a.train.steps + 1))


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = _cfg(tmp_path, "train.steps=30", "train.checkpoint_every=1", "train.learning_rate=1e30",
             "train.warmup_steps=0", "train.grad_clip=1e30")
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step") as e:
    loop.train(cfg, progress=False)
  run = mt.load_run(cfg.train.workdir)
  assert f"step {run.step})" in str(e.value)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(run.params))
