"""Verified decoding (decode.verify): lossless against k=0 decoding, token for token
(greedy) and in distribution (sampling), with the pass and acceptance counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import mtcot_jax as mt
from mtcot_jax import decode, sampling
from mtcot_jax.model import api
from test_decode import LENS, B, _full_sequences, _gen, _stop_token
from test_decode import dparams, prompt  # noqa: F401  (fixtures: the decode tests' batch)

K = 3


@pytest.fixture(scope="module")
def stop(tiny_cfg, dparams, prompt):
  """A token standing in for </think>, so that the CoTs end at different places."""
  return _stop_token(_gen(tiny_cfg, dparams, prompt, k=0), 0)


def _distill_head(cfg, params, head, prompt, stop, steps=200):
  """Briefly trained parameters: the head (main frozen) learns the main model's own
  greedy continuations of these prompts, so that its drafts are often accepted."""
  ref = _gen(cfg, params, prompt, k=0, think_end_id=stop)
  seq = _full_sequences(prompt, ref)
  T, k = seq.shape[1], cfg.head.k
  end = LENS + ref.lengths
  tgt = np.zeros((B, T, k), np.int32)
  mask = np.zeros((B, T, k), np.float32)
  for b in range(B):
    for t in range(LENS[b] - 1, end[b] - 1):     # chains that draft generated tokens
      for j in range(1, k + 1):
        if t + 1 + j < end[b]:
          tgt[b, t, j - 1], mask[b, t, j - 1] = seq[b, t + 1 + j], 1.0

  def loss_fn(h):
    p = {"main": params["main"], "head": h}
    logp = jax.nn.log_softmax(api.head_logits(cfg, p, api.apply(cfg, p, seq).head_features))
    nll = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)

  opt = optax.adam(1e-2)

  @jax.jit
  def step(h, s):
    g = jax.grad(loss_fn)(h)
    u, s = opt.update(g, s, h)
    return optax.apply_updates(h, u), s

  s = opt.init(head)
  for _ in range(steps):
    head, s = step(head, s)
  return {"main": params["main"], "head": head}


@pytest.fixture(scope="module", params=["random", "distilled", "distilled-context"])
def model(request, tiny_cfg, tiny_params, dparams, prompt, stop):
  if request.param == "random":
    return request.param, tiny_cfg, dparams
  cfg = tiny_cfg
  head = tiny_params["head"]
  if request.param == "distilled-context":
    cfg = tiny_cfg.replace(head={"context": -1})
    head = mt.init_params(cfg, jax.random.key(3))["head"]
  return request.param, cfg, _distill_head(cfg, dparams, head, prompt, stop)


def _expected_passes(res, b, verify):
  """Per sequence: 1 (prefill) + one pass per iteration, i.e. per main-model token
  (each starts a verified iteration or an unverified CoT block), except a last
  token of the main model's that ends the sequence (EOS or the answer's limit:
  nothing reads it). An unverified CoT block that ends the sequence with EOS
  costs no pass either."""
  n = res.lengths[b]
  src, phase = res.source[b, :n], res.phase[b, :n]
  if verify == "answer" and np.all(phase == 0) and res.finished[b]:
    return 1 + int(np.sum(src == 0)) - 1
  return 1 + int(np.sum(src == 0)) - int(src[-1] == 0)


@pytest.mark.parametrize("verify", ["all", "answer"])
def test_greedy_verified_is_lossless(model, prompt, stop, verify):
  """verify=all writes k=0's tokens, token for token, with the main model's
  log-probs; verify=answer writes the unverified CoT of the same k and k=0's answer
  (what the one-token answer loop writes). Ragged prompts, CoTs ending at different
  places, budget forcing, the answer limit. Passes and accepted drafts follow their
  formulas, and every kept draft saves a pass (except one that ends the sequence)."""
  kind, cfg, params = model
  res = _gen(cfg, params, prompt, k=K, think_end_id=stop, verify=verify)
  ref = _gen(cfg, params, prompt, k=0 if verify == "all" else K, think_end_id=stop)
  n = ref.tokens.shape[1]
  for field in ("tokens", "phase"):
    np.testing.assert_array_equal(getattr(res, field)[:, :n], getattr(ref, field), field)
  # The same log-probs, up to float32 rounding: a pass over a block of k+1 tokens
  # orders XLA's reductions differently from one over a single token (the
  # decode tests' teacher-forcing tolerance).
  np.testing.assert_allclose(res.logprobs[:, :n], ref.logprobs, atol=1e-5, rtol=1e-5)
  assert np.all(res.tokens[:, n:] == decode.PAD_ID)
  for field in ("lengths", "finished", "cot_forced"):
    np.testing.assert_array_equal(getattr(res, field), getattr(ref, field), field)
  verified = (res.phase >= 0) if verify == "all" else (res.phase == 1)
  np.testing.assert_array_equal(res.accepted, np.sum((res.source > 0) & verified, axis=1))
  if verify == "answer":
    assert np.all(res.source[res.phase == 0] == ref.source[ref.phase == 0])
  for b in range(B):
    assert res.forward_passes[b] == _expected_passes(res, b, verify), b
    last_draft = int(res.source[b, res.lengths[b] - 1] > 0)
    assert res.forward_passes[b] == ref.forward_passes[b] - res.accepted[b] + last_draft, b
  if verify == "all":
    assert np.any(res.cot_forced) and not np.all(res.cot_forced)
  if kind != "random":       # the briefly trained head's drafts are kept often
    assert res.accepted.sum() >= np.sum(verified) // 4
    assert res.forward_passes.sum() < ref.forward_passes.sum()


V, EOS, THINK_END = 8, 6, 7


@pytest.fixture(scope="module")
def small_vocab(tiny_cfg):
  cfg = tiny_cfg.replace(model={"vocab_size": V})
  params = mt.init_params(cfg, jax.random.key(5))
  return cfg, jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, params)


def _three_step_distribution(cfg, params, prompt, s):
  """The main model's own distribution of the first three generated tokens
  (value V: the sequence has ended), by teacher forcing every prefix."""
  seqs = np.array([list(prompt) + [a, b] for a in range(V) for b in range(V)])
  logits = mt.forward(cfg, params, seqs, with_head=False).logits
  p = np.exp(np.asarray(sampling.process_logits(logits, s), np.float64))
  n = len(prompt)
  p1, p2, p3 = p[0, n - 1], p[::V, n], p[:, n + 1].reshape(V, V, V)
  dist = np.zeros((V + 1,) * 3)
  for a in range(V):
    if a == EOS:
      dist[a, V, V] = p1[a]
      continue
    for b in range(V):
      if b == EOS:
        dist[a, b, V] = p1[a] * p2[a, b]
      else:
        dist[a, b, :V] = p1[a] * p2[a, b] * p3[a, b]
  return dist / dist.sum()


def _chi_square_pvalue(tokens, dist):
  obs = np.bincount(np.ravel_multi_index(tokens.T, dist.shape), minlength=dist.size)
  exp = dist.reshape(-1) * len(tokens)
  if obs[exp == 0].sum() > 0:
    return 0.0                                     # an outcome the main model cannot produce
  big = exp >= 5                                   # pool the sparse cells
  o, e = obs[big].astype(float), exp[big]
  if exp[~big].sum() > 0:
    o, e = np.append(o, obs[~big].sum()), np.append(e, exp[~big].sum())
  return stats.chi2.sf(np.sum((o - e) ** 2 / e), len(o) - 1)


def _first_three(cfg, params, prompt, s, n=8192, draws=1):
  out = []
  for r in range(draws):
    res = decode.generate(cfg, params, np.repeat(prompt[None], n, 0), np.full(n, len(prompt)),
                          jax.random.key(100 + r), k=1, temperature=s.temperature,
                          top_k=s.top_k, max_cot_tokens=3, max_answer_tokens=3, eos_id=EOS,
                          think_end_id=THINK_END, verify="all")
    t, length = np.asarray(res.tokens[:, :3]), np.asarray(res.lengths)
    out.append(np.where(np.arange(3)[None] < length[:, None], t, V))
  return np.concatenate(out)


def test_sampling_verified_has_the_main_models_distribution(small_vocab, monkeypatch):
  """With k=1 the first three tokens go through an accepted or rejected draft, the
  residual distribution after a rejection and the main model's token after an
  accepted block. Their empirical distribution (8,192 samples, a fixed key) matches
  the main model's own three-step distribution by a chi-square test; the same test
  rejects two wrong rules: a fresh main-model sample after a rejection (instead of
  the residual), and keeping every draft.

  The power: n samples from a distribution at chi-square divergence D from the
  main model's give a statistic of about df + n D. The fresh-sample rule is at
  D ~ 0.18 here (1,680 on 205 degrees of freedom at n = 8,192, p ~ 1e-229; 5,920 at
  32,768), and p < 1e-6 needs a statistic above 316, n D ~ 111: 8,192 samples
  would still reject a rule at 1/13 of its divergence. Keeping every draft writes
  sequences the main model cannot (p = 0 at any n). The right rule gives p = 0.66
  at 8,192 samples (0.91 at 32,768)."""
  cfg, params = small_vocab
  s = sampling.Sampling(temperature=0.9, top_k=6)
  prompt = np.array([1, 3, 4])
  dist = _three_step_distribution(cfg, params, prompt, s)
  assert _chi_square_pvalue(_first_three(cfg, params, prompt, s), dist) > 1e-3

  right = decode.speculative_accept

  def fresh_after_rejection(key, p, q, d, greedy):
    a, _ = right(key, p, q, d, greedy)
    p_a = jnp.take_along_axis(p, jnp.minimum(a, d.shape[1] - 1)[:, None, None], 1)[:, 0]
    return a, jax.random.categorical(jax.random.fold_in(key, 1), p_a).astype(jnp.int32)

  def keep_all(key, p, q, d, greedy):
    return jnp.full(d.shape[:1], d.shape[1], jnp.int32), d[:, 0]

  def clear_compiled():   # the loops were traced with the rule they read then
    decode.Decoder.run_cot.clear_cache()
    decode.Decoder.run_answer.clear_cache()

  for wrong in (fresh_after_rejection, keep_all):
    monkeypatch.setattr(decode.blocks, "speculative_accept", wrong)
    clear_compiled()
    assert _chi_square_pvalue(_first_three(cfg, params, prompt, s), dist) < 1e-6, wrong
  monkeypatch.undo()
  clear_compiled()


def test_verify_bad_input(tiny_cfg, dparams, prompt):
  with pytest.raises(ValueError, match="verify='maybe'.*none, answer, all"):
    decode.generate(tiny_cfg, dparams, prompt, LENS, jax.random.key(0), k=3, verify="maybe")
  with pytest.raises(ValueError, match="decode.verify"):
    mt.load_config(None, ["decode.verify=yes"])


def test_cut_block_commits_what_the_limits_allow():
  """Hand-made blocks (E = EOS, T = </think>) against the rules written out: the
  CoT may end with </think> just after its last budgeted token; an answer never
  exceeds its room, even through a kept EOS beyond it (a case the verified answer
  once committed, past max_answer_tokens)."""
  E, T, x = 2, 5, 9
  block = jnp.array([[x, x, x, E],     # answer, room 2: EOS at 3 is past the room
                     [x, E, x, x],     # answer, room 2: EOS at 1 ends it
                     [x, x, T, x],     # CoT, budget 2: </think> right after the budget
                     [x, x, x, T],     # CoT, budget 2, keep 4: cut at the budget
                     [x, T, x, x]])    # inactive
  keep = jnp.array([4, 4, 4, 4, 4])
  limit = jnp.array([2, 2, 2, 2, 2])
  active = jnp.array([True, True, True, True, False])
  n, ended, tok = decode.cut_block(block[:2], keep[:2], limit[:2], active[:2], (E,), limit[:2] - 1)
  np.testing.assert_array_equal(n, [2, 2])
  np.testing.assert_array_equal(ended, [False, True])
  n, ended, tok = decode.cut_block(block[2:], keep[2:], limit[2:], active[2:], (T, E), limit[2:])
  np.testing.assert_array_equal(n, [3, 2, 0])
  np.testing.assert_array_equal(ended, [True, False, False])
  assert int(tok[0]) == T
  n, _, _ = decode.cut_block(block[:1], jnp.array([1]), jnp.array([3]), active[:1], (E,),
                             jnp.array([2]))
  np.testing.assert_array_equal(n, [1])              # only x1 kept: the drafts never count
