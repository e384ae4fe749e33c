"""Hugging Face interop (mtcot_jax.hf): Llama and Qwen2 checkpoints in and out,
checked against `transformers` itself (small random models built here; nothing
is downloaded), and tokenizers with the thinking tokens added."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mtcot_jax as mt  # noqa: E402
from mtcot_jax import hf  # noqa: E402

V = 96
# Logits here are O(1-10); float32 reductions over D=64 and 2 layers round at
# ~1e-6 relative in either library, so 1e-4 absolute leaves two orders of margin
# while a wrong mapping (a transposed kernel, a missed bias or scaling) moves
# logits by O(0.1-1).
TOL = 1e-4


def _build(kind: str, vocab: int = V):
  torch.manual_seed({"llama": 0, "qwen2": 1}[kind])
  common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15)
  if kind == "llama":   # untied, llama3 RoPE scaling at a short original length
    c = transformers.LlamaConfig(
        **common, rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    model = transformers.LlamaForCausalLM(c)
  else:                 # tied, q/k/v biases
    c = transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(c)
  with torch.no_grad():   # norms and biases away from their 1 / 0 initial values
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(torch.randn_like(p) * 0.5)
  return model.eval()


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def imported(request, tmp_path_factory):
  model = _build(request.param)
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  return request.param, model, path, hf.load_hf(path, ["head.k=2", "head.num_heads=2"])


def test_logits_in_and_out(imported, tmp_path):
  kind, model, path, run = imported
  assert run.tokenizer is None and run.cfg.model.qkv_bias == (kind == "qwen2")
  assert run.cfg.model.tie_embeddings == (kind == "qwen2")
  tokens = np.random.RandomState(0).randint(0, V, (2, 40))
  want = _torch_logits(model, tokens)
  got = np.asarray(mt.forward(run.cfg, run.params, jnp.asarray(tokens, jnp.int32)).logits)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
  # Out: transformers reloads what save_hf wrote as a LlamaForCausalLM.
  out = str(tmp_path / "out")
  mt.save_hf(run, out)
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(back).__name__ == "LlamaForCausalLM"
  np.testing.assert_allclose(_torch_logits(back, tokens), want, rtol=0, atol=TOL)
  # ... and importing the export gives the same parameters, the head included.
  again = hf.load_hf(out, ["head.k=2", "head.num_heads=2"], key=jax.random.key(7))
  for a, b in zip(jax.tree.leaves(run.params["main"]), jax.tree.leaves(again.params["main"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg, head = hf.load_head(out)
  assert cfg.head == run.cfg.head
  for a, b in zip(jax.tree.leaves(run.params["head"]), jax.tree.leaves(head)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileExistsError, match="never overwrites"):
    mt.save_hf(run, out)


def test_greedy_generation_matches_transformers(imported):
  """mt.generate(k=0) writes transformers' greedy tokens, ragged prompts batched:
  a </think> and an EOS the reference itself writes end the phases where it does."""
  kind, model, path, run = imported
  prompts = [np.random.RandomState(s).randint(0, V, n) for s, n in ((1, 5), (2, 9))]
  n_new = 24
  refs = []
  for p in prompts:
    with torch.no_grad():
      out = model.generate(torch.tensor(p[None]), attention_mask=torch.ones(1, len(p)),
                           max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    refs.append(out[0, len(p):].numpy())
  batch = np.zeros((2, 9), np.int32)
  for i, p in enumerate(prompts):
    batch[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)

  def gen(think_end_id, eos_id, max_cot):
    return jax.tree.map(np.asarray, mt.generate(
        run.cfg, run.params, jnp.asarray(batch), jnp.asarray(lengths), jax.random.key(0), k=0,
        max_cot_tokens=max_cot, max_answer_tokens=n_new, eos_id=eos_id,
        think_end_id=think_end_id))

  # Stop ids the reference never writes: the whole budget is transformers' tokens.
  unused = sorted(set(range(V)) - set(np.concatenate(refs).tolist()))
  res = gen(unused[0], unused[1], n_new)
  for i, ref in enumerate(refs):
    np.testing.assert_array_equal(res.tokens[i, :n_new], ref)
    assert res.cot_forced[i]
  # The reference's own 4th token closes the CoT and its 12th ends the answer
  # (first occurrences, distinct ids): the same tokens, the phases split there.
  checked = 0
  for i, ref in enumerate(refs):
    think_end, eos = int(ref[3]), int(ref[11])
    if think_end == eos or think_end in ref[:3] or eos in ref[:11]:
      continue   # a repeated id: this row cannot mark the phases unambiguously
    res = gen(think_end, eos, n_new)
    n = int(res.lengths[i])
    assert n == 12 and res.finished[i] and not res.cot_forced[i]
    np.testing.assert_array_equal(res.tokens[i, :n], ref[:12])
    np.testing.assert_array_equal(res.phase[i, :n], [0] * 4 + [1] * 8)
    checked += 1
  assert checked >= 1, refs   # the seeds give rows with distinct first occurrences


def _bpe_tokenizer_dir(path: str, texts, with_think: bool = False) -> int:
  """A byte-level BPE tokenizer.json (+ tokenizer_config.json) trained on `texts`."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  special = ["<|begin|>", "<|end|>"] + (["<think>", "</think>"] if with_think else [])
  tk.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=300, special_tokens=special,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(path, exist_ok=True)
  tk.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|begin|>", "eos_token": "<|end|>"}, f)
  return tk.get_vocab_size()


