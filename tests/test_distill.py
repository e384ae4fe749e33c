"""Self-distillation of a draft head on a frozen model (mtcot_jax.train.distill) and
the draft vocabulary it decodes with (model.api.with_draft_vocab)."""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax.decode import blocks
from mtcot_jax.model import api
from mtcot_jax.model.heads import head_for
from mtcot_jax import sampling
from mtcot_jax.train import distill

B, P = 3, 6


@pytest.fixture(scope="module")
def drafted(tiny_cfg, tiny_params):
  """Random prompts; the tiny model's params with a draft vocabulary of 24 of its
  64 ids (EOS among them)."""
  rng = np.random.default_rng(3)
  prompt = rng.integers(6, tiny_cfg.model.vocab_size, (B, P)).astype(np.int32)
  ids = np.sort(np.concatenate([[2], rng.choice(np.arange(3, 64), 23, replace=False)]))
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, tiny_params)  # peaky heads
  return prompt, np.array([6, 4, 5]), ids, params


def test_verified_with_draft_vocab_is_k0(tiny_cfg, drafted):
  """Greedy verified decoding with a draft vocabulary writes k = 0's tokens exactly;
  unverified, every head token is a draft-vocabulary id."""
  prompt, lens, ids, params = drafted
  with_draft = api.with_draft_vocab(tiny_cfg, params, ids)
  run = lambda p, **kw: jax.tree.map(np.asarray, mt.generate(  # noqa: E731
      tiny_cfg, p, prompt, lens, jax.random.key(0), max_cot_tokens=12, max_answer_tokens=4,
      **kw))
  k0, ver = run(params, k=0), run(with_draft, k=3, verify="all")
  L = k0.tokens.shape[1]   # the verified buffer has k slots of slack
  np.testing.assert_array_equal(ver.lengths, k0.lengths)
  np.testing.assert_array_equal(ver.tokens[:, :L], k0.tokens)
  np.testing.assert_array_equal(ver.phase[:, :L], k0.phase)
  assert ver.forward_passes.sum() <= k0.forward_passes.sum()
  unv = run(with_draft, k=3)
  head_toks = unv.tokens[unv.source > 0]
  assert head_toks.size and np.isin(head_toks, ids).all()


def test_draft_chain_distributions_cover_only_the_draft_vocab(tiny_cfg, drafted):
  """The chain's q (for speculative sampling) is the softmax over the draft ids,
  zero probability elsewhere, and the sampled tokens are draft ids."""
  _, _, ids, params = drafted
  cfg = tiny_cfg.replace(head={"source_layers": [0, -1]})
  p = api.with_draft_vocab(cfg, params, ids)
  head = head_for(cfg)
  D = cfg.model.d_model
  sources = tuple(jax.random.normal(jax.random.key(i), (B, D)) for i in range(2))
  toks, lps, q = blocks.sample_head_chain(
      head, p, (), sources, jnp.array([7, 8, 9]), jax.random.split(jax.random.key(1), 3),
      sampling.Sampling(temperature=1.0), jnp.array([5, 5, 5]), with_dists=True)
  q = np.asarray(q)
  outside = np.setdiff1d(np.arange(cfg.model.vocab_size), ids)
  assert np.all(np.isneginf(q[..., outside]))
  np.testing.assert_allclose(np.exp(q[..., ids]).sum(-1), 1.0, rtol=1e-5)
  assert np.isin(np.asarray(toks), ids).all()


def test_draft_vocabulary_most_frequent_first():
  recs = [{"response": [5, 5, 5, 7, 7, 9]}, {"response": [7, 11]}]
  np.testing.assert_array_equal(distill.draft_vocabulary(recs, 3, always=(2,)), [2, 5, 7])
  # fewer distinct tokens than asked: the smallest unused ids fill it
  np.testing.assert_array_equal(distill.draft_vocabulary(recs, 6), [0, 1, 5, 7, 9, 11])


