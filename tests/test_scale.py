"""Scale-out: multi-host start-up (two CPU processes), scan and remat against the
plain model, checkpoints restored elsewhere, and the memory planner.

The 8-device checks (cross-mesh restore, the planner against real shards) are in
multidevice_checks.py, run by test_sharding.py.
"""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt
from conftest import TINY, assert_adam_params_close, subprocess_env
from mtcot_jax import decode, distributed
from mtcot_jax.config import ConfigError, MeshConfig
from mtcot_jax.model import api
from mtcot_jax.tools import memory

HERE = os.path.dirname(__file__)
CONFIGS = os.path.join(HERE, "..", "configs")


# --- multi-host start-up -------------------------------------------------------------


def test_plan_reads_config_then_environment():
  none = {}
  assert distributed.plan(MeshConfig(), none, tpu=False) is None
  assert distributed.plan(MeshConfig(distributed="off"), {"JAX_COORDINATOR_ADDRESS": "h:1"},
                          tpu=True) is None
  launch = distributed.plan(MeshConfig(coordinator_address="10.0.0.1:1234", num_processes=4,
                                       process_id=3), none, tpu=False)
  assert (launch.coordinator_address, launch.num_processes, launch.process_id) == (
      "10.0.0.1:1234", 4, 3)
  env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  launch = distributed.plan(MeshConfig(), env, tpu=False)
  assert (launch.coordinator_address, launch.num_processes, launch.process_id) == ("h:9", 2, 1)
  # The config wins over the environment.
  assert distributed.plan(MeshConfig(process_id=0), env, tpu=False).process_id == 0
  # On a TPU VM or a detected cluster, JAX fills in what is missing.
  assert distributed.plan(MeshConfig(), none, tpu=True) == distributed.Launch(
      None, None, None, "a Cloud TPU VM")
  slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}
  assert "SLURM" in distributed.plan(MeshConfig(), slurm, tpu=False).reason
  assert distributed.plan(MeshConfig(), {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"},
                          tpu=False) is None
  assert distributed.plan(MeshConfig(distributed="on"), none, tpu=True).num_processes is None


@pytest.mark.parametrize("mesh,env,needle", [
    (MeshConfig(coordinator_address="h:1"), {}, "the process count"),
    (MeshConfig(num_processes=2), {"JAX_PROCESS_ID": "0"}, "the coordinator address"),
    (MeshConfig(), {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "process id 2"),
    (MeshConfig(), {"JAX_PROCESS_ID": "x"}, "$JAX_PROCESS_ID='x': expected an int"),
])
def test_plan_errors_name_the_setting(mesh, env, needle):
  with pytest.raises(ConfigError) as e:
    distributed.plan(mesh, env, tpu=False)
  assert needle in str(e.value)


def test_mesh_config_validation():
  with pytest.raises(ConfigError, match="mesh.distributed='maybe'"):
    mt.load_config(None, ["mesh.distributed=maybe"])
  needle = r"mesh.process_id=2 is not accepted: an int in \[0, mesh.num_processes=2\)"
  with pytest.raises(ConfigError, match=needle):
    mt.load_config(None, ["mesh.num_processes=2", "mesh.process_id=2"])


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Two processes x 2 CPU devices: decode, 3 SFT steps, a checkpoint."""
  out = str(tmp_path_factory.mktemp("multihost"))
  port = _free_port()
  env = subprocess_env({k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))})
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "_multihost_worker.py"), str(i), "2", str(port), out],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{log[-5000:]}"
    assert f"ok process {i}" in log, log[-3000:]
  return out, dict(np.load(os.path.join(out, "results.npz")))


def test_two_processes_match_one(two_process_run):
  """Two processes running the scanned, rematerialised model on a 4-device mesh,
  one process running the plain model on one device, the same global batch and
  prompts: the same losses, parameters and tokens (decoding with the KV cache)."""
  import _multihost_worker as w
  from mtcot_jax.train.step import global_batch
  out, got = two_process_run
  cfg = w.config()
  assert sorted(got["rows"]) == [0, 1, 2, 3], got["rows"]   # process 0's half of the batch
  full = w.global_batch_numpy(cfg)
  state, loss = w.train_steps(cfg, None, lambda: global_batch(cfg, None, full))
  # The loss of every step: a gradient that is not synchronised across processes
  # changes the losses after the first step far beyond float32 reduction error.
  np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)
  # Parameters: within AdamW's bound for gradients that differ by rounding
  # (conftest.assert_adam_params_close).
  want = jax.device_get(state.params)
  mine = jax.tree_util.tree_map_with_path(
      lambda path, _: got[f"param_{jax.tree_util.keystr(path)}"], want)
  assert_adam_params_close(mine, want, cfg, steps=w.STEPS)

  params = w.decode_params(cfg, None)
  prompt, lens = w.prompts(cfg)
  ref = decode.generate(cfg, params, prompt, lens, jax.random.key(3), **w.DECODE)
  for name in ("tokens", "source", "phase", "lengths", "forward_passes"):
    np.testing.assert_array_equal(got[f"gen_{name}"], getattr(ref, name), err_msg=name)
  np.testing.assert_allclose(got["gen_logprobs"], ref.logprobs, atol=1e-5)

  # train.py's evaluation on two processes grades the same as on one.
  ev = w.evaluation(cfg, state.params, None, os.path.join(out, "data_ref"))
  for name, r in ev.items():
    for m in ("accuracy", "forward_passes", "cot_tokens", "answer_tokens", "examples"):
      np.testing.assert_allclose(got[f"eval_{name}_{m}"], r[m], err_msg=f"{name} {m}")


def test_two_process_checkpoint_restores_in_one_process(two_process_run):
  import _multihost_worker as w
  from mtcot_jax.train import checkpoint as ckpt
  from mtcot_jax.train import optim
  from mtcot_jax.train.step import create_state
  out, got = two_process_run
  cfg = w.config(*w.SCAN)       # the layout it was saved in
  workdir = os.path.join(out, "run")
  state = jax.device_put(create_state(cfg, optim.make_optimizer(cfg), None), jax.devices()[0])
  mngr = ckpt.manager(workdir, read_only=True)
  restored, data_state = ckpt.restore_latest(mngr, state)
  mngr.close()
  assert int(restored.step) == w.STEPS and data_state == {"rows": [0, 1, 2, 3]}
  params, step = ckpt.restore_params(workdir, cfg)     # load_run's path
  assert step == w.STEPS
  for tree in (restored.params, params):
    tree = api.to_plain_layout(tree)
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      assert x.sharding.device_set == {jax.devices()[0]}
      np.testing.assert_array_equal(np.asarray(x), got[f"param_{jax.tree_util.keystr(path)}"])
  # The optimizer state came back too: its moments are not the fresh zeros.
  assert any(np.abs(np.asarray(x)).sum() > 0 for x in jax.tree.leaves(restored.opt_state)
             if x.ndim > 1)


def test_two_process_hf_export_loads_in_one_process(two_process_run):
  """save_hf from two processes (process 0 wrote, both gathered; the workers
  checked the import back onto their mesh): shards with an index, and one
  process's load_hf of them gives the trained parameters, bit for bit."""
  from mtcot_jax import hf, hf_io
  out, got = two_process_run
  files = list(got["hf_files"])
  assert hf_io.INDEX in files and sum(f.startswith("model-") for f in files) >= 3, files
  run = mt.load_hf(os.path.join(out, "hf"), [o for o in TINY if o.startswith("head.")])
  for path, x in jax.tree_util.tree_leaves_with_path(run.params["main"]):
    np.testing.assert_array_equal(np.asarray(x), got[f"param_['main']{jax.tree_util.keystr(path)}"])
  cfg, head = hf.load_head(os.path.join(out, "hf"))
  for path, x in jax.tree_util.tree_leaves_with_path(head):
    np.testing.assert_array_equal(np.asarray(x), got[f"param_['head']{jax.tree_util.keystr(path)}"])


# --- scan and remat ------------------------------------------------------------------


def test_layout_conversion_roundtrip(tiny_cfg, tiny_params):
  scan_cfg = tiny_cfg.replace(model={"scan_layers": True})
  stacked = api.to_scan_layout(tiny_params)
  shapes = api.param_shapes(scan_cfg)
  assert jax.tree.structure(shapes) == jax.tree.structure(stacked)
  jax.tree.map(lambda s, x: np.testing.assert_equal(s.shape, x.shape), shapes, stacked)
  L = tiny_cfg.model.num_layers
  q = stacked["main"]["layers"]["attn"]["q"]
  for i in range(L):
    np.testing.assert_array_equal(q[i], tiny_params["main"][f"layer_{i}"]["attn"]["q"])
  # The stacked axis carries the logical name "layers" (replicated by the default rules).
  assert tuple(api.param_specs(scan_cfg)["main"]["layers"]["attn"]["q"]) == (
      "layers", "embed", "heads", "head_dim")
  jax.tree.map(np.testing.assert_array_equal, api.to_plain_layout(stacked), tiny_params)
  with pytest.raises(ValueError, match="expected plain-layout"):
    api.to_scan_layout(stacked)
  with pytest.raises(ValueError, match="expected scan-layout"):
    api.to_plain_layout(tiny_params)


def _probe(cfg, params, tokens, w_logits, w_feats):
  """A scalar reading every output (logits, the head's features, the sources), and
  the logits and features themselves."""
  out = api.apply(cfg, params, tokens)
  value = (jnp.sum(out.logits * w_logits) + jnp.sum(out.head_features * w_feats)
           + sum(jnp.sum(s) for s in out.sources))
  return value, (out.logits, out.head_features)


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (False, "dots"),
                                        (True, "full")])
