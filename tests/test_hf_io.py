"""Hugging Face export in shards and import a tensor at a time (mtcot_jax.hf_io,
through mt.save_hf / mt.load_hf), checked against `transformers` loading the
export. The 8-device checks (a sharded import lands on the rules' shardings) are
multidevice_checks.py's `hf_shards_land_on_their_shardings`."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mtcot_jax as mt  # noqa: E402
from mtcot_jax import hf, hf_format, hf_io  # noqa: E402
from mtcot_jax.model import api  # noqa: E402
from test_hf import TEXTS, TOL, _bpe_tokenizer_dir, _build, _torch_logits  # noqa: E402

HEAD = ["head.k=2", "head.num_heads=2"]
TEMPLATE = ("{% for m in messages %}<|begin|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|begin|>assistant\n{% endif %}")
MAX_POSITIONS = 777


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A tiny untied Llama (llama3 RoPE) with a BPE tokenizer, a chat template and
  max_position_embeddings=777, as transformers saves it, imported."""
  path = str(tmp_path_factory.mktemp("src"))
  n = _bpe_tokenizer_dir(path, TEXTS)
  with open(os.path.join(path, "tokenizer_config.json")) as f:
    tcfg = json.load(f)
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({**tcfg, "chat_template": TEMPLATE}, f)
  model = _build("llama", vocab=n)
  model.config.max_position_embeddings = MAX_POSITIONS   # llama3 RoPE reads its own length
  model.save_pretrained(path)
  run = hf.load_hf(path, HEAD)
  assert run.cfg.model.max_position_embeddings == MAX_POSITIONS and run.chat_template == TEMPLATE
  return run


def _tokens(run):
  return np.random.RandomState(0).randint(0, run.cfg.model.vocab_size, (2, 24))


def _ours(run, params):
  return np.asarray(mt.forward(run.cfg, params, jnp.asarray(_tokens(run), jnp.int32)).logits)


def _shards(out: str, limit: int) -> dict[str, dict]:
  """{file: {tensor: (dtype, shape)}} of the export's shards, checked against its
  index and against transformers' rule (a new shard when the next tensor would
  pass the limit)."""
  from safetensors import safe_open
  with open(os.path.join(out, hf_io.INDEX)) as f:
    index = json.load(f)
  files = sorted(f for f in os.listdir(out) if f.startswith("model-"))
  assert len(files) >= 3 and "model.safetensors" not in os.listdir(out), files
  n = len(files)
  assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  got, total = {}, 0
  for file in files:
    with safe_open(os.path.join(out, file), framework="numpy") as f:
      got[file] = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
      sizes = [f.get_tensor(k).nbytes for k in f.keys()]
    total += sum(sizes)
    assert sum(sizes) <= limit or len(sizes) == 1, (file, sizes)
  assert index["weight_map"] == {k: file for file, ts in got.items() for k in ts}
  assert index["metadata"]["total_size"] == total
  return got


def test_sharded_bfloat16_export_loads_in_transformers(source, tmp_path):
  """bfloat16 in shards of at most 20 KB: transformers loads it (the weights
  widened to float32) with the logits of our model whose parameters are rounded
  to bfloat16 the same way; config, generation config and chat template kept."""
  out = str(tmp_path / "bf16")
  limit = 20_000
  mt.save_hf(source, out, dtype="bfloat16", max_shard_size="20KB")
  shards = _shards(out, limit)
  names = {t.name for t in hf_format.tensor_table(source.cfg)}
  assert {k for ts in shards.values() for k in ts} == names
  assert {dt for ts in shards.values() for dt, _ in ts.values()} == {"BF16"}
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), source.params)
  want = _ours(source, rounded)
  # Both sides compute in float32 on the same bfloat16 values: TOL's float32
  # argument holds. The rounding itself moves logits by ~2^-9 relative per
  # weight, O(1e-2) here: far above TOL, so a float32 file would fail.
  assert np.abs(want - _ours(source, source.params)).max() > 20 * TOL
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(_torch_logits(back, _tokens(source)), want, rtol=0, atol=TOL)
  assert back.config.max_position_embeddings == MAX_POSITIONS
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  tok = source.tokenizer
  gen = transformers.GenerationConfig.from_pretrained(out)
  assert (gen.eos_token_id, gen.bos_token_id, gen.pad_token_id, gen.do_sample) == (
      tok.eos_id, tok.bos_id, tok.pad_id, False)
  from mtcot_jax.data import chat
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  messages = [{"role": "user", "content": "12*34="}]
  assert hf_tok.chat_template == TEMPLATE
  assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
      chat.render(TEMPLATE, messages)
  # Imported back in either parameter dtype: the bfloat16 values, exactly.
  for dtype in ("float32", "bfloat16"):
    again = hf.load_hf(out, HEAD + [f"model.param_dtype={dtype}"])
    assert again.chat_template == TEMPLATE
    assert again.cfg.model.max_position_embeddings == MAX_POSITIONS
    for a, b in zip(jax.tree.leaves(again.params["main"]), jax.tree.leaves(rounded["main"])):
      assert a.dtype == jnp.dtype(dtype)
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))


