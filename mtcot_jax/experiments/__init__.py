"""Experiments: a grid of tasks x methods x seeds, trained, evaluated on held-out
problems and reported. `python -m mtcot_jax.experiments run SPEC.yaml --out DIR`,
then `python -m mtcot_jax.experiments report DIR` (see docs/experiments.md)."""

from mtcot_jax.experiments.runner import collect, run
from mtcot_jax.experiments.spec import Spec, cells, load_spec

__all__ = ["Spec", "cells", "collect", "load_spec", "run"]