def test_scan_and_remat_match_plain(tiny_cfg, tiny_params, scan, remat):
  """Same parameters: the same logits, head features, sources and gradients.

  (Decoding with the KV cache under scan, and sharded training of the scanned,
  rematerialised model, are compared with the plain model in the two-process test.)
  """
  cfg = tiny_cfg.replace(model={"scan_layers": scan, "remat": remat})
  params = api.to_scan_layout(tiny_params) if scan else tiny_params
  B, T, k = 2, 10, tiny_cfg.head.k
  tokens = jax.random.randint(jax.random.key(1), (B, T), 1, tiny_cfg.model.vocab_size)
  w_logits = jax.random.normal(jax.random.key(2), (B, T, tiny_cfg.model.vocab_size))
  w_feats = jax.random.normal(jax.random.key(3), (B, T, k, tiny_cfg.model.d_model))
  grad = jax.jit(jax.value_and_grad(_probe, argnums=1, has_aux=True), static_argnums=0)
  (want_v, want_out), want_g = grad(tiny_cfg, tiny_params, tokens, w_logits, w_feats)
  (got_v, got_out), got_g = grad(cfg, params, tokens, w_logits, w_feats)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
  for got, want in zip(got_out, want_out):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  if scan:
    got_g = api.to_plain_layout(got_g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), got_g, want_g)