TEXTS = ["12*34=", "2 1 4 + 0 3 6 = 2 4 0 1", "408", "the product of 12 and 34 is 408"] * 20


def test_tokenizer_json_gains_thinking_tokens(tmp_path):
  path = str(tmp_path / "m")
  n = _bpe_tokenizer_dir(path, TEXTS)
  _build("llama", vocab=n).save_pretrained(path)
  run = hf.load_hf(path, ["head.k=2", "head.num_heads=2"])
  tok = run.tokenizer
  assert run.added_tokens == ("<think>", "</think>")
  assert (tok.think_id, tok.think_end_id, tok.vocab_size) == (n, n + 1, n + 2)
  assert run.cfg.model.vocab_size == n + 2
  # The new rows are the mean of the checkpoint's; the old rows are untouched.
  emb = np.asarray(run.params["main"]["embed"])
  np.testing.assert_allclose(emb[n:], np.repeat(emb[:n].mean(0, keepdims=True), 2, 0),
                             rtol=1e-6)
  ids = mt.encode_prompt(tok, "12*34=")
  assert ids[0] == tok.bos_id and ids[-1] == tok.think_id
  assert tok.decode(ids) == "12*34="
  cot = tok.encode("2 1 4 + 0 3 6") + [tok.think_end_id] + tok.encode("408") + [tok.eos_id]
  assert tok.decode(cot) == "2 1 4 + 0 3 6408"
  assert tok.decode(cot, keep_special=True) == "2 1 4 + 0 3 6</think>408<|end|>"
  assert tok.encode("a</think>b").count(tok.think_end_id) == 1
  # The workdir form keeps every id.
  path2 = str(tmp_path / "tokenizer.json")
  with open(path2, "wb") as f:
    f.write(tok.serialize())
  back = mt.load_tokenizer(path2)
  assert back.special == tok.special and back.encode("12*34=") == tok.encode("12*34=")
  # A vocabulary that has them already keeps its ids and size.
  from mtcot_jax.data.hf_tokenizer import from_hf_dir
  m = _bpe_tokenizer_dir(str(tmp_path / "has"), TEXTS, with_think=True)
  has, added = from_hf_dir(str(tmp_path / "has"))
  assert added == [] and has.vocab_size == m and (has.think_id, has.think_end_id) == (2, 3)


def test_sentencepiece_model_gains_thinking_tokens(tmp_path):
  import sentencepiece as spm
  path = str(tmp_path / "m")
  os.makedirs(path)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXTS), model_prefix=os.path.join(path, "tokenizer"),
      vocab_size=40, model_type="bpe", hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, minloglevel=2)
  from mtcot_jax.data.hf_tokenizer import from_hf_dir
  tok, added = from_hf_dir(path)
  n = tok.vocab_size - 2
  assert added == ["<think>", "</think>"] and (tok.think_id, tok.think_end_id) == (n, n + 1)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)   # no pad: EOS
  ids = mt.encode_prompt(tok, "12*34=")
  assert ids[0] == 1 and ids[-1] == n and tok.decode(ids) == "12*34="
  cot = tok.encode("2 1 4") + [tok.think_end_id] + tok.encode("408")
  assert tok.decode(cot, keep_special=True) == "2 1 4</think>408"


