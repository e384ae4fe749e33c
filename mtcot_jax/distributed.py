"""Multi-host start-up: JAX's multi-controller runtime, before anything touches a device.

Every host (TPU VM, GPU node or process) runs the same program. `initialize(cfg)`
calls `jax.distributed.initialize` when the config or the environment asks for a
multi-process run; afterwards `jax.devices()` lists every process's devices, the
mesh spans them all, each process feeds its own rows of the global batch
(`train.step.global_batch`) and reads its own shard of the data.

Where each setting comes from (first found wins):

    coordinator   mesh.coordinator_address   $JAX_COORDINATOR_ADDRESS   cluster detection
    processes     mesh.num_processes         $JAX_NUM_PROCESSES         cluster detection
    process id    mesh.process_id            $JAX_PROCESS_ID            cluster detection

Cluster detection is JAX's own (Cloud TPU metadata, SLURM, Open MPI, ...). With
mesh.distributed = "auto" the runtime starts when any setting above is given,
on a Cloud TPU VM (libtpu and TPU chips present), or under a SLURM step or Open
MPI job of more than one process; "on" always starts it, "off" never.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from typing import Mapping

import jax

from mtcot_jax.config import ConfigError, MeshConfig

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Launch:
  """What `jax.distributed.initialize` is given; None lets JAX detect it."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  reason: str  # why the runtime is started (for logs and tests)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  text = environ.get(name, "").strip()
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise ConfigError(f"${name}={text!r}: expected an int") from None


def on_tpu_vm() -> bool:
  """libtpu installed and TPU chips visible (what JAX's Cloud TPU detection needs),
  checked without starting a backend."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _cluster(environ: Mapping[str, str]) -> str | None:
  """A multi-process job JAX's cluster detection can fill in, or None."""
  slurm = _env_int(environ, "SLURM_STEP_NUM_TASKS") or _env_int(environ, "SLURM_NTASKS")
  if slurm and slurm > 1 and "SLURM_PROCID" in environ:
    return f"a SLURM step of {slurm} tasks"
  ompi = _env_int(environ, "OMPI_COMM_WORLD_SIZE")
  if ompi and ompi > 1:
    return f"an Open MPI job of {ompi} processes"
  return None


def plan(mesh: MeshConfig, environ: Mapping[str, str] | None = None,
         tpu: bool | None = None) -> Launch | None:
  """The settings to start the runtime with, or None for a single-process run.

  environ defaults to os.environ and tpu to `on_tpu_vm()` (arguments for tests).
  Raises ConfigError for settings that cannot start a run (naming them).
  """
  environ = os.environ if environ is None else environ
  address = mesh.coordinator_address or environ.get(ENV_ADDRESS, "").strip() or None
  count = mesh.num_processes or _env_int(environ, ENV_PROCESSES)
  pid = mesh.process_id if mesh.process_id >= 0 else _env_int(environ, ENV_PROCESS_ID)
  if mesh.distributed == "off":
    return None
  cluster = _cluster(environ)
  detectable = cluster is not None or (tpu if tpu is not None else on_tpu_vm())
  if mesh.distributed == "on":
    reason = "mesh.distributed=on"
  elif address or count or pid is not None:
    reason = "a coordinator address, process count or process id is set"
  elif detectable:
    reason = cluster or "a Cloud TPU VM"
  else:
    return None
  if count is not None and pid is not None and not 0 <= pid < count:
    raise ConfigError(f"process id {pid} is not accepted: an int in [0, {count}) "
                      f"(mesh.process_id / ${ENV_PROCESS_ID}, mesh.num_processes / "
                      f"${ENV_PROCESSES})")
  missing = [name for name, value in (
      (f"the coordinator address (mesh.coordinator_address / ${ENV_ADDRESS})", address),
      (f"the process count (mesh.num_processes / ${ENV_PROCESSES})", count),
      (f"the process id (mesh.process_id / ${ENV_PROCESS_ID})", pid)) if value is None]
  if missing and not detectable:
    # JAX fills these in only on a cluster it detects.
    raise ConfigError(f"a multi-process run ({reason}) needs {', '.join(missing)}; accepted: "
                      "all three set, or a cluster JAX detects (Cloud TPU, SLURM, Open MPI), "
                      "or mesh.distributed=off")
  return Launch(address, count, pid, reason)


def initialize(mesh: MeshConfig, environ: Mapping[str, str] | None = None) -> bool:
  """Starts JAX's distributed runtime if `plan` says so (once; later calls do nothing).

  Call it before anything touches the devices (jax.devices(), an array, a jit).
  Returns True when this is a multi-controller run (jax.process_count() processes).
  """
  if jax.distributed.is_initialized():
    return True
  launch = plan(mesh, environ)
  if launch is None:
    return False
  # Cross-process collectives between CPU devices (tests, CPU clusters) need an
  # implementation; gloo is built into jaxlib (the default on recent JAX).
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=launch.coordinator_address,
                             num_processes=launch.num_processes,
                             process_id=launch.process_id)
  return True


def describe() -> str:
  """One line for logs: this process's place in the run."""
  return (f"process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local of {jax.device_count()} devices "
          f"({jax.devices()[0].platform})")