def test_scan_decay_mask(tiny_params):
  """Weight decay reaches the same parameters in both layouts."""
  from mtcot_jax.train import optim
  plain = optim.decay_mask(tiny_params)["main"]["layer_0"]
  scanned = optim.decay_mask(api.to_scan_layout(tiny_params))["main"]["layers"]
  assert jax.tree.map(bool, scanned) == jax.tree.map(bool, plain)


# --- presets and the memory planner -----------------------------------------------------


@pytest.mark.parametrize("preset,devices,hbm_gib", [("tpu_v5e_256.yaml", 256, 16),
                                                    ("gpu_8xh100.yaml", 8, 74.5),
                                                    ("gpu_8xh100.yaml", 32, 74.5)])
def test_pod_presets_fit(preset, devices, hbm_gib):
  cfg = mt.load_config(os.path.join(CONFIGS, preset))
  assert cfg.model.scan_layers and cfg.model.dtype == "bfloat16" and cfg.model.remat != "none"
  r = memory.report(cfg, devices)
  assert 0.9e9 < r["num_params"] < 1.3e9, r["num_params"]
  assert r["devices"] == np.prod(list(r["mesh"].values())) == devices
  b = r["bytes"]
  # fp32 parameters split over fsdp, but for the (replicated) norm scales.
  assert b["params"] == pytest.approx(4 * r["num_params"] / r["mesh"]["fsdp"], rel=3e-3)
  assert b["adamw_moments"] == 2 * b["params"]
  assert b["total"] < 0.5 * hbm_gib * memory.GIB, memory.format_report(cfg, r)


def test_activation_estimate_orders_remat_policies():
  cfg = mt.load_config(os.path.join(CONFIGS, "tpu_v5e_256.yaml"))
  saved = {p: memory.activation_bytes_per_device(
      cfg.replace(model={"remat": p}), memory.abstract_mesh(cfg, 256))["saved"]
      for p in ("full", "dots", "none")}
  assert saved["full"] < saved["dots"] < saved["none"], saved
  # remat full keeps each block's input: L x (rows, T, D) in bfloat16.
  assert saved["full"] == 20 * 4 * 1024 * 2048 * 2
  with pytest.raises(ConfigError, match="cannot|does not split"):
    memory.report(cfg.replace(mesh={"data": 1, "fsdp": 1, "tensor": 256},
                              train={"batch_size": 1024}), 256)
