"""Two-phase decoding against independent references (naive loops, teacher forcing)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax import decode, native, sampling

B, P, MAX_COT, MAX_ANS = 4, 6, 10, 4
LENS = np.array([6, 3, 5, 2])


@pytest.fixture(scope="module")
def prompt(tiny_cfg):
  p = np.random.default_rng(0).integers(6, tiny_cfg.model.vocab_size, (B, P))
  return np.where(np.arange(P)[None] < LENS[:, None], p, 0)


@pytest.fixture(scope="module")
def dparams(tiny_params):
  """Larger weights: a random model whose greedy output is diverse, not one token
  repeated, so that the stop tokens below fall at different places."""
  return jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x, tiny_params)


def _gen(cfg, params, prompt, k, key=1, **kw):
  kw = {"max_cot_tokens": MAX_COT, "max_answer_tokens": MAX_ANS, **kw}
  return jax.tree.map(np.asarray, decode.generate(cfg, params, prompt, LENS,
                                                  jax.random.key(key), k=k, **kw))


def _stop_token(res, k):
  """A token the model writes in its CoT at different blocks in different rows (so
  that using it as </think> ends the CoTs at different blocks), and never first."""
  best, best_blocks = None, 0
  for v in np.unique(res.tokens[:, 1:MAX_COT]):
    if v in (decode.EOS_ID, decode.THINK_END_ID, decode.PAD_ID):
      continue
    firsts = [np.argmax(row[:MAX_COT] == v) for row in res.tokens if v in row[:MAX_COT]]
    blocks = {f // (k + 1) for f in firsts}
    if len(blocks) > best_blocks and 0 not in firsts:
      best, best_blocks = int(v), len(blocks)
  return best


def _full_sequences(prompt, res):
  """(B, T) prompt + generated, left-aligned; and each generated token's position."""
  T = P + res.tokens.shape[1]
  seq = np.zeros((B, T), np.int32)
  for b in range(B):
    seq[b, : LENS[b]] = prompt[b, : LENS[b]]
    seq[b, LENS[b]: LENS[b] + res.lengths[b]] = res.tokens[b, : res.lengths[b]]
  return seq


def _naive_k0(cfg, params, prompt, think_end, eos):
  """k=0 greedy by re-running the full teacher-forced forward for every token."""
  T = P + MAX_COT + 1 + MAX_ANS
  out = []
  for b in range(B):
    seq = list(prompt[b, : LENS[b]])
    gen, phase, n_think = [], 0, 0
    while True:
      padded = np.zeros((1, T), np.int32)
      padded[0, : len(seq)] = seq
      logits = np.asarray(mt.forward(cfg, params, padded, with_head=False).logits)[0, len(seq) - 1]
      tok = int(np.argmax(logits))
      if phase == 0 and n_think == MAX_COT and tok != think_end:
        tok = think_end                                   # budget forcing
      gen.append(tok)
      seq.append(tok)
      if tok == eos:
        break
      if phase == 0:
        if tok == think_end:
          phase, n_ans = 1, 0
        else:
          n_think += 1
      else:
        n_ans += 1
        if n_ans == MAX_ANS:
          break
    out.append(gen)
  return out


def test_k0_greedy_equals_naive_reference(tiny_cfg, dparams, prompt):
  first = _gen(tiny_cfg, dparams, prompt, k=0)
  stop = _stop_token(first, 0)
  res = _gen(tiny_cfg, dparams, prompt, k=0, think_end_id=stop)
  want = _naive_k0(tiny_cfg, dparams, prompt, stop, decode.EOS_ID)
  for b in range(B):
    assert list(res.tokens[b, : res.lengths[b]]) == want[b], b
  assert np.all(res.source[res.phase >= 0] == 0)