def test_sft_from_hf_then_decode(tmp_path):
  """train.init_from_hf: SFT starts from the checkpoint's weights and tokenizer, the
  workdir records the tokenizer's ids, and the run loads back for decoding."""
  from mtcot_jax.data import builders
  from mtcot_jax.train import loop
  data = ["data.task=mult", "data.task_args={digits: 2}", "data.train_size=64",
          "data.eval_size=8", "data.seq_len=64", f"data.data_dir={tmp_path}/data"]
  base = mt.load_config(None, data)
  split = builders.split_source(base.data, "train")
  texts = [t for ex in split.__getitems__(range(len(split)))
           for t in (ex.question, ex.cot, ex.answer)]
  src = str(tmp_path / "hf")
  n = _bpe_tokenizer_dir(src, texts)
  model = _build("qwen2", vocab=n + 30)   # a padded vocabulary, as Qwen2's is
  model.save_pretrained(src)
  work = str(tmp_path / "run")
  cfg = mt.load_config(None, data + [
      "head.k=2", "head.num_heads=2", "head.width=32", "head.mlp_dim=64",
      f"train.init_from_hf={src}", f"train.workdir={work}", "train.steps=2",
      "train.batch_size=4", "train.eval_examples=4", "train.log_every=1",
      "train.learning_rate=1e-9"])
  summary = loop.train(cfg, progress=False)
  run = mt.load_run(work)
  assert run.cfg.model.vocab_size == n + 30 and run.cfg.model.qkv_bias
  assert os.path.exists(os.path.join(work, "tokenizer.json"))
  assert (run.tokenizer.think_id, run.tokenizer.think_end_id) == (n, n + 1)
  # lr 1e-9: two AdamW steps move an element by <= ~2e-9 (|update| <= lr), so
  # the main model is the checkpoint's to far below TOL: transformers' logits.
  tokens = np.random.RandomState(0).randint(0, n, (1, 16))
  np.testing.assert_allclose(
      np.asarray(mt.forward(run.cfg, run.params, jnp.asarray(tokens, jnp.int32)).logits)[..., :n],
      _torch_logits(model, tokens)[..., :n], rtol=0, atol=TOL)
  assert "eval" in summary
  q = split.__getitems__([0])[0].question
  ids = mt.encode_prompt(run.tokenizer, q)
  res = mt.generate(run.cfg, run.params, jnp.asarray([ids], jnp.int32),
                    jnp.asarray([len(ids)], jnp.int32), jax.random.key(0), k=2,
                    max_cot_tokens=8, max_answer_tokens=4)   # the stop ids: the config's
  assert (run.cfg.decode.eos_id, run.cfg.decode.think_end_id) == (
      run.tokenizer.eos_id, run.tokenizer.think_end_id)
  assert int(res.forward_passes[0]) >= 1


