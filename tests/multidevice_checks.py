"""Checks that need 8 devices. Run by test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported).

Each check_* function raises on failure; `python multidevice_checks.py NAME...`
runs the named ones (all by default) and prints 'ok NAME' per passed check.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import mtcot_jax as mt  # noqa: E402
from conftest import TINY, assert_adam_params_close  # noqa: E402


def _cfg(*extra):
  return mt.load_config(None, TINY + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *extra])


def check_forward_matches_one_device():
  cfg = _cfg()
  mesh = mt.make_mesh(cfg)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}, mesh.shape
  params = mt.init_params(cfg, jax.random.key(0), mesh=mesh)
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 1, cfg.model.vocab_size)
  sharded = mt.forward(cfg, params, tokens, mesh=mesh)
  local = jax.device_put(params, jax.devices()[0])
  single = mt.forward(cfg, local, tokens)
  np.testing.assert_allclose(sharded.logits, single.logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(sharded.head_features, single.head_features, atol=1e-5, rtol=1e-5)
  # Activations keep the residual's logical sharding (batch over data x fsdp).
  assert sharded.residual.sharding.spec[0] == ("data", "fsdp"), sharded.residual.sharding
  assert sharded.head_features.sharding.spec[0] == ("data", "fsdp"), sharded.head_features.sharding


def check_splash_under_mesh():
  """Splash attention (interpreted) under a (2, 2, 2) mesh runs in shard_map, each
  device on its batch rows (data x fsdp) and heads (tensor), and gives the one
  device run's logits within the tolerance of check_forward_matches_one_device
  (the same re-ordered sums: the heads' out-projection and the MLP split over
  tensor); a wrong split (rows or heads mixed up) would move them by O(1)."""
  cfg = _cfg("model.attention=splash")
  mesh = mt.make_mesh(cfg)
  params = mt.init_params(cfg, jax.random.key(0), mesh=mesh)
  T = 128                                     # splash tiles are multiples of 128
  tokens = jax.random.randint(jax.random.key(1), (8, T), 1, cfg.model.vocab_size)
  seg = jnp.asarray([[1] * 77 + [2] * 51] * 4 + [[1] * T] * 4, jnp.int32)
  pos = jnp.asarray([list(range(77)) + list(range(51))] * 4 + [list(range(T))] * 4, jnp.int32)
  kw = dict(positions=pos, segment_ids=seg, with_head=False)
  sharded = mt.forward(cfg, params, tokens, mesh=mesh, **kw)
  hlo = jax.jit(lambda p: mt.model.api.apply(cfg, p, tokens, shard=mt.sharding.sharder(cfg, mesh),
                                             **kw).logits).lower(params).as_text()
  # shard_map lowers to Shardy's manual computation (GSPMD: full-to-shard conversions).
  assert "sdy.manual_computation" in hlo or "SPMDFullToShardShape" in hlo, "no shard_map"
  single = mt.forward(cfg, jax.device_put(params, jax.devices()[0]), tokens, **kw)
  np.testing.assert_allclose(sharded.logits, single.logits, atol=1e-5, rtol=1e-5)


def check_params_sharded_by_rules():
  cfg = _cfg()
  mesh = mt.make_mesh(cfg)
  params = mt.init_params(cfg, jax.random.key(0), mesh=mesh)
  expect = {  # logical names -> rules: embed->fsdp, heads/kv_heads/mlp/vocab->tensor
      ("main", "embed"): P("tensor", "fsdp"),
      ("main", "layer_0", "attn", "q"): P("fsdp", "tensor", None),
      ("main", "layer_1", "attn", "k"): P("fsdp", "tensor", None),
      ("main", "layer_0", "attn", "o"): P("tensor", None, "fsdp"),
      ("main", "layer_0", "mlp", "gate"): P("fsdp", "tensor"),
      ("main", "layer_0", "mlp", "down"): P("tensor", "fsdp"),
      ("main", "final_norm", "scale"): P(None),
      ("head", "w_r"): P("fsdp", None),
      ("head", "layer_0", "mlp", "up"): P("fsdp", "tensor"),
  }
  for path, spec in expect.items():
    leaf = params
    for key in path:
      leaf = leaf[key]
    got = leaf.sharding.spec
    assert tuple(got) + (None,) * (leaf.ndim - len(got)) == tuple(spec) + (None,) * (
        leaf.ndim - len(spec)), (path, got, spec)
    # And the data really is split: each shard holds 1/(split) of the array.
    split = np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(spec)) if a])
    assert leaf.addressable_shards[0].data.size * split == leaf.size, path


def check_mesh_and_batch_errors():
  for overrides, needle in (
      (["mesh.data=3", "mesh.fsdp=1", "mesh.tensor=1"], "needs 3 devices but 8"),
      (["mesh.data=-1", "mesh.fsdp=3", "mesh.tensor=1"], "does not fit 8 devices"),
      (["mesh.data=8", "train.batch_size=12"], "train.batch_size=12 is not divisible by the 8"),
  ):
    cfg = mt.load_config(None, TINY + overrides)
    try:
      mt.make_mesh(cfg)
    except mt.ConfigError as e:
      assert needle in str(e), (str(e), needle)
    else:
      raise AssertionError(f"no error for {overrides}")
  cfg = mt.load_config(None, TINY + ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"])
  try:
    mt.param_shardings(cfg, mt.make_mesh(cfg))
  except mt.ConfigError as e:
    assert "cannot split" in str(e), str(e)
  else:
    raise AssertionError("4 heads split 8 ways accepted")


def check_decode_under_mesh():
  """Batch sharded over the data axes, params by the rules: same tokens as 1 device."""
  from mtcot_jax import decode
  cfg = _cfg()
  mesh = mt.make_mesh(cfg)
  params = mt.init_params(cfg, jax.random.key(0), mesh=mesh)
  params = jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x, params)  # diverse outputs
  prompt = np.random.default_rng(0).integers(6, cfg.model.vocab_size, (8, 5))
  lens = np.array([5, 3, 4, 2, 5, 1, 3, 4])
  kw = dict(k=3, max_cot_tokens=8, max_answer_tokens=3, temperature=0.9, top_k=30)
  sharded = decode.generate(cfg, params, prompt, lens, jax.random.key(3), mesh=mesh, **kw)
  local = decode.generate(cfg, jax.device_put(params, jax.devices()[0]), prompt, lens,
                          jax.random.key(3), **kw)
  for name in ("tokens", "source", "phase", "lengths", "forward_passes"):
    np.testing.assert_array_equal(getattr(sharded, name), getattr(local, name), err_msg=name)
  np.testing.assert_allclose(sharded.logprobs, local.logprobs, atol=1e-5)
  assert sharded.tokens.sharding.spec[0] == ("data", "fsdp"), sharded.tokens.sharding
  # The transposed decode layout of tensor-sharded matrices: the same output.
  cfg_oi = cfg.replace(decode={"weights_layout": "out_in"})
  dp = decode.prepare_params(cfg_oi, params)
  q = dp.params["main"]["layer_0"]["attn"]["q"]            # (H, Dh, D): heads on "tensor"
  assert q.sharding.spec[0] == "tensor" and q.sharding.spec[2] == "fsdp", q.sharding.spec
  oi = decode.generate(cfg_oi, dp, prompt, lens, jax.random.key(3), mesh=mesh, **kw)
  for name in ("tokens", "source", "phase", "lengths", "forward_passes"):
    np.testing.assert_array_equal(getattr(oi, name), getattr(local, name), err_msg=name)
  np.testing.assert_allclose(oi.logprobs, local.logprobs, atol=1e-5)
  # Verified decoding (every phase) under the mesh: k=0's tokens, as on one device.
  kw = dict(max_cot_tokens=8, max_answer_tokens=3)
  verified = decode.generate(cfg, params, prompt, lens, jax.random.key(3), mesh=mesh, k=3,
                             verify="all", **kw)
  plain = decode.generate(cfg, jax.device_put(params, jax.devices()[0]), prompt, lens,
                          jax.random.key(3), k=0, **kw)
  n = plain.tokens.shape[1]
  np.testing.assert_array_equal(np.asarray(verified.tokens)[:, :n], plain.tokens)
  np.testing.assert_array_equal(verified.lengths, plain.lengths)
  # Scanned layers: the stacked cache (kv_cache.py), sharded, in the accelerators' layout.
  scanned = cfg.replace(model={"scan_layers": True}, decode={"kv_layout": "bksd"})
  scan = decode.generate(scanned, mt.model.api.to_scan_layout(params), prompt, lens,
                         jax.random.key(3), mesh=mesh, k=0, **kw)
  for name in ("tokens", "lengths", "forward_passes"):
    np.testing.assert_array_equal(getattr(scan, name), getattr(plain, name), err_msg=name)


def check_context_head_under_mesh():
  """The head with context on a (data, fsdp, tensor) mesh: its features and an
  adaptive-block sampled decode (its memory cache sharded by batch) match one device."""
  from mtcot_jax import decode
  cfg = _cfg("head.context=-1", "head.num_layers=2")
  mesh = mt.make_mesh(cfg)
  params = mt.init_params(cfg, jax.random.key(0), mesh=mesh)
  params = jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x, params)
  local = jax.device_put(params, jax.devices()[0])
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 1, cfg.model.vocab_size)
  np.testing.assert_allclose(mt.forward(cfg, params, tokens, mesh=mesh).head_features,
                             mt.forward(cfg, local, tokens).head_features, atol=1e-5, rtol=1e-5)
  prompt = np.random.default_rng(0).integers(6, cfg.model.vocab_size, (8, 5))
  lens = np.array([5, 3, 4, 2, 5, 1, 3, 4])
  kw = dict(k=3, max_cot_tokens=8, max_answer_tokens=3, temperature=0.9, head_threshold=0.05)
  sharded = decode.generate(cfg, params, prompt, lens, jax.random.key(3), mesh=mesh, **kw)
  single = decode.generate(cfg, local, prompt, lens, jax.random.key(3), **kw)
  for name in ("tokens", "source", "lengths", "forward_passes"):
    np.testing.assert_array_equal(getattr(sharded, name), getattr(single, name), err_msg=name)
  np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)


def check_train_step_matches_one_device(*extra):
  from mtcot_jax.train import losses, optim
  from mtcot_jax.train.step import create_state, global_batch
  cfg = _cfg("train.batch_size=8", *extra)
  rng = np.random.default_rng(0)
  T = 16
  batch = {"inputs": rng.integers(6, 64, (8, T)).astype(np.int32),
           "positions": np.tile(np.arange(T, dtype=np.int32), (8, 1)),
           "segment_ids": np.ones((8, T), np.int32),
           "cot_mask": (rng.random((8, T)) < 0.5).astype(np.float32),
           "answer_mask": np.zeros((8, T), np.float32)}
  batch["targets"] = np.roll(batch["inputs"], -1, 1)
  results = []
  for mesh in (mt.make_mesh(cfg), None):
    opt = optim.make_optimizer(cfg)
    state = create_state(cfg, opt, mesh)
    if mesh is None:
      state = jax.device_put(state, jax.devices()[0])
    shardings = jax.tree.map(lambda x: x.sharding, state) if mesh is not None else None
    step = losses.make_sft_step(cfg, mesh, opt, shardings)
    for _ in range(2):
      state, metrics = step(state, global_batch(cfg, mesh, batch))
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  # The loss after a step checks that the gradients were reduced over the mesh;
  # parameters within AdamW's bound (conftest.assert_adam_params_close).
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  assert_adam_params_close(results[0][0], results[1][0], cfg, steps=2)


def check_vocab_chunks_under_mesh():
  """The chunked cross-entropy with the vocabulary sharded over `tensor` (64 ids
  in 3 strided chunks of 22, the last padded by 2): the one-device step's."""
  check_train_step_matches_one_device("train.vocab_chunks=3")