def _teacher_forced(cfg, params, prompt, res, s: sampling.Sampling, k):
  """Rescore the output: per generated token, the module that wrote it, its
  argmax, and its log-prob under `s` (head tokens at their block's source)."""
  seq = _full_sequences(prompt, res)
  out = mt.forward(cfg, params, seq)
  main = np.asarray(out.logits)                                                  # (B, T, V)
  head = np.asarray(mt.head_logits(cfg, params, out.head_features))              # (B, T, k, V)
  picked = np.zeros(res.tokens.shape + (cfg.model.vocab_size,), np.float32)
  for b in range(B):
    for i in range(res.lengths[b]):
      p, j = LENS[b] + i, int(res.source[b, i])   # absolute position; writer
      # main: logits at p - 1; head depth j: the chain from source p - j - 1
      picked[b, i] = main[b, p - 1] if j == 0 else head[b, p - j - 1, j - 1]
  logp = np.asarray(sampling.logprobs_of(jnp.asarray(picked), jnp.asarray(res.tokens), s))
  return picked.argmax(-1), logp


def _check_greedy_against_teacher_forcing(cfg, params, prompt, k):
  """Greedy decoding (CoTs ended by a stop token at different blocks) writes, token
  for token, the argmax of each token's writer under teacher forcing (a budget-forced
  </think> aside). Returns the result and the number of head tokens checked."""
  first = _gen(cfg, params, prompt, k=k)
  stop = _stop_token(first, k)
  res = _gen(cfg, params, prompt, k=k, think_end_id=stop)
  argmax, _ = _teacher_forced(cfg, params, prompt, res, sampling.Sampling(), k)
  checked, heads = 0, 0
  for b in range(B):
    for i in range(res.lengths[b]):
      forced = res.cot_forced[b] and res.phase[b, i] == 0 and res.phase[b, i + 1] != 0
      if not forced:
        assert res.tokens[b, i] == argmax[b, i], (b, i, res.source[b, i])
        checked += 1
        heads += res.source[b, i] > 0
  assert checked > B * 5
  return res, heads


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_agrees_with_teacher_forcing(tiny_cfg, dparams, prompt, k):
  res, _ = _check_greedy_against_teacher_forcing(tiny_cfg, dparams, prompt, k)
  assert set(np.unique(res.source[res.source >= 0])) == set(range(k + 1))


def test_logprobs_equal_teacher_forced_with_sampling(tiny_cfg, dparams, prompt):
  s = sampling.Sampling(temperature=0.8, top_k=20, top_p=0.9)
  res = _gen(tiny_cfg, dparams, prompt, k=3, key=7, temperature=s.temperature,
             top_k=s.top_k, top_p=s.top_p)
  _, logp = _teacher_forced(tiny_cfg, dparams, prompt, res, s, 3)
  valid = res.phase >= 0
  np.testing.assert_allclose(res.logprobs[valid], logp[valid], atol=1e-5, rtol=1e-5)
  assert np.all(res.logprobs[valid] <= 0) and np.all(np.isfinite(res.logprobs[valid]))
  # Reproducible from the key; another key gives another sample.
  again = _gen(tiny_cfg, dparams, prompt, k=3, key=7, temperature=s.temperature,
               top_k=s.top_k, top_p=s.top_p)
  np.testing.assert_array_equal(res.tokens, again.tokens)
  other = _gen(tiny_cfg, dparams, prompt, k=3, key=8, temperature=s.temperature,
               top_k=s.top_k, top_p=s.top_p)
  assert not np.array_equal(res.tokens, other.tokens)


