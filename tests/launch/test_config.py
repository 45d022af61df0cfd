import pytest

from launch.config import Config, load_config, validate
from launch.runtime.errors import ConfigError


def test_defaults_yaml_and_cli_precedence(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  dim: 48\n  n_heads: 4\ntrain:\n  steps: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config([f"config={child}", "train.grad_accum=2", "memory.layers=[0,1]"])
    assert isinstance(cfg, Config)
    assert cfg.model.dim == 48  # from the base file
    assert cfg.train.steps == 9  # child overrides base
    assert cfg.train.grad_accum == 2  # command line
    assert cfg.memory.layers == [0, 1]
    assert cfg.optim.lr == Config().optim.lr  # dataclass default


def test_unknown_key_in_file_names_key_file_and_valid_keys(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  dimm: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config([f"config={f}"])
    msg = str(e.value)
    assert "'model.dimm'" in msg and str(f) in msg and "n_layers" in msg and "\n" not in msg


def test_unknown_section_and_cli_key():
    with pytest.raises(
        ConfigError, match="unknown key 'modle' in the command line; valid keys at the top level: run, model"
    ):
        load_config(["modle.dim=3"])


def test_wrong_type_names_key_and_source(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.steps' in the command line"):
        load_config(["train.steps=many"])
    f = tmp_path / "t.yaml"
    f.write_text("data:\n  batch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config([f"config={f}"])


def test_missing_file_and_bad_argument():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config(["config=nope.yaml"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(["train.steps"])


def test_cross_field_validation():
    for args, key in [
        (["train.dtype=fp8"], "train.dtype"),
        (["data.seq_len=512", "model.max_seq_len=256"], "data.seq_len"),
        (["data.batch_size=10", "train.grad_accum=3"], "train.grad_accum"),
        (["parallel.data=zero3"], "parallel.data"),
        (["model.dim=30"], "model.dim"),
    ]:
        with pytest.raises(ConfigError, match=key):
            validate(load_config(args))


def test_shipped_configs_load_and_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = [p for p in root.rglob("*.yaml") if "sweeps" not in p.parts]
    assert files
    for f in files:
        validate(load_config([f"config={f}"]))
