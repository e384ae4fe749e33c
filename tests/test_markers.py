"""Answer markers of several tokens (decode.answer_markers) against an independent
reference: a free run whose CoT no marker ends, the first marker occurrence found
in its token stream with plain Python, and teacher forcing for what follows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax import decode, sampling
from mtcot_jax.decode import markers as mk
from test_decode import LENS, MAX_COT, B, _gen, _teacher_forced
from test_decode import dparams, prompt  # noqa: F401  (fixtures: the decode tests' batch)
from test_verify import _expected_passes

NEVER = 63          # a token these random models never write (checked): the free runs' </think>
FORCED = [61, 63]   # the first variant, never written either: budget forcing writes it


def _first_end(prefix, stream, markers, eos, start=0):
  """The index in `stream` of the first EOS or marker end at or after `start`, a
  marker's first tokens possibly in `prefix` (the prompt); None where there is none."""
  ext, off = list(prefix) + list(stream), len(prefix)
  for i in range(start, len(stream)):
    if stream[i] == eos:
      return i
    for m in markers:
      if i + off + 1 >= len(m) and ext[i + off + 1 - len(m): i + off + 1] == list(m):
        return i
  return None


def _expected_cot(prompt_row, free_cot, markers, eos):
  """The CoT a marker run writes, from the free run's: through the first marker end
  (or EOS) among its first MAX_COT + 1 tokens, else MAX_COT tokens and then the
  first variant, forced, through the first marker it completes. (cot, forced)."""
  natural = list(free_cot[:MAX_COT + 1])
  assert len(natural) == MAX_COT + 1 or natural[-1] == eos, "the free run ended too soon"
  e = _first_end(prompt_row, natural, markers, eos)
  if e is not None:
    return natural[:e + 1], False
  stream = natural[:MAX_COT] + list(markers[0])
  return stream[:_first_end(prompt_row, stream, markers, eos, start=MAX_COT) + 1], True


@pytest.fixture(scope="module", params=[0, 3], ids=["k0", "k3"])
def free(request, tiny_cfg, dparams, prompt):  # noqa: F811
  """(k, the free run: a CoT budget of MAX_COT + 1 and an end token it never writes)."""
  k = request.param
  res = _gen(tiny_cfg, dparams, prompt, k=k, max_cot_tokens=MAX_COT + 1, think_end_id=NEVER)
  for b in range(B):
    cot = res.tokens[b, : MAX_COT + 1]
    assert NEVER not in cot and _first_end([], cot, [FORCED], -1) is None, b
  return k, res


def _choose_markers(prompt, res, k):  # noqa: F811
  """Variants the free run writes, so that its rows end their CoTs in different ways:
  row 0 by a marker begun in the prompt, row 1 by one that crosses a block boundary
  (k = 0: a trigram, over three one-token blocks; else a bigram whose second token
  starts a block), row 3 (k > 0) by a trigram ending at head depth 2, its block's
  last draft cut; row 2 by budget forcing (FORCED first)."""
  t = [list(r[: MAX_COT + 1]) for r in res.tokens]
  variants = [FORCED, [int(prompt[0, LENS[0] - 1]), t[0][0]]]
  if k == 0:
    variants.append(t[1][3:6])
  else:
    i = next(i for i in range(1, MAX_COT) if (i + 1) % (k + 1) == 0)
    variants.append(t[1][i:i + 2])
    variants.append(t[3][k + 1: k + 4])
  return [[int(x) for x in v] for v in variants]


@pytest.fixture(scope="module")
def marked(free, tiny_cfg, dparams, prompt):  # noqa: F811
  k, res = free
  markers = _choose_markers(prompt, res, k)
  return k, res, markers, _gen(tiny_cfg, dparams, prompt, k=k, answer_markers=markers)


def test_marker_run_equals_the_free_runs_prefix(marked, tiny_cfg, dparams, prompt):  # noqa: F811
  """Per row: the CoT is the free run's through the first marker end (sources too),
  or MAX_COT of its tokens and the forced marker; the answer starts right after it
  and is what teacher forcing says (greedy), log-probs included (the forced tokens'
  are the main model's); passes = 1 + blocks + answer - 1, a forced token a block."""
  k, free_res, markers, res = marked
  eos = decode.EOS_ID
  argmax, logp = _teacher_forced(tiny_cfg, dparams, prompt, res, sampling.Sampling(), k)
  seen = set()
  for b in range(B):
    n = res.lengths[b]
    cot, forced = _expected_cot(prompt[b, :LENS[b]], free_res.tokens[b], markers, eos)
    c = len(cot)
    np.testing.assert_array_equal(res.tokens[b, :c], cot, err_msg=str(b))
    assert np.all(res.phase[b, :c] == 0) and np.all(res.phase[b, c:n] == 1), b
    assert res.cot_forced[b] == forced, b
    n_free = min(c, MAX_COT) if forced else c
    np.testing.assert_array_equal(res.source[b, :n_free], free_res.source[b, :n_free])
    assert np.all(res.source[b, n_free:c] == 0), b     # forced: main-model tokens
    if cot[-1] == eos:
      assert n == c and res.finished[b], b
      seen.add("eos")
    else:
      assert n > c, b
      seen.add("forced" if forced else "marker")
    src, phase = res.source[b, :n], res.phase[b, :n]
    blocks = int(np.sum((phase == 0) & (src == 0)))
    assert res.forward_passes[b] == 1 + blocks + (n - c) - 1, b
    for i in range(n):
      if not (forced and MAX_COT <= i < c):
        assert res.tokens[b, i] == argmax[b, i], (b, i)
    np.testing.assert_allclose(res.logprobs[b, :n], logp[b, :n], atol=1e-5, rtol=1e-5)
    if not forced and cot[-1] != eos:
      full = [int(x) for x in prompt[b, :LENS[b]]] + cot
      m = next(m for m in markers if full[-len(m):] == m)
      start = c - len(m)                                  # < 0: begun in the prompt
      block_of = np.cumsum(src == 0) - 1
      seen.add("prompt" if start < 0 else
               "across" if block_of[start] != block_of[c - 1] else "in-block")
      if free_res.source[b, c] > 0:    # the free run's next token was in the same block
        seen.add("cut mid-block")
  want = {"prompt", "across", "forced"} | ({"cut mid-block"} if k > 0 else set())
  assert want <= seen, seen