def check_restore_on_other_meshes():
  """Saved on (8,1,1); restored onto (2,2,2) and onto one device: every parameter,
  moment, step and key equal, laid out as the new mesh's rules say."""
  import shutil
  import tempfile
  from mtcot_jax.train import checkpoint as ckpt
  from mtcot_jax.train import optim
  from mtcot_jax.train.step import create_state
  cfg8 = _cfg("mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1")
  mesh8 = mt.make_mesh(cfg8)
  state = create_state(cfg8, optim.make_optimizer(cfg8), mesh8)
  # Distinct values at every position of every leaf (moments, counts and step
  # included), so a shard restored to the wrong place shows.
  shardings = jax.tree.map(lambda x: x.sharding, state)
  state = jax.jit(lambda s: jax.tree.map(
      lambda x: x + (jnp.arange(x.size).reshape(x.shape) % 251 + 1).astype(x.dtype), s),
      out_shardings=shardings)(state)
  saved = jax.device_get(state)
  workdir = tempfile.mkdtemp()
  mngr = ckpt.manager(workdir, cfg8)
  ckpt.save(mngr, state, {"at": 1})
  mngr.wait_until_finished()
  mngr.close()

  cfg = _cfg()
  mesh = mt.make_mesh(cfg)                                     # (2, 2, 2)
  for target_mesh in (mesh, None):
    fresh = create_state(cfg, optim.make_optimizer(cfg), target_mesh, params=None)
    if target_mesh is None:
      fresh = jax.device_put(fresh, jax.devices()[0])
    mngr = ckpt.manager(workdir, read_only=True)
    restored, data = ckpt.restore_latest(mngr, fresh)
    mngr.close()
    assert data == {"at": 1}, data
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
    jax.tree.map(lambda r, f: _same_layout(r, f), restored, fresh)
    params, _ = ckpt.restore_params(workdir, cfg, target_mesh)   # load_run's path
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved.params)
    jax.tree.map(lambda r, f: _same_layout(r, f), params, fresh.params)
  q = ckpt.restore_params(workdir, cfg, mesh)[0]["main"]["layer_0"]["attn"]["q"]
  assert q.sharding.spec == P("fsdp", "tensor", None), q.sharding.spec
  assert q.addressable_shards[0].data.size * 4 == q.size
  shutil.rmtree(workdir)