@pytest.mark.parametrize("k", [3])
def test_forward_passes_formula(tiny_cfg, dparams, prompt, k):
  first = _gen(tiny_cfg, dparams, prompt, k=k)
  stop = _stop_token(first, k)
  res = _gen(tiny_cfg, dparams, prompt, k=k, think_end_id=stop)
  ended_blocks = set()
  for b in range(B):
    n = res.lengths[b]
    phase, src, toks = res.phase[b, :n], res.source[b, :n], res.tokens[b, :n]
    L_cot, L_ans = int(np.sum(phase == 0)), int(np.sum(phase == 1))
    blocks = int(np.sum((phase == 0) & (src == 0)))
    assert res.forward_passes[b] == 1 + blocks + L_ans - 1, b
    # The CoT ends at its first </think> (or an EOS, which ends the sequence);
    # nothing after it in its block survives.
    assert toks[L_cot - 1] in (stop, decode.EOS_ID)
    assert stop not in toks[: L_cot - 1] and decode.EOS_ID not in toks[: L_cot - 1]
    assert (toks[L_cot - 1] == decode.EOS_ID) == (L_ans == 0 and res.finished[b])
    assert np.all(phase[:L_cot] == 0) and np.all(phase[L_cot:] == 1)
    if not res.cot_forced[b]:
      assert blocks == -(-L_cot // (k + 1))
      ended_blocks.add(blocks)
  assert len(ended_blocks) >= 2, "the batch should end its CoT in different blocks"


def test_no_cot_prompt_and_length_limit(tiny_cfg, dparams, prompt):
  no_cot = prompt.copy()
  for b in range(B):
    no_cot[b, LENS[b] - 1] = decode.THINK_END_ID     # the prompt ends with </think>
  res = _gen(tiny_cfg, dparams, no_cot, k=5, eos_id=63)
  assert np.all(res.phase[res.phase >= 0] == 1), "no-CoT prompts go straight to the answer"
  for b in range(B):
    if not res.finished[b]:
      assert res.lengths[b] == MAX_ANS and res.forward_passes[b] == MAX_ANS
  assert not np.all(res.finished), "some row should hit the answer limit in this setup"


def test_loops_compile_once(tiny_cfg, dparams, prompt):
  kw = dict(k=3, max_cot_tokens=MAX_COT, max_answer_tokens=MAX_ANS, temperature=1.0)
  # The loops are jitted methods of the Decoder class (static self): their cache
  # holds every settings x shape compiled in this process. The first call adds
  # at most one program each (none if an earlier test compiled these settings),
  # the later ones none: new temperatures, top_k and top_p included (arguments
  # of the loops, not part of the program).
  run_cot, run_answer = decode.Decoder.run_cot, decode.Decoder.run_answer
  before = (run_cot._cache_size(), run_answer._cache_size())
  decode.generate(tiny_cfg, dparams, prompt, LENS, jax.random.key(0), **kw)
  sizes = (run_cot._cache_size(), run_answer._cache_size())
  assert all(0 <= s - b <= 1 for s, b in zip(sizes, before))
  iters = set()
  values = (dict(temperature=0.7), dict(temperature=1.3, top_k=5),
            dict(temperature=0.9, top_k=20, top_p=0.8))
  for seed, s in enumerate(values):   # different prompts and keys: different iteration counts
    p2 = np.random.default_rng(seed + 10).integers(6, 64, (B, P))
    res = decode.generate(tiny_cfg, dparams, p2, LENS, jax.random.key(seed), **{**kw, **s})
    iters.add(tuple(np.asarray(res.forward_passes)))
  assert (run_cot._cache_size(), run_answer._cache_size()) == sizes
  assert len(iters) > 1


@pytest.mark.parametrize("change,needle", [
    (dict(k=6), "k=6 is not accepted"),
    (dict(prompt_lengths=np.array([6, 0, 5, 2])), "empty prompt"),
    (dict(prompt_tokens=np.full((B, P), 64)), "outside the vocabulary"),
    (dict(prompt_tokens=np.full((B, P), -3)), "outside the vocabulary"),
    (dict(prompt_lengths=np.array([7, 3, 5, 2])), "exceed the prompt array's length"),
])
def test_bad_input(tiny_cfg, dparams, prompt, change, needle):
  args = dict(prompt_tokens=prompt, prompt_lengths=LENS, k=3)
  args.update(change)
  with pytest.raises(ValueError, match=needle):
    decode.generate(tiny_cfg, dparams, args.pop("prompt_tokens"), args.pop("prompt_lengths"),
                    jax.random.key(0), **args)


def test_prompt_longer_than_cache(tiny_cfg, dparams, prompt):
  cfg = tiny_cfg.replace(decode={"max_len": 20})
  with pytest.raises(ValueError, match="does not fit the cache"):
    decode.generate(cfg, dparams, prompt, LENS, jax.random.key(0), k=3,
                    max_cot_tokens=MAX_COT, max_answer_tokens=MAX_ANS)


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  lp = sampling.process_logits(logits, sampling.Sampling(temperature=1.0, top_p=0.75))
  np.testing.assert_allclose(np.exp(lp), [[0.625, 0.375, 0, 0]], atol=1e-6)
  lp = sampling.process_logits(logits, sampling.Sampling(temperature=1.0, top_k=3))
  np.testing.assert_allclose(np.exp(lp), [[0.5 / .95, 0.3 / .95, 0.15 / .95, 0]], atol=1e-6)
  lp = sampling.process_logits(logits, sampling.Sampling(temperature=0.5))
  want = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
  np.testing.assert_allclose(np.exp(lp)[0], want / want.sum(), atol=1e-6)
  with pytest.raises(ValueError, match="top_p=1.5"):
    sampling.Sampling(top_p=1.5)


def test_traced_sampling_settings_equal_numbers():
  """The settings as traced arrays (one compiled program for every value) give the
  distribution the same numbers give, filters on or off; top-k by the sorted
  logits' k-th value keeps what lax.top_k's k-th value keeps; a traced temperature
  0 is greedy: the argmax, at the model's own log-prob."""
  logits = 3.0 * jax.random.normal(jax.random.key(0), (3, 64))
  fn = jax.jit(lambda x, t, k, p: sampling.process_logits(
      x, sampling.Sampling(temperature=t, top_k=k, top_p=p)))
  for t, k, p in ((1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 20, 0.9), (0.5, 64, 1.0),
                  (0.0, 0, 1.0), (0.0, 5, 0.5)):
    want = sampling.process_logits(logits, sampling.Sampling(temperature=t, top_k=k, top_p=p))
    np.testing.assert_allclose(fn(logits, t, k, p), want, rtol=1e-6, err_msg=(t, k, p))
  assert fn._cache_size() == 1
  kth = jax.lax.top_k(logits / 0.7, 5)[0][:, -1:]
  kept = np.asarray(fn(logits, 0.7, 5, 1.0)) > sampling.NEG_INF / 2
  np.testing.assert_array_equal(kept, np.asarray(logits / 0.7 >= kth))
  draw = jax.jit(lambda key, x, t: sampling.sample(key, x, sampling.Sampling(temperature=t)))
  tok, lp = draw(jax.random.key(1), logits, 0.0)
  np.testing.assert_array_equal(tok, jnp.argmax(logits, -1))
  np.testing.assert_allclose(lp, jnp.max(jax.nn.log_softmax(logits), -1), rtol=1e-6)
  tok, _ = draw(jax.random.key(1), logits, 1.0)
  tok2, _ = sampling.sample(jax.random.key(1), logits, sampling.Sampling(temperature=1.0))
  np.testing.assert_array_equal(tok, tok2)


@pytest.fixture(scope="module", params=[-1, 3], ids=["context-all", "context-window3"])
def ctx(request, tiny_cfg):
  """The head with context (every past position, or a window of 3), large weights."""
  cfg = tiny_cfg.replace(head={"context": request.param})
  params = mt.init_params(cfg, jax.random.key(3))
  return cfg, jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x, params)