def test_sharded_float32_round_trip_is_exact(source, tmp_path):
  """float32 shards (max_shard_size in bytes), scan layout on both sides: transformers'
  logits within TOL, load_hf's parameters bit-identical; several stop ids and
  sampling settings reach generation_config.json."""
  run = dataclasses.replace(source, cfg=source.cfg.replace(
      decode={"eos_id": (source.tokenizer.eos_id, 7), "temperature": 0.7, "top_k": 5}))
  scanned = dataclasses.replace(run, cfg=run.cfg.replace(model={"scan_layers": True}),
                                params=api.to_scan_layout(run.params))
  out = str(tmp_path / "f32")
  mt.save_hf(scanned, out, dtype="float32", max_shard_size=30_000)
  _shards(out, 30_000)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(_torch_logits(back, _tokens(run)), _ours(run, run.params),
                             rtol=0, atol=TOL)
  gen = transformers.GenerationConfig.from_pretrained(out)
  assert (gen.eos_token_id, gen.do_sample, gen.temperature, gen.top_k, gen.top_p) == (
      [source.tokenizer.eos_id, 7], True, 0.7, 5, 1.0)
  again = hf.load_hf(out, HEAD + ["model.scan_layers=true"])
  plain = api.to_plain_layout(again.params)
  for a, b in zip(jax.tree.leaves(plain["main"]), jax.tree.leaves(run.params["main"])):
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg, head = hf.load_head(out)
  for a, b in zip(jax.tree.leaves(head), jax.tree.leaves(scanned.params["head"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("size", ["5XB", "abc", "0MB", 0, -3, 1.5, True, None])
def test_bad_max_shard_size_gets_a_sentence(source, tmp_path, size):
  with pytest.raises(ValueError, match=r"max_shard_size=.*accepted: an int number of bytes"):
    mt.save_hf(source, str(tmp_path / "out"), max_shard_size=size)
  assert os.listdir(tmp_path) == []   # nothing made, not even the staging directory


def test_bad_checkpoints_and_dtypes_get_a_sentence(source, tmp_path):
  with pytest.raises(ValueError, match=r"dtype='int8'.*accepted.*bfloat16"):
    mt.save_hf(source, str(tmp_path / "out"), dtype="int8")
  assert os.listdir(tmp_path) == []
  out = tmp_path / "ckpt"
  mt.save_hf(source, str(out), max_shard_size="40KB")
  index = json.loads((out / hf_io.INDEX).read_text())
  first = sorted(set(index["weight_map"].values()))[0]
  (out / first).rename(tmp_path / "away")
  with pytest.raises(FileNotFoundError, match=f"{first}, listed in"):
    hf.load_hf(str(out))
  (tmp_path / "away").rename(out / first)
  index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first
  (out / hf_io.INDEX).write_text(json.dumps(index))
  with pytest.raises(ValueError, match="lists tensors its files lack.*layers.9"):
    hf.load_hf(str(out))
  (out / hf_io.INDEX).write_text(json.dumps({"metadata": {}}))
  with pytest.raises(ValueError, match="has no weight_map"):
    hf.load_hf(str(out))


def test_single_file_when_it_fits(source, tmp_path):
  """Under the default max_shard_size ("5GB") the tiny model is one
  model.safetensors and no index, as transformers writes a small model."""
  out = tmp_path / "one"
  mt.save_hf(source, str(out))
  written = set(os.listdir(out))
  assert "model.safetensors" in written and hf_io.INDEX not in written
  assert not any(f.startswith("model-") for f in written)
  assert hf_io.shard_bytes("5GB") == 5 * 10**9 and hf_io.shard_bytes(123) == 123
  # A chat_template.jinja (transformers 5 writes the template there) wins over
  # tokenizer_config.json's, for transformers and for load_hf.
  (out / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
  assert transformers.AutoTokenizer.from_pretrained(str(out)).chat_template == \
      "{{ messages[0]['content'] }}" == hf.load_hf(str(out), HEAD).chat_template


def test_a_failed_write_on_process_0_still_gathers_then_raises(source, tmp_path, monkeypatch):
  """As with several processes (process_count patched to 2): the first shard's
  write fails on process 0, which still takes its part in every later gather
  (the others would be waiting in them), writes nothing more, then raises that
  error; no directory is left."""
  import safetensors.numpy
  calls = []
  copy, save = hf_io.host_copy, safetensors.numpy.save_file
  monkeypatch.setattr(hf_io, "host_copy", lambda x: calls.append(1) or copy(x))
  saves = []

  def fail_first(tensors, file, metadata=None):
    saves.append(file)
    if len(saves) == 1:
      raise OSError("disk full")
    save(tensors, file, metadata=metadata)
  monkeypatch.setattr(safetensors.numpy, "save_file", fail_first)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(hf, "_on_process_0", lambda value: value)
  with pytest.raises(OSError, match="disk full"):
    mt.save_hf(source, str(tmp_path / "out"), max_shard_size="20KB")
  gathered = len(hf_format.tensor_table(source.cfg)) + len(jax.tree.leaves(source.params["head"]))
  assert len(calls) == gathered and len(saves) == 1
  assert os.listdir(tmp_path) == []