def test_cache_marks_response_targets(tiny_cfg, tiny_params):
  recs = [{"prompt": [1, 9, 10], "response": [11, 12, 2]}, {"prompt": [1, 8], "response": [13]}]
  run = argparse.Namespace(params=tiny_params)
  c = distill.cache_sources(run, tiny_cfg, recs, batch=2)
  assert c["tokens"].shape == (2, 64) and c["sources"].shape == (2, 2, 64, 32)
  np.testing.assert_array_equal(np.nonzero(c["target"][0])[0], [2, 3, 4])   # x[3..5]
  np.testing.assert_array_equal(np.nonzero(c["target"][1])[0], [1])
  out = mt.forward(tiny_cfg, tiny_params, c["tokens"], with_head=False)
  np.testing.assert_array_equal(c["main_next"], np.argmax(np.asarray(out.logits), -1))
  np.testing.assert_allclose(c["sources"][1], np.asarray(out.sources[1]), atol=2e-3, rtol=2e-3)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  """A tiny random Llama with a chat template as a GGUF file (test_gguf's writer)."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  gguf = pytest.importorskip("gguf")
  from test_gguf import _llama, _tokenizer, _write_gguf
  tokens, merges = _tokenizer()
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  _write_gguf(path, _llama(len(tokens)), tokens, merges, gguf.GGMLQuantizationType.F32)
  return path


def test_distill_end_to_end(tiny_gguf, tmp_path):
  """The command's three stages on the tiny GGUF: responses, cached residuals, both
  heads trained (the loss falls); the saved head decodes verified = k = 0."""
  work = str(tmp_path / "distill")
  distill.main(["--gguf", tiny_gguf, "--workdir", work, "--prompts", "4", "--max-new", "16",
                "--batch", "4", "--k", "2", "--draft-vocab", "48", "--steps", "30",
                "--train-batch", "4", "--positions", "8", "--lr", "3e-3"])
  recs = distill._read_jsonl(os.path.join(work, "responses.jsonl"))
  assert len(recs) == 8 and {r["temperature"] for r in recs} == {0.0, 0.7}
  assert all(1 <= len(r["response"]) <= 16 for r in recs)
  run = mt.load_gguf(tiny_gguf)
  for name in distill.HEADS:
    log = distill._read_json(os.path.join(work, "heads", name, "train_log.json"))
    assert log[-1]["loss"] < log[0]["loss"], (name, log)
    cfg, params = distill.load_head(os.path.join(work, "heads", name), run)
    assert params["draft"]["ids"].shape == (48,)
    prompt = np.array([recs[0]["prompt"]])
    lens = np.array([len(recs[0]["prompt"])])
    gen = lambda p, **kw: mt.generate(  # noqa: E731
        cfg, p, prompt, lens, jax.random.key(0), max_cot_tokens=16, max_answer_tokens=1, **kw)
    ver, k0 = gen(params, k=2, verify="all"), gen(run.params, k=0)
    n = int(k0.lengths[0])
    assert int(ver.lengths[0]) == n
    np.testing.assert_array_equal(np.asarray(ver.tokens)[0, :n], np.asarray(k0.tokens)[0, :n])


def test_head_loss_equals_the_sft_loss_head_terms(tiny_cfg, tiny_params):
  """With the whole vocabulary as the draft vocabulary and every position a source,
  the distillation loss's per-depth sums (CE, accuracy, agreement with the main
  model's greedy token) are the SFT loss's head terms (losses.loss_and_metrics)
  on the same tokens with the response as the CoT."""
  from mtcot_jax.train import losses
  cfg = tiny_cfg.replace(head={"train_positions": 0})
  k, V = cfg.head.k, cfg.model.vocab_size
  rng = np.random.default_rng(5)
  T = 16
  tokens = rng.integers(3, V, (2, T)).astype(np.int32)
  target = np.zeros((2, T), np.int8)
  target[0, 3:14], target[1, 5:15] = 1, 1            # x[t+1] is a response token
  out = mt.forward(cfg, tiny_params, tokens, with_head=False)
  batch = {"tokens": tokens, "target": target, "sources": out.sources,
           "main_next": np.argmax(np.asarray(out.logits), -1)}
  ids = np.arange(V, dtype=np.int32)
  draft = {"ids": jnp.asarray(ids), "index": jnp.asarray(ids),
           "unembed": api.unembed_matrix(cfg, tiny_params)}
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  _, got = distill.head_loss(cfg, tiny_params["head"], tiny_params["main"], draft, batch, pos)
  sft = {"inputs": tokens, "targets": np.pad(tokens[:, 1:], ((0, 0), (0, 1))),
         "cot_mask": target.astype(np.float32), "answer_mask": np.zeros((2, T), np.float32),
         "segment_ids": np.ones((2, T), np.int32),
         "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))}
  sft = jax.tree.map(jnp.asarray, sft)
  _, want = losses.loss_and_metrics(cfg, tiny_params, sft, losses.counts(cfg, sft))
  # sums of <= 32 float32 CEs of O(5): rounding ~1e-5 relative
  np.testing.assert_allclose(np.asarray(got["loss"]), np.asarray(want["head_loss"]), rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(got["acc"]), np.asarray(want["head_acc"]))
  np.testing.assert_array_equal(np.asarray(got["accept"]), np.asarray(want["head_accept"]))
  assert k == 5 and float(np.asarray(got["n"])[0]) == target.sum()   # depth 1: each target once