def test_context_head_cached_equals_teacher_forced(ctx, prompt):
  """The decoder's head, reading its memory cache (appended by every main pass, ragged
  blocks cut at different places, budget forcing), writes what the teacher-forced
  head predicts from the whole sequence, token for token; with sampling, the same
  log-probs."""
  cfg, params = ctx
  k = 3
  _, heads = _check_greedy_against_teacher_forcing(cfg, params, prompt, k)
  assert heads > B * 3
  s = sampling.Sampling(temperature=0.8)
  res = _gen(cfg, params, prompt, k=k, key=7, temperature=0.8)
  _, logp = _teacher_forced(cfg, params, prompt, res, s, k)
  valid = res.phase >= 0
  np.testing.assert_allclose(res.logprobs[valid], logp[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tau", [0.3, 0.6])
def test_adaptive_blocks_follow_threshold(tiny_cfg, dparams, prompt, tau):
  """decode.head_threshold: every kept head token has probability >= tau; a block
  that ends early (not at a stop token, the budget or k+1 tokens) ends because the
  head's next token, rescored by teacher forcing, has probability < tau; and the
  forward-pass formula holds with the cut blocks."""
  k = 3
  first = _gen(tiny_cfg, dparams, prompt, k=k)
  stop = _stop_token(first, k)
  res = _gen(tiny_cfg, dparams, prompt, k=k, think_end_id=stop, head_threshold=tau)
  seq = _full_sequences(prompt, res)
  out = mt.forward(tiny_cfg, dparams, seq)
  head_p = np.asarray(jax.nn.softmax(mt.head_logits(tiny_cfg, dparams, out.head_features)))
  short = 0
  for b in range(B):
    n = res.lengths[b]
    phase, src = res.phase[b, :n], res.source[b, :n]
    L_cot, L_ans = int(np.sum(phase == 0)), int(np.sum(phase == 1))
    blocks = np.flatnonzero((phase == 0) & (src == 0))
    assert res.forward_passes[b] == 1 + len(blocks) + L_ans - 1, b
    for start, end in zip(blocks, list(blocks[1:]) + [L_cot]):
      size = end - start
      heads = range(start + 1, end)
      assert all(np.exp(res.logprobs[b, i]) >= tau for i in heads), (b, start)
      last = res.tokens[b, end - 1]
      if size < k + 1 and end < L_cot and last not in (stop, decode.EOS_ID):
        if res.cot_forced[b] and end == L_cot - 1:
          continue                                  # the budget cut this block
        t = LENS[b] + start - 1                     # the block's source position
        assert head_p[b, t, size - 1].max() < tau, (b, start, size)
        short += 1
  assert short >= 2, "tau should cut some blocks"
  fixed = _gen(tiny_cfg, dparams, prompt, k=k, think_end_id=stop, head_threshold=0.0)
  assert np.mean(res.forward_passes) > np.mean(fixed.forward_passes)


def test_adaptive_blocks_logprobs_equal_teacher_forced(tiny_cfg, dparams, prompt):
  s = sampling.Sampling(temperature=0.9)
  res = _gen(tiny_cfg, dparams, prompt, k=3, key=11, temperature=0.9, head_threshold=0.5)
  _, logp = _teacher_forced(tiny_cfg, dparams, prompt, res, s, 3)
  valid = res.phase >= 0
  np.testing.assert_allclose(res.logprobs[valid], logp[valid], atol=1e-5, rtol=1e-5)
  kept = res.source[valid] > 0
  assert np.all(np.exp(res.logprobs[valid][kept]) >= 0.5)


def test_bfloat16_weights_decode_as_the_rounded_weights(tiny_cfg, dparams, prompt):
  """decode.weights_dtype=bfloat16 decodes as float32 weights rounded to bfloat16
  do (bfloat16 -> float32 is exact, and the layers compute in float32): the same
  tokens, passes and logprobs, with the head writing (k=3) and without (k=0).
  How far that is from float32 itself is in docs/results.md, not a fixed bound."""
  cfg = tiny_cfg.replace(decode={"weights_dtype": "bfloat16"})
  rounded = jax.tree.map(
      lambda w: w.astype(jnp.bfloat16).astype(jnp.float32) if w.ndim >= 2 else w, dparams)
  for k in (0, 3):
    got, want = _gen(cfg, dparams, prompt, k), _gen(tiny_cfg, rounded, prompt, k)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.forward_passes, want.forward_passes)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
  differs = _gen(tiny_cfg, dparams, prompt, 0)   # the rounding is not a no-op here
  assert not np.array_equal(differs.logprobs, _gen(cfg, dparams, prompt, 0).logprobs)


def test_out_in_layout_decodes_as_stored(tiny_cfg, dparams, prompt):
  """decode.weights_layout=out_in (the main blocks' matrices transposed once by
  prepare_params; one-token passes take the per-query-head attention path)
  writes the stored layout's tokens in the same passes, with or without the
  head and verified; log-probs differ by float32 summation order only.
  Prepared once and passed to generate, or prepared by generate per call: the
  same output. Parameters prepared for another layout are refused."""
  cfg = tiny_cfg.replace(decode={"weights_layout": "out_in"})
  dp = decode.prepare_params(cfg, dparams)
  layer = dparams["main"]["layer_0"]
  np.testing.assert_array_equal(dp.params["main"]["layer_0"]["attn"]["q"],
                                np.moveaxis(np.asarray(layer["attn"]["q"]), 0, -1))
  np.testing.assert_array_equal(dp.params["main"]["layer_0"]["mlp"]["down"],
                                np.asarray(layer["mlp"]["down"]).T)
  for k, verify in ((0, "none"), (3, "none"), (3, "all")):
    want = _gen(tiny_cfg, dparams, prompt, k, verify=verify)
    got = _gen(cfg, dp, prompt, k, verify=verify)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.forward_passes, want.forward_passes)
    # The same products summed in another order: float32 rounding, ~eps (1.2e-7)
    # times the magnitudes summed per reduction, through 2 layers and the softmax;
    # logits here are below 5 in magnitude, so ~1e-6, and 1e-5 bounds it.
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    per_call = _gen(cfg, dparams, prompt, k, verify=verify)
    np.testing.assert_array_equal(per_call.logprobs, got.logprobs)
  with pytest.raises(ValueError, match="prepared for weights_dtype=float32, layout=out_in"):
    _gen(tiny_cfg, dp, prompt, 0)


