"""Where a run's files live: a local path, or a URL that etils.epath opens
(`gs://bucket/run`, `s3://`, `az://`), the path type orbax itself takes.

A local workdir behaves as it always has: os calls, appends, renames, flock.
A URL is never passed through `os.path.abspath` (which turns `gs://b/x` into the
local directory `<cwd>/gs:/b/x`), and on it:
- a file is written whole (`write_atomic`): an object store replaces an object
  in one step, so a reader sees the old contents or the new, never half;
- nothing is appended in place (object stores cannot append): metrics.jsonl is
  kept in memory and the object rewritten (`train.run_log.MetricsLog`), TensorBoard's
  event files likewise (`train.run_log.summary_writer`);
- there is no lock (`checkpoint.workdir_lock`): one run per workdir is the user's
  rule to keep.
Orbax writes checkpoints to a local path (a shared file system or GCSFuse too)
or to gs:// (TensorStore's GCS driver) only; `checkpoint.checkpoint_dir` refuses
other schemes before anything is written.
"""

from __future__ import annotations

import os

from etils import epath

from mtcot_jax.errors import ConfigError


def is_local(path) -> bool:
  """True for a local path (relative or absolute), False for a URL (`scheme://...`)."""
  return "://" not in os.fspath(path)


def run_path(path) -> epath.Path:
  """`path` as an etils.epath.Path: a local path as given (relative stays relative),
  a URL as it is. Raises ConfigError for a scheme epath has no file system for."""
  s = os.fspath(path)
  try:
    return epath.Path(s)
  except KeyError:                 # epath's registry of URL schemes has no such entry
    scheme = s.split("://", 1)[0]
    raise ConfigError(f"{s!r}: etils.epath has no file system for {scheme}://; accepted: a "
                      "local path, or a URL epath opens (gs://, s3://, az://)") from None


def write_atomic(path: epath.Path, data: bytes) -> None:
  """Writes `path` so that no reader sees it half-written: a local file through a
  temporary file renamed over it (after fsync), an object by writing it whole."""
  if is_local(path):
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  else:
    path.write_bytes(data)
