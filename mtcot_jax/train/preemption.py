"""Preemption: SIGTERM (what a preempted TPU VM, GPU node or Kubernetes pod gets
before it is taken away) makes a training run save a checkpoint at the step it
has reached and end cleanly; running the same command again resumes there,
bit-identically (the checkpoint holds the data iterator's position, as the
periodic ones do).

Two ways to learn of it, as orbax's CheckpointManager and MaxText's train loop do
(`if checkpoint_manager.reached_preemption(step): wait_until_finished(); exit`):

* **Multi-process runs** (`jax.distributed` initialised, the default
  `jax_enable_preemption_service=True`): JAX's preemption sync manager owns
  SIGTERM (a handler in the runtime, installed by `jax.distributed.initialize`).
  A notice on any host is shared through the coordination service; every host
  reports its step and all agree on the next one (max + 1) as the step to save
  at. `CheckpointManager.reached_preemption(step)` (orbax, over
  `multihost_utils.reached_preemption_sync_point`) turns True on every host at
  that same step, so all of them save the same step together. It must be called
  at every step, on every host: `Watcher.reached` does.
* **One process** (no sync manager): a Python SIGTERM handler sets a flag, read
  after each step. The handler is installed for the training loop only and the
  previous one put back when the loop returns, however it returns.

A multi-process run whose preemption service is disabled gets no handler: its
hosts could not agree on a step, and a collective save on different steps would
hang. SIGTERM then ends it as before (the next start resumes from the last
periodic checkpoint).
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings

import jax

# What train.py exits with after a preemption save: sysexits.h's EX_TEMPFAIL,
# "a temporary failure; the user is invited to retry". 0 means the run finished;
# a supervisor (a shell loop, SLURM requeue, a Kubernetes podFailurePolicy on
# exit code 75) restarts the command on 75.
EXIT_CODE = 75


class Preempted(Exception):
  """Raised by callers that run several training stages (the experiments runner)
  when one was preempted: the step reached is saved; running again resumes it."""


def sync_manager_active() -> bool:
  """True when JAX's preemption sync manager is running (jax.distributed started
  with the preemption service), which then owns SIGTERM."""
  try:
    from jax._src import distributed as jd
  except ImportError:   # pragma: no cover  (a JAX without it)
    return False
  state = jd.global_state
  return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None


class Watcher:
  """`with Watcher(mngr) as w: ... if w.reached(step): save and leave`.

  reached(step) is called once after every training step with the step just
  done (the state's step), on every process.
  """

  def __init__(self, mngr):
    self.mngr = mngr
    self.sync = False
    self.received = False
    self._previous = None
    self._installed = False

  def __enter__(self) -> "Watcher":
    self.sync = sync_manager_active()
    if self.sync:
      return self
    if jax.process_count() > 1:
      warnings.warn("this multi-process run has no JAX preemption sync manager "
                    "(jax_enable_preemption_service is off): SIGTERM is not handled, and a "
                    "preempted run resumes from its last periodic checkpoint")
      return self
    if threading.current_thread() is not threading.main_thread():
      return self   # Python runs signal handlers in the main thread only
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._installed = True
    return self

  def _on_sigterm(self, signum, frame) -> None:
    if not self.received:
      print("\nSIGTERM received: finishing the step in flight, then saving a checkpoint "
            "and exiting", file=sys.stderr, flush=True)
    self.received = True

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and leave (the same answer on every process).
    Sets `received` when it says so."""
    if self.sync and self.mngr.reached_preemption(step):
      self.received = True
    return self.received

  def __exit__(self, *exc) -> None:
    if self._installed:
      # None: the previous handler was not installed from Python; the default is
      # the best Python can put back.
      signal.signal(signal.SIGTERM,
                    self._previous if self._previous is not None else signal.SIG_DFL)
      self._installed = False


def message(step: int, steps: int, directory) -> str:
  """The line a preempted run prints (every process: each host's log says why it ended)."""
  who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
  return (f"{who}preempted: saved the checkpoint of step {step} (of {steps}) in "
          f"{directory}; run the same command to resume")