@pytest.mark.parametrize("scan", [False, True])
def test_out_in_shapes_are_the_modules(tiny_cfg, tiny_params, scan):
  """api.to_out_in gives every main parameter the shape the out_in modules
  declare (plain and scanned layers), and commutes with to_scan_layout."""
  from mtcot_jax.model import api
  cfg = tiny_cfg.replace(model={"scan_layers": scan})
  params = api.to_scan_layout(tiny_params) if scan else tiny_params
  declared = jax.eval_shape(
      lambda: api.main_module(cfg, out_in=True).init(jax.random.key(0),
                                                     jnp.zeros((1, 2), jnp.int32))["params"])
  declared = flax.linen.meta.unbox(declared)
  got = api.to_out_in(params)["main"]
  assert jax.tree.structure(declared) == jax.tree.structure(got)
  jax.tree.map(lambda d, x: np.testing.assert_equal(d.shape, x.shape), declared, got)
  if scan:
    jax.tree.map(np.testing.assert_array_equal, got,
                 api.to_scan_layout(api.to_out_in(tiny_params))["main"])


def test_out_in_with_scanned_layers_decodes_as_plain(tiny_cfg, dparams, prompt):
  """model.scan_layers with decode.weights_layout=out_in (to_out_in on the
  stacked layers) writes the plain, stored layout's greedy tokens and passes."""
  from mtcot_jax.model import api
  cfg = tiny_cfg.replace(model={"scan_layers": True}, decode={"weights_layout": "out_in"})
  want = _gen(tiny_cfg, dparams, prompt, 0)
  got = _gen(cfg, api.to_scan_layout(dparams), prompt, 0)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.forward_passes, want.forward_passes)
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-5)  # as above


@pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")
def test_native_kernel_decodes_as_xla(tiny_cfg, dparams, prompt):
  """decode.cpu_kernel=native (passes of at most 8 rows in the C++ kernel: here
  the one-token loops and k=1's blocks over the batch of 4; the prefill, 24 rows,
  XLA's) writes XLA's out_in tokens in the same passes, with and without the
  head, verified or not; with model.scan_layers the prepared parameters are
  unstacked for it and the output is the same."""
  from mtcot_jax.model import api
  xla = tiny_cfg.replace(decode={"weights_layout": "out_in"})
  cfg = xla.replace(decode={"cpu_kernel": "native"})
  scanned = cfg.replace(model={"scan_layers": True})
  for k, verify in ((0, "none"), (1, "none"), (1, "all")):
    want = _gen(xla, dparams, prompt, k, verify=verify)
    runs = [(cfg, dparams)] + ([(scanned, api.to_scan_layout(dparams))] if k == 0 else [])
    for c, p in runs:
      got = _gen(c, p, prompt, k, verify=verify)
      np.testing.assert_array_equal(got.tokens, want.tokens)
      np.testing.assert_array_equal(got.forward_passes, want.forward_passes)
      np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-5)  # as above


def test_make_generate_inside_jit_equals_generate(tiny_cfg, dparams, prompt):
  """The pure form under the caller's own jit writes generate's output, with the
  same settings given as DecodeConfig overrides; a name that is not a decode
  setting is refused, naming it."""
  kw = dict(k=3, max_cot_tokens=MAX_COT, max_answer_tokens=MAX_ANS)
  want = _gen(tiny_cfg, dparams, prompt, **kw)
  fn = mt.make_generate(tiny_cfg, **kw)
  got = jax.tree.map(np.asarray, jax.jit(fn)(dparams, prompt, LENS, jax.random.key(1)))
  for name, w, g in zip(want._fields, want, got):
    np.testing.assert_array_equal(g, w, err_msg=name)
  with pytest.raises(ValueError, match="max_cot"):
    mt.make_generate(tiny_cfg, max_cot=4)
  # The sampling settings as traced arguments of the caller's jit: one compile for
  # every value, generate's output at each (the same key: the same tokens).
  greedy = want
  jfn = jax.jit(lambda p, x, n, key, t, tk, tp: fn(p, x, n, key, temperature=t, top_k=tk,
                                                   top_p=tp))
  for t, tk, tp in ((0.8, 20, 0.9), (1.3, 0, 1.0)):
    want = _gen(tiny_cfg, dparams, prompt, key=7, temperature=t, top_k=tk, top_p=tp, **kw)
    got = jax.tree.map(np.asarray, jfn(dparams, prompt, LENS, jax.random.key(7), t, tk, tp))
    for name, w, g in zip(want._fields, want, got):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 if name == "logprobs" else 0,
                                 err_msg=(name, t))
  # A traced temperature 0 runs the sampling program greedily: greedy's tokens.
  got = jax.tree.map(np.asarray, jfn(dparams, prompt, LENS, jax.random.key(1), 0.0, 0, 1.0))
  np.testing.assert_array_equal(got.tokens, greedy.tokens)
  np.testing.assert_allclose(got.logprobs, greedy.logprobs, rtol=0, atol=1e-6)
  assert jfn._cache_size() == 1


