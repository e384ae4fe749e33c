"""A workdir at a URL (gs://... on a pod): every path through etils.epath, never
os.path.abspath. Offline, the URL is fsspec's in-memory file system (memory://),
given to etils.epath as a path class here (epath knows gs://, s3://, az://, hf://).

Orbax's checkpoints cannot go to memory://: orbax writes its arrays through
TensorStore, with the GCS driver for gs:// and the file driver otherwise, and
TensorStore's own memory:// store is not fsspec's (nor does orbax build a spec for
it). So in the run below orbax writes to a local directory reached through epath
(`checkpoint_dir` patched), and everything else the run writes and reads back
(config.yaml, the tokenizer, metrics.jsonl, TensorBoard's event files, the plots)
goes to memory://."""

import os

import fsspec
import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath, register
from tensorboard.backend.event_processing import event_accumulator

import mtcot_jax as mt
from mtcot_jax.config import ConfigError
from mtcot_jax.tools import plot
from mtcot_jax.train import checkpoint as ckpt
from mtcot_jax.train import loop
from mtcot_jax.train.metrics import read_metrics
from test_train import _cfg


class _MemoryBackend(epath_backend._FileSystemSpecBackend):
  def fs(self, path):
    return fsspec.filesystem("memory")


_MEMORY = _MemoryBackend()


class MemoryPath(gpath.PosixGPath):
  """memory://bucket/x as an epath.Path (kept as /memory/bucket/x, the way epath
  keeps gs://b/x as /gs/b/x), on fsspec's in-memory file system."""

  def __new__(cls, *parts):
    full = "/".join(os.fspath(p) for p in parts)
    if full.startswith("memory://"):
      parts = ("/memory/" + full[len("memory://"):],)
    return super().__new__(cls, *parts)

  @property
  def _uri_scheme(self):
    return "memory" if self.parts[:2] == ("/", "memory") else None

  @property
  def _backend(self):
    return _MEMORY


@pytest.fixture
def memory_url(monkeypatch, tmp_path):
  """A fresh memory:// workdir URL; the cwd is an empty directory, checked empty
  at the end (no local `memory:` directory), and the in-memory files are removed."""
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "memory://", MemoryPath)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  bucket = f"mtcot-test-{os.getpid()}"
  yield f"memory://{bucket}/run"
  fsspec.filesystem("memory").rm(f"/{bucket}", recursive=True)
  assert os.listdir(cwd) == []
  assert not [d for d, _, _ in os.walk(tmp_path) if "memory:" in d]


def test_paths_of_a_url_workdir():
  """The bug this fixes: abspath made gs://b/x the local <cwd>/gs:/b/x."""
  assert str(ckpt.checkpoint_dir("gs://b/x")) == "gs://b/x/checkpoints"
  assert str(ckpt.checkpoint_dir("runs/x")) == os.path.abspath("runs/x/checkpoints")
  with pytest.raises(ConfigError, match="orbax cannot write checkpoints to s3://"):
    ckpt.checkpoint_dir("s3://b/x")
  with pytest.raises(ConfigError, match="no file system for nosuch://"):
    ckpt.read_config("nosuch://b/x")


def _tensorboard(url, local_dir) -> tuple[int, dict[str, list[int]]]:
  """(the number of event files, the steps TensorBoard shows per tag), read from
  the event files copied locally."""
  os.makedirs(local_dir)
  tb = epath.Path(url) / loop.TENSORBOARD_DIR
  files = [p for p in tb.iterdir() if ".tfevents." in p.name]
  for p in files:
    with open(os.path.join(local_dir, p.name), "wb") as f:
      f.write(p.read_bytes())
  acc = event_accumulator.EventAccumulator(local_dir, size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return len(files), {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_sft_run_saves_and_resumes_in_a_url_workdir(memory_url, tmp_path, monkeypatch):
  local_ckpt = tmp_path / "checkpoints"            # orbax's part (see the module's docstring)
  real = ckpt.checkpoint_dir
  monkeypatch.setattr(ckpt, "checkpoint_dir",
                      lambda w: epath.Path(local_ckpt) if w == memory_url else real(w))
  cfg = _cfg(tmp_path, "train.steps=4", "train.checkpoint_every=2",
             f"train.workdir={memory_url}")
  with pytest.warns(UserWarning, match="is not locked"):
    assert loop.train(cfg, stop_after=3, progress=False) == {"stopped_at": 3}
  assert mt.load_run(memory_url).step == 2
  with pytest.warns(UserWarning, match="is not locked"):
    summary = loop.train(cfg, progress=False)                # resumes from step 2

  names = {os.path.basename(p) for p in fsspec.filesystem("memory").ls(
      memory_url[len("memory:/"):], detail=False)}
  assert names == {"config.yaml", "tokenizer.model", "tokenizer.sha256", "metrics.jsonl",
                   loop.TENSORBOARD_DIR}                     # no .lock: see workdir_lock
  assert sorted(os.listdir(local_ckpt)) == ["2", "4"]
  # Step 3, logged before the interruption, is dropped on resume and logged again.
  records = read_metrics(memory_url)
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  assert records[-1]["summary"]["step"] == 4
  n_files, tb = _tensorboard(memory_url, str(tmp_path / "tb"))
  assert n_files == 2 and tb["loss"] == [1, 2, 3, 4]        # one file per session, purged
  # What decode.py --checkpoint reads: config, tokenizer, parameters.
  run = mt.load_run(memory_url)
  assert run.step == 4 and run.cfg == cfg and run.tokenizer.path.startswith(memory_url)
  jax.tree.map(np.testing.assert_array_equal, run.params, summary["params"])
  # train.py's plots go beside the run.
  paths = plot.plot_runs([memory_url], f"{memory_url}/plots")
  assert paths and all(epath.Path(p).read_bytes()[:4] == b"\x89PNG" for p in paths)
