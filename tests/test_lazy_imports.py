"""`import mtcot_jax` and the model, decoding and the training step run with the
data stack uninstalled: tensorflow(-datasets), grain, sentencepiece, gguf,
transformers and tokenizers import only where a data function is first used
(the GPU machine's benchmark, benchmarks/gpu.sh, runs with none of them)."""

import json
import os
import subprocess
import sys

from conftest import DATA_STACK, TINY, blocked_imports, subprocess_env

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# Runs in a child whose PYTHONPATH shadows the data stack with modules that raise
# on import: any import of one, at module level or in a function the model, a
# decode or a training step calls, fails the child.
PROGRAM = f"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import mtcot_jax as mt
from mtcot_jax import decode, model
from mtcot_jax.train import losses, optim, step

cfg = mt.load_config(None, {TINY!r})
params = mt.init_params(cfg, jax.random.key(0))
tokens = np.array([[1, 7, 9, 4, 11, 12, 5, 13]], np.int32)
out = mt.forward(cfg, params, tokens)
res = mt.generate(cfg, params, tokens[:, :4], np.array([4]), jax.random.key(1), k=2,
                  max_cot_tokens=3, max_answer_tokens=2)
opt = optim.make_optimizer(cfg)
state = step.create_state(cfg, opt, None)
B, T = 8, 8
batch = {{"inputs": np.tile(tokens, (B, 1)), "targets": np.roll(np.tile(tokens, (B, 1)), -1, 1),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
          "segment_ids": np.ones((B, T), np.int32),
          "cot_mask": np.ones((B, T), np.float32), "answer_mask": np.zeros((B, T), np.float32)}}
state, metrics = losses.make_sft_step(cfg, None, opt)(state, jax.tree.map(jnp.asarray, batch))
try:                      # the block is in force: the data stack's first use fails
  mt.get_task("mult", digits=1)
  blocked = False
except ImportError:
  blocked = True
print(json.dumps({{
    "logits": list(out.logits.shape), "passes": int(res.forward_passes[0]),
    "loss": float(metrics["loss"]), "blocked": blocked,
    "data_stack": sorted({{m.split(".")[0] for m in sys.modules}} & set({DATA_STACK!r}))}}))
"""


def _run(program: str, pythonpath: list[str]) -> dict:
  env = subprocess_env(PYTHONPATH=os.pathsep.join(pythonpath + [os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_model_decode_and_train_step_run_without_the_data_stack(tmp_path):
  got = _run(PROGRAM, [blocked_imports(tmp_path / "blocked"), ROOT])
  assert got["blocked"], "the import block did not hold: the test proves nothing"
  assert got["logits"] == [1, 8, 64] and got["passes"] >= 1
  assert got["loss"] == got["loss"] and got["loss"] > 0      # finite, a real step
  assert got["data_stack"] == []


def test_import_mtcot_jax_reads_no_data_stack_and_its_names_still_work():
  program = ("import json, sys\nimport mtcot_jax as mt\n"
             f"before = sorted({{m.split('.')[0] for m in sys.modules}} & set({DATA_STACK!r}))\n"
             "task = mt.get_task('mult', digits=1)\n"
             "names = [f.__module__ for f in (mt.encode_prompt, mt.load_tokenizer, mt.load_run)]\n"
             "print(json.dumps({'before': before, 'task': task.name, 'names': names,\n"
             "                  'data': mt.data.__name__}))\n")
  got = _run(program, [ROOT])
  assert got["before"] == []
  assert got["task"] == "mult" and got["data"] == "mtcot_jax.data"
  assert got["names"] == ["mtcot_jax.data.tokenizer", "mtcot_jax.data.tokenizer",
                          "mtcot_jax.train.checkpoint"]