def test_traced_greedy_verified_equals_greedy(tiny_cfg, dparams, prompt):
  """Verified decoding (the acceptance rule and the token after a rejection) with a
  traced temperature of 0 writes greedy verified decoding's tokens; a greedy
  Decoder refuses a temperature it cannot honour."""
  kw = dict(k=3, verify="all", max_cot_tokens=MAX_COT, max_answer_tokens=MAX_ANS)
  want = _gen(tiny_cfg, dparams, prompt, **kw)
  fn = mt.make_generate(tiny_cfg, **kw)
  got = jax.jit(lambda key, t: fn(dparams, prompt, LENS, key, temperature=t))(
      jax.random.key(1), 0.0)
  got = jax.tree.map(np.asarray, got)
  for name in ("tokens", "source", "phase", "lengths", "forward_passes", "accepted"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
  with pytest.raises(ValueError, match="this Decoder is greedy"):
    decode.decoder(tiny_cfg)(dparams, prompt, LENS, jax.random.key(0),
                             sampling.Sampling(temperature=0.5))


def test_any_stop_id_ends_the_sequence(tiny_cfg, dparams, prompt):
  """eos_id as a list of ids: a sequence ends at the first of them it writes (in
  the CoT or the answer), with what each id alone writes up to there."""
  kw = dict(k=3, verify="answer")
  base = _gen(tiny_cfg, dparams, prompt, eos_id=63, **kw)
  seen = [t for t in np.unique(base.tokens[base.phase >= 0]) if t not in (5, 63)]
  a, b = int(seen[0]), int(seen[-1])
  one = {e: _gen(tiny_cfg, dparams, prompt, eos_id=e, **kw) for e in (a, b)}
  both = _gen(tiny_cfg, dparams, prompt, eos_id=[a, b], **kw)
  ends = set()
  for r in range(B):
    n = int(both.lengths[r])
    e = min(one.values(), key=lambda res: res.lengths[r])   # the id written first
    assert n == e.lengths[r] and both.finished[r] == e.finished[r], r
    np.testing.assert_array_equal(both.tokens[r, :n], e.tokens[r, :n])
    np.testing.assert_array_equal(both.phase[r, :n], e.phase[r, :n])
    if both.finished[r]:
      assert both.tokens[r, n - 1] in (a, b)
      assert not np.isin(both.tokens[r, :n - 1], (a, b)).any()
      ends.add((int(both.tokens[r, n - 1]), int(both.phase[r, n - 1])))
  assert len(ends) >= 2, ends


@pytest.mark.parametrize("eos,needle", [
    ([], "decode.eos_id=()"),
    ([2, 64], r"decode.eos_id=\(2, 64\)"),
    ([2.0], "decode.eos_id"),
    ("2", "decode.eos_id"),
    (True, "decode.eos_id"),
])
def test_bad_stop_ids_raise_before_compiling(tiny_cfg, dparams, prompt, eos, needle):
  before = decode.Decoder.run_cot._cache_size()
  with pytest.raises(ValueError, match=needle):
    decode.generate(tiny_cfg, dparams, prompt, LENS, jax.random.key(0), k=3, eos_id=eos)
  with pytest.raises(ValueError, match=needle):
    mt.make_generate(tiny_cfg, eos_id=eos)
  assert decode.Decoder.run_cot._cache_size() == before


def test_stop_ids_in_the_config(tiny_cfg):
  cfg = mt.load_config(None, ["decode.eos_id=[2, 7]"])
  assert cfg.decode.eos_id == (2, 7) and decode.decoder(cfg).eos_id == (2, 7)
  assert decode.decoder(tiny_cfg).eos_id == (decode.EOS_ID,)
  assert decode.decoder(decode.decode_config(tiny_cfg, eos_id=np.array([9, 4]))).eos_id == (9, 4)
  with pytest.raises(ValueError, match=r"not an EOS id \[2, 7\]"):
    cfg.replace(decode={"answer_markers": [[7]]})
  with pytest.raises(ValueError, match="traced"):
    jax.jit(lambda e: decode.decode_config(tiny_cfg, eos_id=e))(jnp.int32(3))
  # Decoders that differ only in sampling values are one Decoder (one compiled loop).
  d = [decode.decoder(decode.decode_config(tiny_cfg, temperature=t, top_p=p))
       for t, p in ((0.5, 0.9), (1.5, 1.0))]
  assert d[0] == d[1] and hash(d[0]) == hash(d[1])
