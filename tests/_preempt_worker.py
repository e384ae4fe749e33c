"""One process of a two-process training run that a test preempts (started by
test_preemption.py).

    python _preempt_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR PACE_SECONDS

Starts JAX's distributed runtime (with its preemption sync manager, which then
owns SIGTERM), and trains with `loop.run_steps`, the loop train.py's SFT and RL
stages run, from the latest checkpoint in WORKDIR if there is one: STEPS steps of
SFT on a 4-device mesh (fsdp across the processes), on the global batch
`batch_numpy(cfg, step)` of each step, each process feeding its own rows. Each
step first sleeps PACE_SECONDS (so that a test's signal lands in training).
Preempted, it prints `preempted at step S` and exits with status 75; finished,
process 0 writes WORKDIR/final.npz (the parameters, gathered).
"""

import os
import sys
import time

if __name__ == "__main__":   # a worker process; imported by the test, it changes nothing
  os.environ["XLA_FLAGS"] = " ".join(   # the test's flags (tests/conftest.py), 2 CPU devices
      [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"]).strip()
  os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import _multihost_worker as mw  # noqa: E402

STEPS = 12
CHECKPOINT_EVERY = 4


def config(*extra):
  return mw.config(f"train.steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
                   "train.log_every=1", "train.eval_every=0", "train.eval_examples=0", *extra)


def batch_numpy(cfg, step: int, T: int = 16):
  """The global batch of `step` (every process builds the same)."""
  rng = np.random.default_rng(1000 + step)
  B = cfg.train.batch_size
  batch = {"inputs": rng.integers(6, cfg.model.vocab_size, (B, T)).astype(np.int32),
           "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
           "segment_ids": np.ones((B, T), np.int32),
           "cot_mask": (rng.random((B, T)) < 0.5).astype(np.float32),
           "answer_mask": (rng.random((B, T)) < 0.2).astype(np.float32)}
  batch["targets"] = np.roll(batch["inputs"], -1, 1)
  return batch


def initial_state(cfg, mesh):
  """The state train() would create: the config's seed, the plain model's parameters."""
  import jax
  from mtcot_jax.train import optim
  from mtcot_jax.train.step import create_state
  opt = optim.make_optimizer(cfg)
  key_init = jax.random.split(jax.random.key(cfg.train.seed))[0]   # create_state's
  state = create_state(cfg, opt, mesh, params=mw.initial_params(cfg, mesh, key_init))
  if mesh is None:
    state = jax.device_put(state, jax.devices()[0])
  return state, opt


def main(process_id, num_processes, port, workdir, pace):
  t0 = time.perf_counter()
  import jax

  import mtcot_jax as mt
  from mtcot_jax import distributed
  from mtcot_jax.train import checkpoint as ckpt
  from mtcot_jax.train import losses, loop, preemption
  from mtcot_jax.train.step import batch_sharding, global_batch

  cfg = config(*mw.MESH, f"mesh.coordinator_address=127.0.0.1:{port}",
               f"mesh.num_processes={num_processes}", f"mesh.process_id={process_id}",
               f"train.workdir={workdir}")
  assert distributed.initialize(cfg.mesh)
  assert preemption.sync_manager_active()
  mesh = mt.make_mesh(cfg)
  state, opt = initial_state(cfg, mesh)
  mngr = ckpt.manager(workdir, cfg)
  restored = ckpt.restore_latest(mngr, state, workdir)
  if restored is not None:
    state = restored[0]
  print(f"process {process_id}: starts at step {int(state.step)} "
        f"({time.perf_counter() - t0:.1f}s)", flush=True)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  sft_step = losses.make_sft_step(cfg, mesh, opt, shardings)
  index = batch_sharding(cfg, mesh, 2).addressable_devices_indices_map(
      (cfg.train.batch_size, 16))
  rows = sorted({r for idx in index.values()
                 for r in range(*idx[0].indices(cfg.train.batch_size))})

  def step_fn(state, step):
    time.sleep(pace)
    local = {k: v[rows] for k, v in batch_numpy(cfg, step).items()}
    state, metrics = sft_step(state, global_batch(cfg, mesh, local))
    loop.check_finite(metrics, step + 1, mngr, workdir)
    return state, lambda: {"step": step + 1, "loss": float(metrics["loss"])}

  summary = loop.run_steps(cfg, state, mngr, step_fn, desc="preempt", t_start=t0,
                           data_state=lambda done: {"rows": rows}, progress=False)
  print(f"process {process_id}: left the loop ({time.perf_counter() - t0:.1f}s)", flush=True)
  if summary.get("preempted"):
    print(f"process {process_id}: preempted at step {summary['step']}", flush=True)
    sys.exit(preemption.EXIT_CODE)
  from jax.experimental import multihost_utils
  final = multihost_utils.process_allgather(summary["params"], tiled=True)
  if process_id == 0:
    np.savez(os.path.join(workdir, "final.npz"),
             **{jax.tree_util.keystr(p): np.asarray(x)
                for p, x in jax.tree_util.tree_leaves_with_path(final)})
  print(f"process {process_id}: finished at step {summary['step']} "
        f"({time.perf_counter() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
