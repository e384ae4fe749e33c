"""Bad input gets one clear sentence (the file, the value, what is accepted), before
any compile, and loses nothing: broken checkpoints, nonsense configs, a foreign
tokenizer, prompts the tokenizer cannot write, bad prompts files, init_from runs
that are not SFT runs, two runs on one workdir."""

import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax.cli import decode as decode_cli
from mtcot_jax.cli import train as train_cli
from mtcot_jax.config import ConfigError
from mtcot_jax.train import checkpoint as ckpt
from mtcot_jax.train import loop
from test_train import _cfg

STEPS = ["train.steps=4", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4."""
  tmp = tmp_path_factory.mktemp("bad")
  cfg = _cfg(tmp, *STEPS)
  loop.train(cfg, progress=False)
  return cfg


def _copy(cfg, dst):
  shutil.copytree(cfg.train.workdir, dst, symlinks=True)
  return str(dst)


def _cli_error(main, argv, capsys) -> str:
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "Traceback" not in err, err
  return err


def test_decode_missing_run(capsys):
  err = _cli_error(decode_cli.main, ["--checkpoint", "runs/nonexist", "--prompt", "1*2"], capsys)
  assert "runs/nonexist is not a run directory: no config.yaml" in err


def test_config_edited_into_nonsense(run, tmp_path, capsys):
  work = _copy(run, tmp_path / "w")
  path = os.path.join(work, "config.yaml")
  with open(path, "a") as f:
    f.write("model: [1, 2\n")
  err = _cli_error(decode_cli.main, ["--checkpoint", work, "--prompt", "12*34"], capsys)
  assert f"config file {path} is not valid YAML at line" in err
  with open(path, "w") as f:
    f.write("model: {num_layers: -3}\n")
  err = _cli_error(decode_cli.main, ["--checkpoint", work, "--prompt", "12*34"], capsys)
  assert "model.num_layers" in err and "-3" in err


def test_foreign_tokenizer(run, tmp_path):
  work = _copy(run, tmp_path / "w")
  other = mt.data.train_tokenizer(["abc def", "xyz"], str(tmp_path / "other.model"), 32)
  shutil.copyfile(other.path, os.path.join(work, "tokenizer.model"))
  with pytest.raises(ValueError, match="is not the tokenizer this run was trained with"):
    mt.load_run(work)
  with open(os.path.join(work, "tokenizer.model"), "wb") as f:
    f.write(b"not a model")
  with pytest.raises(ValueError, match="is not a sentencepiece model"):
    mt.load_run(work)


def test_prompts_the_run_cannot_read(run, tmp_path, capsys):
  work = run.train.workdir
  err = _cli_error(decode_cli.main, ["--checkpoint", work, "--prompt", "12×34"], capsys)
  assert "has characters the tokenizer" in err and "['×']" in err
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  err = _cli_error(decode_cli.main, ["--checkpoint", work, "--prompts-file", str(empty)], capsys)
  assert "holds no question" in err
  big = tmp_path / "big.txt"
  big.write_text("12*34\n" + "1" * 200 + "*2\n")
  err = _cli_error(decode_cli.main, ["--checkpoint", work, "--prompts-file", str(big)], capsys)
  assert "question 2 is" in err and "data.seq_len=32" in err


def test_decode_prints_the_reference(run, capsys):
  decode_cli.main(["--checkpoint", run.train.workdir, "--prompt", "21*43", "--prompt", "20*43",
                   "--k", "0", "--batch-size", "1"])
  out = capsys.readouterr().out
  assert "reference: '408'" in out and "reference: '68'" in out     # 12 x 34, 2 x 34
  assert out.count("note: outside the training distribution") == 1   # the leading zero


def test_checkpoint_takes_only_decode_overrides(run, capsys):
  work = run.train.workdir
  err = _cli_error(decode_cli.main, ["--checkpoint", work, "--prompt", "12*34",
                                     "decode.k=0", "model.num_layers=3"], capsys)
  assert "'model.num_layers=3': model.num_layers is the run's own" in err
  assert "decode.* overrides only" in err
  err = _cli_error(decode_cli.main, ["--checkpoint", work, "--prompt", "12*34",
                                     "decode.max_cot=3"], capsys)
  assert "unknown config key decode.max_cot" in err


def test_decode_output_with_decode_overrides(run, tmp_path, capsys):
  """--output: a JSON line per question; decode.* overrides reach generate (k=0: one
  token a pass; the token limits), and a question with no reference has correct null."""
  path = tmp_path / "new" / "out.jsonl"
  decode_cli.main(["--checkpoint", run.train.workdir, "--prompt", "21*43", "--prompt", "2143",
                   "--output", str(path), "decode.k=0", "decode.max_cot_tokens=3",
                   "decode.max_answer_tokens=2"])
  out = capsys.readouterr().out
  assert "k=0 verify=none:" in out and f"wrote 2 lines to {path}" in out
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["question"] for r in rows] == ["21*43", "2143"]
  tok = mt.load_tokenizer(os.path.join(run.train.workdir, "tokenizer.model"))
  for r in rows:
    assert set(r) == {"question", "cot", "answer", "tokens", "passes", "correct"}
    assert 1 <= len(r["tokens"]) <= 3 + 1 + 2          # a CoT cut at 3 gets its </think>
    assert r["passes"] == len(r["tokens"])             # k=0: the prefill writes the first
    ids = r["tokens"]
    n_cot = ids.index(tok.think_end_id) + 1 if tok.think_end_id in ids else len(ids)
    assert n_cot <= 3 + 1 and r["cot"] == tok.decode(ids[:n_cot])
  assert rows[0]["correct"] in (True, False) and rows[1]["correct"] is None
  assert rows[0]["correct"] == (rows[0]["answer"].strip() == "408")


def test_init_from_must_be_an_sft_run(run, tmp_path, capsys):
  base = os.path.join(os.path.dirname(__file__), "..", "configs", "base.yaml")
  err = _cli_error(train_cli.main, ["--config", base, "train.stage=rl",
                                    f"train.init_from={tmp_path}/none",
                                    f"train.workdir={tmp_path}/rl"], capsys)
  assert "is not a run directory" in err
  rl_like = _copy(run, tmp_path / "rl_like")
  cfg = mt.load_config(os.path.join(rl_like, "config.yaml"), ["train.stage=rl"])
  mt.save_config(cfg, os.path.join(rl_like, "config.yaml"))
  with pytest.raises(ConfigError, match="is an RL run"):
    loop.train(_cfg(tmp_path, f"train.init_from={rl_like}"), progress=False)


def test_second_run_on_a_workdir_is_refused(run, tmp_path):
  cfg = _cfg(tmp_path, *STEPS)
  with ckpt.workdir_lock(cfg.train.workdir):
    with pytest.raises(ckpt.RunLockedError, match=rf"in use by another run \(process "
                       rf"{os.getpid()}, which holds .*\.lock\)"):
      loop.train(cfg, progress=False)
  assert not os.path.exists(os.path.join(cfg.train.workdir, "checkpoints"))


def test_broken_latest_checkpoint(run, tmp_path):
  """A checkpoint whose files were deleted after orbax committed it: decoding
  restores the one before it, with a warning naming it; training resumes from
  that one, moves the broken one aside (kept) and ends where the intact run did."""
  work = _copy(run, tmp_path / "w")
  shutil.rmtree(os.path.join(work, "checkpoints", "4", "params"))
  with pytest.warns(UserWarning, match="step 4: .*restored step 2"):
    assert mt.load_run(work).step == 2
  cfg = run.replace(train={"workdir": work})
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    loop.train(cfg, progress=False)
  assert os.listdir(os.path.join(work, "broken_checkpoints"))
  a, b = mt.load_run(run.train.workdir), mt.load_run(work)
  assert b.step == 4
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  for name in ("4", "2"):                  # every checkpoint broken: the error names each
    shutil.rmtree(os.path.join(work, "checkpoints", name, "params"), ignore_errors=True)
  with pytest.raises(ValueError, match=r"no checkpoint in .* can be read \(step 4: .*step 2: "):
    mt.load_run(work)