def _same_layout(restored, fresh):
  assert restored.sharding.is_equivalent_to(fresh.sharding, restored.ndim), (
      restored.sharding, fresh.sharding)


def check_memory_planner_matches_shards():
  """tools.memory's per-device parameter bytes (abstract mesh, arithmetic) = the
  bytes one device really holds, plain and scanned, on two meshes."""
  from mtcot_jax.model import api
  from mtcot_jax.tools import memory
  for extra in ((), ("model.scan_layers=true",), ("mesh.data=1", "mesh.fsdp=8",
                                                  "mesh.tensor=1")):
    cfg = _cfg(*extra)
    mesh = mt.make_mesh(cfg)
    shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          api.param_shapes(cfg), api.param_shardings(cfg, mesh))
    held = {d: 0 for d in jax.devices()}
    for leaf in jax.tree.leaves(shapes):
      for d, idx in leaf.sharding.devices_indices_map(leaf.shape).items():
        held[d] += np.zeros(leaf.shape, np.int8)[idx].size * leaf.dtype.itemsize
    got = memory.param_bytes_per_device(cfg, memory.abstract_mesh(cfg, 8))
    assert got == max(held.values()), (extra, got, held)


def check_gguf_lands_on_its_shardings():
  """mt.load_gguf with a mesh: every main weight on the sharding the rules give it,
  its values the file's (a tiny Llama written here with the gguf package)."""
  import tempfile
  import gguf
  from mtcot_jax import hf_format
  from mtcot_jax.gguf_format import _NAMES, _TOP
  model = [o for o in TINY if o.startswith("model.") and "vocab_size" not in o]
  src_cfg = mt.load_config(None, model + ["model.vocab_size=62", "model.tie_embeddings=true"])
  main = jax.device_get(mt.init_params(src_cfg, jax.random.key(3))["main"])
  m = src_cfg.model
  to_gguf = {**{v: k for k, v in _TOP.items()}, **{v: k for k, v in _NAMES.items()}}
  path = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
  w = gguf.GGUFWriter(path, "llama")
  for add, value in ((w.add_block_count, m.num_layers), (w.add_embedding_length, m.d_model),
                     (w.add_feed_forward_length, m.mlp_dim), (w.add_head_count, m.num_heads),
                     (w.add_head_count_kv, m.num_kv_heads), (w.add_layer_norm_rms_eps, m.norm_eps),
                     (w.add_rope_freq_base, m.rope_theta), (w.add_context_length, 64)):
    add(value)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(["<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(60)])
  w.add_token_merges([])
  w.add_eos_token_id(1)
  for name, x in hf_format.main_params_to_hf(src_cfg, main).items():
    parts = name.split(".")
    if parts[0] == "lm_head":
      continue
    if parts[1] == "layers":   # model.layers.{i}.{part}.weight
      out = f"blk.{parts[2]}.{to_gguf['.'.join(parts[3:-1])]}.weight"
    else:
      out = f"{to_gguf['.'.join(parts[:-1])]}.weight"
    if "q_proj" in name or "k_proj" in name:   # llama.cpp's row permutation
      heads = m.num_heads if "q_proj" in name else m.num_kv_heads
      x = x.reshape(heads, 2, x.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(x.shape)
    w.add_tensor(out, np.ascontiguousarray(x))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  mesh_cfg = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
  run = mt.load_gguf(path, [o for o in TINY if o.startswith("head.")] + mesh_cfg,
                     mesh=mt.make_mesh(_cfg()))
  assert run.cfg.model.vocab_size == 64, run.cfg.model.vocab_size   # + <think>, </think>
  want = mt.param_shardings(run.cfg, mt.make_mesh(run.cfg))
  for (path_, got), spec in zip(jax.tree_util.tree_leaves_with_path(run.params),
                                jax.tree.leaves(want)):
    assert got.sharding == spec, (jax.tree_util.keystr(path_), got.sharding, spec)
  np.testing.assert_array_equal(np.asarray(run.params["main"]["embed"])[:62], main["embed"])
  np.testing.assert_array_equal(np.asarray(run.params["main"]["layer_1"]["attn"]["q"]),
                                main["layer_1"]["attn"]["q"])


def check_hf_shards_land_on_their_shardings():
  """mt.save_hf of a model sharded on (2, 2, 2), plain or scanned, writes the same
  shards (each tensor gathered from its devices); mt.load_hf of them with the mesh
  reads one tensor at a time and puts every parameter on the sharding its rules
  give, in the config's dtype (float32 or bfloat16, plain or scanned), with the
  values of the single-device load and of the model saved."""
  import shutil
  import tempfile
  from types import SimpleNamespace
  from mtcot_jax import hf, hf_io
  from mtcot_jax.model import api
  cfg = _cfg()
  mesh = mt.make_mesh(cfg)
  params = mt.init_params(cfg, jax.random.key(3), mesh=mesh)
  saved = jax.device_get(params)
  tmp = tempfile.mkdtemp()
  scan_cfg = cfg.replace(model={"scan_layers": True})
  scanned = jax.jit(api.to_scan_layout, out_shardings=api.param_shardings(scan_cfg, mesh))(params)
  for name, run in (("plain", SimpleNamespace(cfg=cfg, params=params)),
                    ("scan", SimpleNamespace(cfg=scan_cfg, params=scanned))):
    mt.save_hf(run, os.path.join(tmp, name), max_shard_size="8KB")
  a, b = (hf_io.Checkpoint(os.path.join(tmp, n)) for n in ("plain", "scan"))
  assert len({a._file[k] for k in a}) >= 4 and sorted(a) == sorted(b), sorted(a._file.values())
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  out = os.path.join(tmp, "plain")
  head = [o for o in TINY if o.startswith("head.")]
  mesh_cfg = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
  single = jax.device_get(hf.load_hf(out, head).params["main"])
  jax.tree.map(np.testing.assert_array_equal, single, saved["main"])
  events = []
  read, put = hf_io.Checkpoint.__getitem__, hf_io._to_devices
  hf_io.Checkpoint.__getitem__ = lambda self, k: events.append("read") or read(self, k)
  hf_io._to_devices = lambda x, s: events.append("put") or put(x, s)
  try:
    for extra in ((), ("model.scan_layers=true",), ("model.param_dtype=bfloat16",)):
      events.clear()
      run = hf.load_hf(out, head + mesh_cfg + list(extra), mesh=mesh)
      # One tensor on the host at a time: each read is put before the next.
      assert events == ["read", "put"] * len(a), events
      want = mt.param_shardings(run.cfg, mesh)
      for (path, got), sharding in zip(jax.tree_util.tree_leaves_with_path(run.params),
                                       jax.tree.leaves(want)):
        where = jax.tree_util.keystr(path)
        assert got.sharding.is_equivalent_to(sharding, got.ndim), (where, got.sharding, sharding)
        assert got.dtype == jnp.dtype(run.cfg.model.param_dtype), (where, got.dtype)
      main = jax.device_get(run.params["main"])
      if run.cfg.model.scan_layers:
        main = api.to_plain_layout({"main": main})["main"]
      dtype = jnp.dtype(run.cfg.model.param_dtype)
      jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y.astype(dtype)),
                   main, single)
  finally:
    hf_io.Checkpoint.__getitem__, hf_io._to_devices = read, put
    shutil.rmtree(tmp)


def main(names):
  assert jax.device_count() == 8, jax.devices()
  names = names or [n[len("check_"):] for n in globals() if n.startswith("check_")]
  for name in names:
    globals()[f"check_{name}"]()
    print(f"ok {name}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
