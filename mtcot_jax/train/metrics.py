"""A run's metrics.jsonl: one JSON object a line, appended by `train.run_log.MetricsLog`
(training steps, evaluations, the final summary). One reader for everything that
reads it back (the plots, the experiment report, a resumed run's log). The
workdir may be a URL (gs://...; read through etils.epath, see paths.py)."""

from __future__ import annotations

import json
import os

from mtcot_jax.train.paths import run_path

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict]:
  """The records of workdir/metrics.jsonl, in file order. A line that is not a JSON
  object (empty, or cut short by a kill) is skipped. Raises FileNotFoundError when
  the file does not exist."""
  records = []
  with run_path(os.path.join(workdir, METRICS_FILE)).open() as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records
