"""`python -m mtcot_jax.experiments run SPEC.yaml [--out DIR] [--seeds N] [--only PATTERN]
[--split validation|test]` trains and evaluates a grid of tasks x methods x seeds
(one line per cell, an estimate of the time left), then writes the report;
`python -m mtcot_jax.experiments report DIR` rewrites DIR/report.md and its plots;
`python -m mtcot_jax.experiments budget RUN... --budgets B...` measures accuracy
against a CoT pass budget (experiments/budget.py).

  python -m mtcot_jax.experiments run configs/experiments/smoke.yaml --out runs/smoke
  python -m mtcot_jax.experiments run configs/experiments/paper.yaml --only 'mult3/*'
  python -m mtcot_jax.experiments run configs/experiments/paper.yaml --split test   # final table
  python -m mtcot_jax.experiments report runs/experiments/paper

Re-running `run` skips finished cells and resumes interrupted training runs.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m mtcot_jax.experiments", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  r = sub.add_parser("run", help="train and evaluate a spec's grid, then report")
  r.add_argument("spec", help="an experiment spec (configs/experiments/*.yaml)")
  r.add_argument("--out", default=None,
                 help="output directory (default: runs/experiments/<spec name>)")
  r.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 instead of the spec's")
  r.add_argument("--only", default=None,
                 help="a glob on cell ids <task>/<method>/seed<i>, e.g. 'mult3/*'")
  r.add_argument("--split", choices=("validation", "test"), default=None,
                 help="the held-out split to evaluate on (default: the spec's `split`, "
                 "validation); test once, for a final table: training runs are reused")
  r.add_argument("--no-report", action="store_true", help="do not write the report")
  rep = sub.add_parser("report", help="write DIR/report.md and DIR/plots/*.png")
  rep.add_argument("dir")
  b = sub.add_parser("budget", help="accuracy against a CoT pass budget (experiments/budget.py)")
  b.add_argument("runs", nargs="+", help="trained workdirs (e.g. one per seed)")
  b.add_argument("--budgets", nargs="+", type=int, default=[2, 3, 4, 6, 0],
                 help="pass budgets B (0: none; default 2 3 4 6 0)")
  b.add_argument("--examples", type=int, default=256, help="held-out problems per run")
  b.add_argument("--tau", type=float, default=None,
                 help="the unverified rows' adaptive threshold (default: the run's)")
  b.add_argument("--split", choices=("validation", "test"), default=None,
                 help="default: the run's data.eval_split (validation)")
  b.add_argument("--temperature", type=float, default=0.0,
                 help="sample at this temperature (default 0: greedy)")
  b.add_argument("--out", default="runs/budget")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)   # tfds/orbax info lines drown the output
  from mtcot_jax.config import ConfigError
  from mtcot_jax.experiments import report
  if args.command == "budget":
    from mtcot_jax.experiments import budget
    try:
      print(budget.main(args.runs, args.budgets, examples=args.examples, tau=args.tau,
                        out=args.out, split=args.split, temperature=args.temperature))
    except (ValueError, FileNotFoundError) as e:
      sys.exit(f"error: {e}")
    return
  if args.command == "report":
    if not os.path.exists(os.path.join(args.dir, "results.jsonl")):
      sys.exit(f"error: {args.dir} has no results.jsonl; accepted: a directory written by "
               "`python -m mtcot_jax.experiments run`")
    print(report.write_report(args.dir))
    return
  from mtcot_jax.experiments import runner
  if args.seeds is not None and args.seeds < 1:
    sys.exit(f"error: --seeds={args.seeds}; accepted: an int >= 1")
  from mtcot_jax.train import preemption
  try:
    stats = runner.run(args.spec, args.out, seeds=args.seeds, only=args.only,
                       split=args.split)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  except preemption.Preempted as e:   # SIGTERM: running the same command resumes
    print(f"preempted: {e}; run the same command to resume", file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)
  out = args.out or os.path.join("runs", "experiments",
                                 os.path.splitext(os.path.basename(args.spec))[0])
  print(f"{stats['cells']} cells: {stats['skipped']} already done, {stats['evaluated']} "
        f"evaluated, {stats['trained']} training runs")
  if not args.no_report:
    print(report.write_report(out))


if __name__ == "__main__":
  main()
