"""Config loading: presets, inheritance, overrides, and every error names its key."""

import pytest

import mtcot_jax as mt
from mtcot_jax.config import ConfigError, load_config, save_config


def test_defaults_and_override_types():
  cfg = load_config(None, ["head.k=3", "model.rope_theta=500", "head.source_layers=[0,-1]",
                           "decode.temperature=0", "data.task_args={digits: 4}",
                           "train.freeze_main=true"])
  assert cfg.head.k == 3 and isinstance(cfg.model.rope_theta, float)
  assert cfg.head.source_layers == (0, -1)
  assert cfg.data.task_args == (("digits", 4),)
  assert cfg.train.freeze_main is True
  assert cfg.model.d_model == mt.Config().model.d_model  # untouched default
  hash(cfg)  # a static jit argument


def test_preset_inheritance_and_roundtrip(tmp_path):
  (tmp_path / "base.yaml").write_text("model: {num_layers: 3, d_model: 64}\nhead: {k: 2}\n")
  (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel: {num_layers: 1}\n")
  cfg = load_config(str(tmp_path / "child.yaml"), ["head.k=4"])
  assert (cfg.model.num_layers, cfg.model.d_model, cfg.head.k) == (1, 64, 4)
  save_config(cfg, str(tmp_path / "saved.yaml"))
  assert load_config(str(tmp_path / "saved.yaml")) == cfg


def test_repo_presets_load():
  import glob
  import os
  root = os.path.join(os.path.dirname(__file__), "..", "configs")
  paths = glob.glob(os.path.join(root, "*.yaml"))
  assert paths, "no presets in configs/"
  for path in paths:
    load_config(path)


@pytest.mark.parametrize("override,needle", [
    ("model.nope=1", "unknown config key model.nope"),
    ("nosection.k=1", "unknown section 'nosection'"),
    ("head.k=abc", "head.k='abc': expected an int"),
    ("head.k=1.5", "head.k=1.5: expected an int"),
    ("train.freeze_main=3", "expected a bool"),
    ("head.k=-1", "head.k=-1 is not accepted"),
    ("model.num_kv_heads=3", "model.num_kv_heads=3 is not accepted: a divisor of model.num_heads=4"),
    ("head.source_layers=[4]", "layer indices in [-1, 3]"),
    ("head.source_layers=[-2]", "layer indices in [-1, 3]"),
    ("mesh.data=0", "axis sizes >= 1"),
    ("train.grad_accum=3", "dividing train.batch_size=32"),
    ("decode.k=6", "decode.k=6 is not accepted"),
    ("model.dtype=float8", "one of ('float32', 'bfloat16', 'float16')"),
    ("headk=3", "expected section.key=value"),
    ("data.eval_split=dev", "data.eval_split='dev' is not accepted: one of ('validation', 'test')"),
])
def test_errors_name_the_key(override, needle):
  with pytest.raises(ConfigError) as e:
    load_config(None, [override])
  assert needle in str(e.value)


def test_jsonl_has_no_test_split():
  with pytest.raises(ConfigError, match="data.eval_split='test' is not accepted: validation "
                                        "with data.task=jsonl"):
    load_config(None, ["data.task=jsonl", "data.task_args={path: x.jsonl}",
                       "data.eval_split=test"])


def test_file_errors(tmp_path):
  (tmp_path / "bad.yaml").write_text("modle: {num_layers: 1}\n")
  with pytest.raises(ConfigError, match="unknown config section 'modle'"):
    load_config(str(tmp_path / "bad.yaml"))
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(str(tmp_path / "missing.yaml"))
  (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
  with pytest.raises(ConfigError, match="inherits from itself"):
    load_config(str(tmp_path / "loop.yaml"))
