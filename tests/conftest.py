"""Shared tiny configs and parameters: few distinct shapes, so few compiles."""

import os

# The tests compile XLA's CPU code at LLVM -O0 (unless XLA_FLAGS already sets the
# level): compiling, not running, is what the tests' tiny models spend their time
# on, and -O0 compiles in about 60% of the time. XLA's own graph passes (fusion,
# layouts, simplification) run as always; only LLVM's optimisation of the machine
# code is skipped, which may round float32 results differently from -O2 (the
# two-process run's first loss moves by 5e-7, ~1 ulp), within the rounding every
# tolerance here allows.
# Subprocesses get it too (subprocess_env). To run the tests on the default code
# generation: XLA_FLAGS=--xla_backend_optimization_level=2 make test.
OPT_LEVEL_FLAG = "--xla_backend_optimization_level"
if OPT_LEVEL_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPT_LEVEL_FLAG}=0".strip()
OPT_LEVEL = next(f for f in os.environ["XLA_FLAGS"].split() if f.startswith(OPT_LEVEL_FLAG))

import jax  # noqa: E402
import pytest  # noqa: E402

import mtcot_jax as mt  # noqa: E402

TINY = [
    "model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "model.mlp_dim=64",
    "head.k=5", "head.width=16", "head.num_heads=2", "head.mlp_dim=32",
    "head.source_layers=[0,-1]",
    "train.batch_size=8",
]


@pytest.fixture(scope="session")
def tiny_cfg():
  return mt.load_config(None, TINY)


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
  return mt.init_params(tiny_cfg, jax.random.key(0))


CACHE_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))


def pytest_configure(config):
  # Compiles dominate test time on a CPU: share them across the runs in this
  # session (train() builds a new jitted step per call) and across sessions
  # through XLA's persistent cache. Every compile is kept, the one-primitive
  # programs of eager code included (most take well under a second each, but
  # there are hundreds): a cached one loads in a millisecond or two.
  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def subprocess_env(base=None, xla_flags: str = "", **extra) -> dict:
  """The environment `base` (default os.environ) for a child Python process that
  runs JAX, with the tests' persistent compile cache and its settings (a child
  reads them from the environment, not from this process's jax.config), the
  tests' code generation (OPT_LEVEL) unless base's XLA_FLAGS sets one,
  `xla_flags` after those, and the variables in `extra`."""
  env = {**(os.environ if base is None else base), "JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}
  flags = env.get("XLA_FLAGS", "")
  if OPT_LEVEL_FLAG not in flags:
    flags = f"{flags} {OPT_LEVEL}"
  env["XLA_FLAGS"] = f"{flags} {xla_flags}".strip()
  return env


def adam_param_bound(cfg, steps: int) -> float:
  """The most one element of two AdamW runs can differ after `steps` steps from
  equal parameters when their gradients differ only by float32 rounding (a
  reduction in another order). Step t moves an element by lr_t * |m_hat / sqrt(v_hat)|
  <= lr_t * c_t, where c_t = sqrt(sum_s w_s^2 / u_s) by Cauchy-Schwarz over Adam's
  bias-corrected averages (weights w_s of m, u_s of v; c_1 = 1, ~1.0003 at t=2):
  where a gradient sits at the noise floor the two runs may move it in opposite
  directions, so the bound is twice the sum. Elsewhere they agree to rounding."""
  from mtcot_jax.train import optim
  b1, b2 = cfg.train.b1, cfg.train.b2
  total = 0.0
  for t in range(1, steps + 1):
    w = [(1 - b1) * b1 ** (t - s) / (1 - b1 ** t) for s in range(1, t + 1)]
    u = [(1 - b2) * b2 ** (t - s) / (1 - b2 ** t) for s in range(1, t + 1)]
    c = sum(wi * wi / ui for wi, ui in zip(w, u)) ** 0.5
    total += float(optim.schedule(cfg)(t - 1)) * c
  return 2 * total


def assert_adam_params_close(got, want, cfg, steps: int) -> None:
  """Every element within `adam_param_bound`; the median element within 1e-6 (a
  lost or doubled update would move typical elements by ~lr, 1e3 x more; the
  rounding of lr-sized updates is ~1e-9)."""
  import jax
  import numpy as np
  bound = adam_param_bound(cfg, steps)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got),
                               jax.tree_util.tree_leaves_with_path(want)):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    name = jax.tree_util.keystr(path)
    assert diff.max() <= bound, (name, float(diff.max()), bound)
    assert np.median(diff) <= 1e-6, (name, float(np.median(diff)))


# Python packages the model, decoding and the training step must run without (the
# GPU machine has none of the data stack): `blocked_imports` makes importing them fail.
DATA_STACK = ("tensorflow", "tensorflow_datasets", "grain", "sentencepiece", "gguf",
              "transformers", "tokenizers")


def blocked_imports(directory, names=DATA_STACK) -> str:
  """Writes, in `directory`, a module for each of `names` whose import raises
  ImportError, and returns the directory: put first on a child's PYTHONPATH, it
  shadows the installed packages, so that a child that imports one fails as it
  would where the package is not installed."""
  os.makedirs(directory, exist_ok=True)
  for name in names:
    with open(os.path.join(directory, f"{name}.py"), "w") as f:
      f.write(f"raise ImportError('{name} is blocked by the test (tests/conftest.py)')\n")
  return str(directory)
