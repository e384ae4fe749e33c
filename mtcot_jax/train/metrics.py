"""A run's metrics.jsonl: one JSON object a line, appended by `train.loop.MetricsLog`
(training steps, evaluations, the final summary). One reader for everything that
reads it back (the plots, the experiment report, a resumed run's log)."""

from __future__ import annotations

import json
import os

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict]:
  """The records of workdir/metrics.jsonl, in file order. A line that is not a JSON
  object (empty, or cut short by a kill) is skipped. Raises FileNotFoundError when
  the file does not exist."""
  records = []
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records