def test_bad_checkpoints_get_a_sentence(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load_hf(str(tmp_path / "nothing"))
  bad = tmp_path / "gpt"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(ValueError, match="GPT2LMHeadModel.*accepted"):
    hf.load_hf(str(bad))
  with pytest.raises(mt.ConfigError, match="train.init_from_hf"):
    mt.load_config(None, ["train.init_from_hf=x", "train.init_from=y"])


def _transformers_rope(tmp_path, config: dict) -> dict:
  (tmp_path / "config.json").write_text(json.dumps(config))
  rope = dict(transformers.AutoConfig.from_pretrained(str(tmp_path)).rope_parameters)
  rope.pop("type", None)   # kept beside rope_type when the file names it so
  return rope


@pytest.mark.parametrize("rope", [
    # An older file: `type`, and llama3 without original_max_position_embeddings
    # (transformers takes max_position_embeddings).
    {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
    # Both forms, differing: transformers reads rope_scaling (and the top-level theta).
    {"rope_theta": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 4.0},
     "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}])
def test_rope_config_read_as_transformers_reads_it(tmp_path, rope):
  config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
            "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 128, **rope}
  want = _transformers_rope(tmp_path, config)
  theta, scaling = hf._rope(config)
  assert {"rope_theta": theta, "rope_type": scaling.pop("type"), **scaling} == want


def test_tied_checkpoint_that_stores_another_lm_head(tmp_path):
  """tie_word_embeddings with a stored lm_head.weight unlike the embedding:
  transformers unties them, and so does the import; one equal to it stays tied.
  An old file's rotary_emb.inv_freq buffers are skipped, as transformers does."""
  from safetensors.torch import load_file, save_file
  torch.manual_seed(2)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
      num_attention_heads=4, initializer_range=0.15, tie_word_embeddings=True))
  tokens = np.random.RandomState(0).randint(0, V, (1, 24))
  for name, other in (("same", False), ("other", True)):
    path = str(tmp_path / name)
    model.save_pretrained(path)
    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    emb = sd["model.embed_tokens.weight"]
    sd["lm_head.weight"] = torch.randn_like(emb) if other else emb.clone()
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, file, metadata={"format": "pt"})
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    run = hf.load_hf(path, ["head.k=1", "head.num_heads=2"])
    assert run.cfg.model.tie_embeddings == (not other)
    got = np.asarray(mt.forward(run.cfg, run.params, jnp.asarray(tokens, jnp.int32)).logits)
    np.testing.assert_allclose(got, _torch_logits(ref, tokens), rtol=0, atol=TOL)


def test_thinking_tokens_already_in_the_model_vocabulary(tmp_path):
  """`<think>` as an ordinary piece of the vocabulary (tokenizer.json or a
  sentencepiece model) keeps its id and is matched whole."""
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as pb
  from mtcot_jax.data.hf_tokenizer import from_hf_dir
  bpe = tmp_path / "bpe"
  n = _bpe_tokenizer_dir(str(bpe), TEXTS)
  tj = json.loads((bpe / "tokenizer.json").read_text())
  tj["model"]["vocab"].update({"<think>": n, "</think>": n + 1})
  (bpe / "tokenizer.json").write_text(json.dumps(tj))
  sp = tmp_path / "sp"
  sp.mkdir()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXTS), model_prefix=str(sp / "tokenizer"), vocab_size=40,
      model_type="bpe", hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      minloglevel=2)
  m = pb.ModelProto()
  m.ParseFromString((sp / "tokenizer.model").read_bytes())
  for piece in ("<think>", "</think>"):
    p = m.pieces.add()
    p.piece, p.score, p.type = piece, -100.0, pb.ModelProto.SentencePiece.NORMAL
  (sp / "tokenizer.model").write_bytes(m.SerializeToString())
  for path, size in ((bpe, n + 2), (sp, len(m.pieces))):
    tok, added = from_hf_dir(str(path))
    assert added == [] and tok.vocab_size == size
    assert (tok.think_id, tok.think_end_id) == (size - 2, size - 1)
    ids = tok.encode("12<think>34</think>0")
    assert ids.count(size - 2) == 1 and ids.count(size - 1) == 1
    assert tok.decode(ids, keep_special=True) == "12<think>34</think>0"


def test_thinking_tokens_in_a_padded_vocabulary_start_as_the_mean(tmp_path):
  """Qwen2's embedding has rows past its tokenizer's ids: the appended tokens take
  two of them, set to the mean of the tokenizer's rows like grown ones."""
  path = str(tmp_path / "m")
  n = _bpe_tokenizer_dir(path, TEXTS)
  model = _build("qwen2", vocab=n + 30)
  model.save_pretrained(path)
  run = hf.load_hf(path, ["head.k=1", "head.num_heads=2"])
  assert (run.tokenizer.think_id, run.cfg.model.vocab_size) == (n, n + 30)
  want = model.model.embed_tokens.weight.detach().numpy()
  emb = np.asarray(run.params["main"]["embed"])
  np.testing.assert_allclose(emb[n:n + 2], np.repeat(want[:n].mean(0, keepdims=True), 2, 0),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.delete(emb, [n, n + 1], 0), np.delete(want, [n, n + 1], 0))


def _small_checkpoint(tmp_path) -> str:
  torch.manual_seed(3)
  path = str(tmp_path / "ckpt")
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
      num_attention_heads=2)).save_pretrained(path)
  return path


def test_save_hf_leaves_nothing_behind_when_it_fails(tmp_path, monkeypatch):
  run = hf.load_hf(_small_checkpoint(tmp_path), ["head.k=1", "head.num_heads=2"])
  (tmp_path / "file").write_text("keep")
  with pytest.raises(FileExistsError, match="never overwrites"):
    mt.save_hf(run, str(tmp_path / "file"))
  assert (tmp_path / "file").read_text() == "keep"

  def fail(*args):
    raise OSError("disk full")
  monkeypatch.setattr(hf, "hf_config", fail)
  with pytest.raises(OSError, match="disk full"):
    mt.save_hf(run, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "file"]   # no half-written directory
  monkeypatch.undo()
  (tmp_path / "empty").mkdir()
  mt.save_hf(run, str(tmp_path / "empty"))
  written = set(os.listdir(tmp_path / "empty"))
  assert {"config.json", "model.safetensors", hf.HEAD_WEIGHTS} <= written
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "empty", "file"]

