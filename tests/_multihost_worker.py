"""One process of a two-process run on forced CPU devices (started by test_scale.py).

    python _multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUTDIR

Starts JAX's distributed runtime through `mtcot_jax.distributed`, decodes a batch
with the mesh, runs a few sharded SFT steps of the scanned, rematerialised model
(each process feeding its own rows of one global batch), saves a checkpoint with
orbax from both processes, exports the trained model to Hugging Face shards and
imports them back onto the mesh (`hf_round_trip`), and (process 0) writes what it
saw to OUTDIR/results.npz. The helpers below are shared with
the test, which recomputes everything in one process.
"""

import os
import sys

if __name__ == "__main__":   # a worker process; imported by the test, it changes nothing
  os.environ["XLA_FLAGS"] = " ".join(   # the test's flags (tests/conftest.py), 2 CPU devices
      [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"]).strip()
  os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import TINY  # noqa: E402

LOCAL_DEVICES = 2
STEPS = 3
DECODE = dict(k=2, max_cot_tokens=5, max_answer_tokens=2, temperature=0.9, top_k=30)
MESH = ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"]  # fsdp across the processes
SCAN = ["model.scan_layers=true", "model.remat=full"]  # the test's reference is plain


def config(*extra):
  import mtcot_jax as mt
  # No weight decay: optim.decay_mask decays the stacked (L, D) norm scales under
  # scan, which the plain model does not (test_scale.py::test_scan_decay_mask).
  return mt.load_config(None, TINY + ["train.batch_size=8", "train.warmup_steps=1",
                                      "train.learning_rate=3e-3",
                                      *extra])


def global_batch_numpy(cfg, T=16):
  """The global training batch (every process builds the same)."""
  rng = np.random.default_rng(0)
  B = cfg.train.batch_size
  batch = {"inputs": rng.integers(6, cfg.model.vocab_size, (B, T)).astype(np.int32),
           "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
           "segment_ids": np.ones((B, T), np.int32),
           "cot_mask": (rng.random((B, T)) < 0.5).astype(np.float32),
           "answer_mask": (rng.random((B, T)) < 0.2).astype(np.float32)}
  batch["targets"] = np.roll(batch["inputs"], -1, 1)
  return batch


def prompts(cfg):
  prompt = np.random.default_rng(1).integers(6, cfg.model.vocab_size, (8, 5))
  return prompt, np.array([5, 3, 4, 2, 5, 1, 3, 4])


def initial_params(cfg, mesh, key, scale=1.0):
  """The plain model's random parameters for `key` (x scale for matrices), in
  cfg's layout (stacked under scan) and sharded on `mesh`: one model whichever
  layout runs it."""
  import jax
  import mtcot_jax as mt
  from mtcot_jax.model import api
  plain_cfg = cfg.replace(model={"scan_layers": False})
  params = mt.init_params(plain_cfg, key, mesh=mesh)
  params = jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, params)
  if cfg.model.scan_layers:
    out = api.param_shardings(cfg, mesh) if mesh is not None else None
    params = jax.jit(api.to_scan_layout, out_shardings=out)(params)
  return params


def decode_params(cfg, mesh):
  """Larger weights: diverse, seed-sensitive generations."""
  import jax
  return initial_params(cfg, mesh, jax.random.key(0), scale=10.0)


def train_steps(cfg, mesh, batch_fn):
  """STEPS sharded SFT steps from the config's seed; returns (state, losses)."""
  import jax
  from mtcot_jax.train import losses, optim
  from mtcot_jax.train.step import create_state
  opt = optim.make_optimizer(cfg)
  key_init = jax.random.split(jax.random.key(cfg.train.seed))[0]   # create_state's
  state = create_state(cfg, opt, mesh, params=initial_params(cfg, mesh, key_init))
  if mesh is None:
    state = jax.device_put(state, jax.devices()[0])
  shardings = jax.tree.map(lambda x: x.sharding, state) if mesh is not None else None
  step = losses.make_sft_step(cfg, mesh, opt, shardings)
  out = []
  for _ in range(STEPS):
    state, metrics = step(state, batch_fn())
    out.append(float(metrics["loss"]))
  return state, out


def evaluation(cfg, params, mesh, data_dir):
  """train.py's evaluation (k=0 and k=head.k, greedy) of `params` on 8 validation problems."""
  from mtcot_jax.data import tokenizer_for
  from mtcot_jax.train.loop import run_evals
  cfg = cfg.replace(data={"task_args": [["digits", 1]], "train_size": 64, "eval_size": 8,
                          "data_dir": data_dir},
                    train={"eval_examples": 8},
                    decode={"max_cot_tokens": 6, "max_answer_tokens": 3})
  return run_evals(cfg, params, tokenizer_for(cfg), mesh, seed=0)


def hf_round_trip(cfg, params, mesh, path, want):
  """mt.save_hf from every process (each gathers, process 0 writes) in 8 KB
  shards, then mt.load_hf onto the mesh (each process puts its devices' slices):
  the parameters trained, bit for bit, on the rules' shardings. Returns the
  files written."""
  from types import SimpleNamespace
  import jax
  from jax.experimental import multihost_utils
  import mtcot_jax as mt
  from mtcot_jax.model import api
  mt.save_hf(SimpleNamespace(cfg=cfg, params=params), path, max_shard_size="8KB")
  back = mt.load_hf(path, [o for o in TINY if o.startswith("head.")] + SCAN + MESH, mesh=mesh)
  for got, sharding in zip(jax.tree.leaves(back.params["main"]),
                           jax.tree.leaves(api.param_shardings(back.cfg, mesh)["main"])):
    assert not got.is_fully_addressable and got.sharding.is_equivalent_to(sharding, got.ndim)
  main = api.to_plain_layout(multihost_utils.process_allgather(back.params, tiled=True))["main"]
  jax.tree.map(np.testing.assert_array_equal, main, want["main"])
  return sorted(os.listdir(path))


def main(process_id, num_processes, port, outdir):
  import time
  t0 = time.perf_counter()
  log = lambda what: print(f"{time.perf_counter() - t0:6.1f}s {what}", flush=True)  # noqa: E731
  import jax
  from jax.experimental import multihost_utils

  import mtcot_jax as mt
  from mtcot_jax import decode, distributed
  from mtcot_jax.model import api
  from mtcot_jax.train import checkpoint as ckpt
  from mtcot_jax.train.step import batch_sharding, global_batch

  cfg = config(*SCAN, *MESH, f"mesh.coordinator_address=127.0.0.1:{port}",
               f"mesh.num_processes={num_processes}", f"mesh.process_id={process_id}")
  assert distributed.initialize(cfg.mesh)
  assert jax.process_count() == num_processes, jax.process_count()
  assert jax.device_count() == LOCAL_DEVICES * num_processes, jax.devices()
  mesh = mt.make_mesh(cfg)
  log(distributed.describe())

  # Decode: every process passes the same global prompts.
  params = decode_params(cfg, mesh)
  prompt, lens = prompts(cfg)
  res = decode.generate(cfg, params, prompt, lens, jax.random.key(3), mesh=mesh, **DECODE)
  res = multihost_utils.process_allgather(res, tiled=True)
  log("decoded")

  # Train: each process feeds only the rows its devices hold.
  full = global_batch_numpy(cfg)
  index = batch_sharding(cfg, mesh, 2).addressable_devices_indices_map(full["inputs"].shape)
  rows = sorted({r for idx in index.values() for r in range(*idx[0].indices(len(full["inputs"])))})
  assert len(rows) == len(full["inputs"]) // num_processes, rows
  local = {k: v[rows] for k, v in full.items()}
  state, loss = train_steps(cfg, mesh, lambda: global_batch(cfg, mesh, local))
  log(f"trained: losses {loss}")

  mngr = ckpt.manager(os.path.join(outdir, "run"), cfg)
  ckpt.save(mngr, state, {"rows": rows})
  mngr.wait_until_finished()
  mngr.close()
  log("saved")
  # Evaluation: every process decodes the same global batches and grades them all.
  ev = evaluation(cfg, state.params, mesh, os.path.join(outdir, f"data{process_id}"))
  log(f"evaluated: {ev}")
  final = api.to_plain_layout(multihost_utils.process_allgather(state.params, tiled=True))
  hf_files = hf_round_trip(cfg, state.params, mesh, os.path.join(outdir, "hf"), final)
  log(f"exported and imported in {len(hf_files)} files")
  if process_id == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(final)}
    np.savez(os.path.join(outdir, "results.npz"), loss=np.array(loss),
             rows=np.array(rows), hf_files=np.array(hf_files),
             **{f"gen_{k}": np.asarray(v) for k, v in res._asdict().items()},
             **{f"param_{k}": v for k, v in flat.items()},
             **{f"eval_{name}_{m}": np.asarray(v) for name, r in ev.items() for m, v in r.items()
                if m != "tokens_per_s"})
  multihost_utils.sync_global_devices("done")
  print(f"ok process {process_id}", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
