"""decode.pass_budget: the CoT closed by force after B main passes, against
references built from unbudgeted runs (greedy: the budgeted CoT is the unbudgeted
one cut where B passes end) and from a k=0 run on the cut CoT as its prompt."""

import jax
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax import decode

from test_decode import B, LENS, P, dparams, prompt  # noqa: F401  (the same fixtures)

MAX_COT, MAX_ANS, EOS = 12, 4, 63


def _gen(cfg, params, prompt, lens=LENS, **kw):
  kw = {"max_cot_tokens": MAX_COT, "max_answer_tokens": MAX_ANS, "eos_id": EOS, **kw}
  return jax.tree.map(np.asarray, decode.generate(cfg, params, prompt, lens,
                                                  jax.random.key(0), **kw))


def _cot(res, r):
  """Row r's CoT tokens before its </think> (or all of its CoT if it has none)."""
  toks = res.tokens[r, : res.lengths[r]][res.phase[r, : res.lengths[r]] == 0]
  return toks[:-1] if len(toks) and toks[-1] == decode.THINK_END_ID else toks


def _check_cut(free, cut, r, n_keep, budget):
  """Row r of the budgeted run `cut` against the unbudgeted `free`: the first
  n_keep CoT tokens, then a forced </think>, after `budget` CoT passes."""
  cot = _cot(cut, r)
  np.testing.assert_array_equal(cot, _cot(free, r)[:n_keep])
  assert cut.cot_forced[r]
  n_cot = len(cot) + 1
  assert cut.tokens[r, len(cot)] == decode.THINK_END_ID and cut.source[r, len(cot)] == 0
  L_ans = int(np.sum(cut.phase[r] == 1))
  assert cut.forward_passes[r] == 1 + budget + 1 + max(L_ans - 1, 0), r
  return n_cot


def test_k0_budget_cuts_the_cot_and_answers_from_it(tiny_cfg, dparams, prompt):
  """k=0, B passes: the CoT holds the unbudgeted CoT's first B tokens, then a
  forced </think>; the answer is what k=0 writes from that CoT as its prompt."""
  budget = 4
  free = _gen(tiny_cfg, dparams, prompt, k=0)
  cut = _gen(tiny_cfg, dparams, prompt, k=0, pass_budget=budget)
  assert sum(len(_cot(free, r)) > budget for r in range(B)) >= 2, "too few rows to cut"
  forced_prompt = np.zeros((B, P + budget + 1), np.int32)
  lens = LENS + budget + 1
  for r in range(B):
    if len(_cot(free, r)) <= budget:        # ended on its own within the budget
      n = free.lengths[r]
      np.testing.assert_array_equal(cut.tokens[r, :n], free.tokens[r, :n])
      assert cut.forward_passes[r] == free.forward_passes[r]
      lens[r] = LENS[r]
      forced_prompt[r, : LENS[r]] = prompt[r, : LENS[r]]
      continue
    _check_cut(free, cut, r, budget, budget)
    forced_prompt[r, : lens[r]] = np.concatenate(
        [prompt[r, : LENS[r]], _cot(free, r)[:budget], [decode.THINK_END_ID]])
  # The reference answer: k=0 from prompt + cut CoT + </think> (no CoT to write).
  ref = _gen(tiny_cfg, dparams, forced_prompt, lens, k=0)
  for r in range(B):
    if not cut.cot_forced[r]:
      continue
    ans = cut.tokens[r][cut.phase[r] == 1]
    np.testing.assert_array_equal(ans, ref.tokens[r, : ref.lengths[r]])
    assert np.all(ref.phase[r, : ref.lengths[r]] == 1)


def test_fixed_blocks_budget_keeps_k_plus_1_tokens_a_pass(tiny_cfg, dparams, prompt):
  """k=3, fixed blocks, B passes: the unbudgeted CoT's first (k+1)B tokens."""
  k, budget = 3, 2
  free = _gen(tiny_cfg, dparams, prompt, k=k)
  cut = _gen(tiny_cfg, dparams, prompt, k=k, pass_budget=budget)
  n_cut = 0
  for r in range(B):
    if len(_cot(free, r)) <= (k + 1) * budget:
      n = free.lengths[r]
      np.testing.assert_array_equal(cut.tokens[r, :n], free.tokens[r, :n])
      continue
    _check_cut(free, cut, r, (k + 1) * budget, budget)
    n_cut += 1
  assert n_cut >= 2


def test_verified_budget_writes_k0s_cot_cut(tiny_cfg, dparams, prompt):
  """Verified CoT, B passes: a prefix of k=0's CoT, at least B tokens and at most
  (k+1)B, then the forced </think>."""
  k, budget = 3, 2
  k0 = _gen(tiny_cfg, dparams, prompt, k=0)
  cut = _gen(tiny_cfg, dparams, prompt, k=k, verify="all", pass_budget=budget)
  assert np.sum(cut.cot_forced) >= 2
  for r in range(B):
    if not cut.cot_forced[r]:
      n = k0.lengths[r]   # ended within the budget: k=0's tokens exactly
      np.testing.assert_array_equal(cut.tokens[r, :n], k0.tokens[r, :n])
      continue
    n_keep = len(_cot(cut, r))
    assert budget <= n_keep <= (k + 1) * budget, r
    _check_cut(k0, cut, r, n_keep, budget)


def test_bad_pass_budget_raises_before_compiling(tiny_cfg, dparams, prompt):
  before = decode.Decoder.run_cot._cache_size()
  with pytest.raises(ValueError, match=r"decode.pass_budget=-1.*>= 0"):
    _gen(tiny_cfg, dparams, prompt, k=0, pass_budget=-1)
  with pytest.raises(ValueError, match="decode.pass_budget"):
    mt.make_generate(tiny_cfg, pass_budget=-1)
  assert decode.Decoder.run_cot._cache_size() == before