def test_verified_cot_equals_k0_with_markers(marked, tiny_cfg, dparams, prompt):  # noqa: F811
  """verify=all with the k=0 run's markers writes k=0's tokens (its CoT ends at the
  same marker, over other block boundaries); verify=answer keeps the unverified CoT
  of its k and writes the one-token loop's answer. Passes follow test_verify's formula."""
  k, _, markers, ref = marked
  verify = "all" if k == 0 else "answer"
  res = _gen(tiny_cfg, dparams, prompt, k=3, verify=verify, answer_markers=markers)
  n = ref.tokens.shape[1]
  for field in ("tokens", "phase"):
    np.testing.assert_array_equal(getattr(res, field)[:, :n], getattr(ref, field), field)
  for field in ("lengths", "finished", "cot_forced"):
    np.testing.assert_array_equal(getattr(res, field), getattr(ref, field), field)
  np.testing.assert_allclose(res.logprobs[:, :n], ref.logprobs, atol=1e-5, rtol=1e-5)
  if verify == "answer":
    assert np.all(res.source[res.phase == 0] == ref.source[ref.phase == 0])
  for b in range(B):
    assert res.forward_passes[b] == _expected_passes(res, b, verify), b


def test_prompt_ending_with_a_marker_has_no_cot(marked, tiny_cfg, dparams, prompt):  # noqa: F811
  """A prompt that ends with a whole marker (here row 1, with the prompt-boundary
  variant) answers at once, as a prompt ending with </think> does."""
  k, _, markers, _ = marked
  p = prompt.copy()
  p[1, LENS[1] - 2: LENS[1]] = markers[1]
  res = _gen(tiny_cfg, dparams, p, k=k, answer_markers=markers)
  n = res.lengths[1]
  assert n > 0 and np.all(res.phase[1, :n] == 1) and res.forward_passes[1] == n
  assert np.any(res.phase[[0, 2, 3]] == 0)


def test_default_marker_is_think_end(tiny_cfg):
  """No markers: the single token think_end_id, as answer_markers=[[think_end_id]]."""
  d0 = decode.decoder(tiny_cfg.replace(decode={"think_end_id": 9}))
  d1 = decode.decoder(tiny_cfg.replace(decode={"think_end_id": 9, "answer_markers": [[9]]}))
  assert d0.markers == d1.markers == ((9,),) and d0.out_len == d1.out_len
  assert decode.decoder(tiny_cfg).markers == ((decode.THINK_END_ID,),)
  cfg = mt.load_config(None, ["decode.answer_markers=[[12, 34], [56, 34, 7]]"])
  assert decode.decoder(cfg).markers == ((12, 34), (56, 34, 7))


@pytest.mark.parametrize("markers,needle", [
    ([[]], "lists of 1 to 8 token ids"),
    ([[3, 64]], r"model.vocab_size=64"),
    ([[-1]], "decode.answer_markers"),
    ([list(range(6, 15))], "1 to 8"),
    ([[7, decode.EOS_ID]], "not the EOS id 2"),
])
def test_bad_markers_raise_before_compiling(tiny_cfg, dparams, prompt,  # noqa: F811
                                            markers, needle):
  before = decode.Decoder.run_cot._cache_size()
  with pytest.raises(ValueError, match=needle):
    decode.generate(tiny_cfg, dparams, prompt, LENS, jax.random.key(0), k=3,
                    answer_markers=markers)
  assert decode.Decoder.run_cot._cache_size() == before


def test_marker_helpers_against_python():
  """marker_hits, ends_with_marker, roll_tail and prompt_window on random rows,
  against loops over Python lists."""
  rng = np.random.default_rng(0)
  markers = ((1, 2), (3,), (2, 1, 2))
  for _ in range(3):
    tail = rng.integers(-1, 4, (6, 2))
    block = rng.integers(0, 4, (6, 5))
    hits = np.asarray(mk.marker_hits(jnp.asarray(tail), jnp.asarray(block), markers))
    for b in range(6):
      ext = list(tail[b]) + list(block[b])
      for i in range(5):
        want = any(ext[2 + i + 1 - len(m): 2 + i + 1] == list(m) for m in markers)
        assert hits[b, i] == want, (b, i)
    n = rng.integers(0, 6, (6,))
    rolled = np.asarray(mk.roll_tail(jnp.asarray(tail), jnp.asarray(block), jnp.asarray(n)))
    for b in range(6):
      assert list(rolled[b]) == (list(tail[b]) + list(block[b, :n[b]]))[-2:], b
  ends = mk.ends_with_marker(jnp.array([[2, 1, 2], [0, 1, 2], [9, 9, 3], [-1, 1, 0]]), markers)
  np.testing.assert_array_equal(ends, [True, True, True, False])
  got = mk.prompt_window(jnp.array([[5, 6, 7, 0], [8, 0, 0, 0]]), jnp.array([3, 1]), 3)
  np.testing.assert_array_equal(got, [[5, 6, 7], [-1, -1, 8]])
