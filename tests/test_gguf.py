"""llama.cpp GGUF files in (mtcot_jax.load_gguf), checked against `transformers`'
own GGUF loading and against the model the file was written from.

A tiny random Llama (tied embeddings, grouped-query attention) and a byte-level
BPE tokenizer trained here are written to GGUF with the `gguf` package's writer,
the query and key rows permuted as llama.cpp's converter permutes them, in F32 and
in Q8_0. Nothing is downloaded. The last test runs only where SmolLM2's GGUF has
been fetched (`make smollm2`, or $MTCOT_SMOLLM2_GGUF)."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import mtcot_jax as mt  # noqa: E402
from mtcot_jax import gguf_format  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
            "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("<|im_start|>user\nNaïve café: 12 apples × 3 = 36? ¿Sí? 日本語 — “quotes” "
        "emoji 🙂\ttabs  and  spaces<|im_end|>\n<|im_start|>assistant\n")
# Logits are O(0.1-1) (random weights, initializer 0.1); float32 reductions over
# D=64 and 2 layers round at ~1e-6 relative in either library: 1e-4 leaves two
# orders of margin, while a row permutation left in place moves logits by O(0.1).
TOL = 1e-4


def _tokenizer():
  """A byte-level BPE (digits split one by one first, as SmolLM2's) trained on a
  few sentences: its vocabulary, merges and the special tokens first."""
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  corpus = ["Naive cafe apples and oranges, twelve times three is thirty-six.",
            "She buys 3 packs of 4 pens, so she has 3 * 4 = 12 pens.",
            "The assistant answers the user in plain English. Answer: 42"] * 20
  tk.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIAL, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  vocab = tk.get_vocab()
  tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
  import json
  merges = json.loads(tk.to_str())["model"]["merges"]
  return tokens, [m if isinstance(m, str) else " ".join(m) for m in merges]


def _llama(vocab: int):
  torch.manual_seed(0)
  c = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
      rope_parameters={"rope_type": "default", "rope_theta": 1e5},
      tie_word_embeddings=True, initializer_range=0.1, max_position_embeddings=256)
  model = transformers.LlamaForCausalLM(c)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.5)
  return model.eval()


def _permute(w, heads):   # llama.cpp's converter (convert_hf_to_gguf.py's `permute`)
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _write_gguf(path, model, tokens, merges, qtype):
  c = model.config
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  w.add_vocab_size(c.vocab_size)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_pad_token_id(2)
  w.add_chat_template(TEMPLATE)
  names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
  parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for name, t in model.state_dict().items():
    if name == "lm_head.weight":   # tied: llama.cpp writes no output.weight
      continue
    x = t.numpy().astype(np.float32)
    stem = name.rsplit(".", 1)[0]
    if stem in names:
      out = names[stem] + ".weight"
    else:
      i, part = stem.split(".")[2], ".".join(stem.split(".")[3:])
      out = f"blk.{i}.{parts[part]}.weight"
    if "q_proj" in name:
      x = _permute(x, c.num_attention_heads)
    elif "k_proj" in name:
      x = _permute(x, c.num_key_value_heads)
    if x.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
      w.add_tensor(out, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(out, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tokens, merges = _tokenizer()
  model = _llama(len(tokens))
  d = tmp_path_factory.mktemp("gguf")
  out = {}
  for qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0):
    path = str(d / f"tiny.{qtype.name}.gguf")
    _write_gguf(path, model, tokens, merges, qtype)
    out[qtype.name] = path
  return model, out


def _hf_gguf(path):
  d, name = os.path.split(path)
  return transformers.AutoModelForCausalLM.from_pretrained(
      d, gguf_file=name, torch_dtype=torch.float32).eval()


def _logits(run, tokens):
  return np.asarray(mt.forward(run.cfg, run.params, tokens, with_head=False).logits)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_logits_equal_transformers_gguf_loading(files, qtype):
  """mt.load_gguf's logits equal transformers' loading of the same file, and (F32)
  the model the file was written from; the head starts fresh beside it."""
  model, paths = files
  run = mt.load_gguf(paths[qtype], ["head.k=2"])
  assert run.cfg.model.tie_embeddings and run.cfg.model.num_kv_heads == 2
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 11))
  ours = _logits(run, tokens)[..., :model.config.vocab_size]
  with torch.no_grad():
    theirs = _hf_gguf(paths[qtype])(torch.tensor(tokens)).logits.numpy()
    source = model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  if qtype == "F32":
    np.testing.assert_allclose(ours, source, atol=TOL, rtol=0)
  else:   # Q8_0 rounds each weight to 1/127 of its block's largest: visibly off
    assert np.abs(ours - source).max() > 10 * TOL
  assert set(run.params["head"])


def test_tokenizer_and_chat_template(files):
  """The tokenizer gives transformers' GGUF tokenizer's ids on unicode text with the
  chat template's special tokens; they decode back; the template comes along."""
  _, paths = files
  run = mt.load_gguf(paths["F32"])
  d, name = os.path.split(paths["F32"])
  theirs = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
  ids = run.tokenizer.encode(TEXT)
  assert ids == theirs(TEXT, add_special_tokens=False).input_ids
  assert ids.count(1) == 2 and ids.count(2) == 1          # <|im_start|> x2, <|im_end|>
  assert run.tokenizer.decode(ids, keep_special=True) == TEXT
  assert run.tokenizer.eos_id == 2 and run.tokenizer.bos_id == 1
  assert run.chat_template == TEMPLATE
  # <think> and </think> are appended (the embedding grows by two mean rows).
  assert run.cfg.model.vocab_size == len(theirs.get_vocab()) + 2


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
  np.testing.assert_array_equal(gguf_format.unpermute_rows(_permute(w, 6), 6), w)
  assert not np.array_equal(_permute(w, 6), w)


def test_not_a_gguf_file(tmp_path):
  bad = tmp_path / "x.gguf"
  bad.write_bytes(b"not gguf at all")
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    mt.load_gguf(str(bad))
  with pytest.raises(FileNotFoundError, match="accepted: a llama.cpp .gguf file"):
    mt.load_gguf(str(tmp_path / "missing.gguf"))


def _smollm2_path():
  from mtcot_jax.tools import smollm2
  return smollm2.cached_path()


@pytest.mark.slow   # ~2.5 min here (two 135M-parameter models, 4 x 64 greedy tokens each)
@pytest.mark.skipif(_smollm2_path() is None,
                    reason="SmolLM2's GGUF is not fetched here (make smollm2)")
def test_smollm2_matches_transformers():
  """The real file: logits within 1e-3 of transformers' GGUF loading and greedy
  k=0 tokens identical to transformers' greedy generate for 64 tokens, 4 prompts."""
  path = _smollm2_path()
  run = mt.load_gguf(path, ["head.k=1"])
  theirs = _hf_gguf(path)
  prompts = ["What is 12 plus 7?", "Name three colours.", "Write one sentence about the sea.",
             "Tom has 3 bags of 4 apples. How many apples does he have?"]
  from mtcot_jax.data.chat import chat_prompt
  ids = [chat_prompt(run.tokenizer, run.chat_template, p) for p in prompts]
  tokens = np.array([ids[3][:24]])
  with torch.no_grad():
    ref = theirs(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(_logits(run, tokens)[..., :ref.shape[-1]], ref, atol=1e-3, rtol=0)
  for p in ids:
    with torch.no_grad():
      want = theirs.generate(torch.tensor([p]), max_new_tokens=64,
                             do_sample=False)[0, len(p):].tolist()   # through <|im_end|>
    res = mt.generate(run.cfg, run.params, np.array([p]), np.array([len(p)]),
                      jax.random.key(0), k=0, max_cot_tokens=64, max_answer_tokens=1)
    got = np.asarray(res.tokens[0, :len(want)]).tolist()
    assert got == want, (run.tokenizer.decode(got), run.tokenizer.decode(want))
    assert want[-1] != run.tokenizer.eos_id or int(res.lengths[0]) == len(want)


def test_sft_from_gguf_with_frozen_main(files, tmp_path):
  """train.init_from_gguf with train.freeze_main: the model section, weights and
  tokenizer come from the file, the head trains, the main model stays the file's
  bit for bit (its updates are zero), and the run loads back."""
  from mtcot_jax.train import loop
  model, paths = files
  work = str(tmp_path / "run")
  cfg = mt.load_config(None, [
      "data.task=wordprob", "data.task_args={ops: 1}", "data.train_size=32",
      "data.eval_size=4", "data.seq_len=128", f"data.data_dir={tmp_path}/data",
      "head.k=2", "head.num_heads=2", "head.width=32", "head.mlp_dim=64",
      f"train.init_from_gguf={paths['F32']}", "train.freeze_main=true",
      f"train.workdir={work}", "train.steps=2", "train.batch_size=4",
      "train.eval_examples=2", "train.learning_rate=1e-2"])
  loop.train(cfg, progress=False)
  run, src = mt.load_run(work), mt.load_gguf(paths["F32"])
  assert run.cfg.model.num_layers == 2 and run.cfg.model.tie_embeddings
  assert (run.tokenizer.eos_id, run.tokenizer.vocab_size) == (2, src.tokenizer.vocab_size)
  for a, b in zip(jax.tree.leaves(run.params["main"]), jax.tree.leaves(src.params["main"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fresh = mt.load_gguf(paths["F32"], ["head.k=2", "head.num_heads=2", "head.width=32",
                                      "head.mlp_dim=64"], key=jax.random.split(
                                          jax.random.key(0))[0])
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree.leaves(run.params["head"]), jax.tree.leaves(fresh.params["head"]))]
  assert max(moved) > 1e-4
