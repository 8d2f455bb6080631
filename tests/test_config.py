"""Typed configuration: the shipped files load, and bad keys or values are named."""

from pathlib import Path

import pytest

from esmm.config import ConfigError, load_config

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    config = load_config(path)
    assert config.model.embedding_dim == 18  # the paper's setting everywhere
    assert config.model.tower_dims == [200, 80]
    assert config.train.adam_betas == (0.9, 0.999)


def test_default_config_uses_simulator():
    config = load_config(CONF / "default.yaml")
    assert config.data.source == "simulator"
    assert config.data.simulator.rows > 100_000


def test_override_changes_value_with_type_checking():
    config = load_config(CONF / "default.yaml", ["train.epochs=7", "model.tower_dims=[64, 32]"])
    assert config.train.epochs == 7
    assert config.model.tower_dims == [64, 32]


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "train.epochz" in str(error.value) and str(path) in str(error.value)


def test_bad_value_names_key_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: -0.5\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate.*-0\.5"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model\.kind.*'transformer'"):
        load_config(None, ["model.kind=transformer"])


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/config.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_table_source_requires_fields():
    with pytest.raises(ConfigError, match="data.fields"):
        load_config(None, ["data.source=table", "data.path=x.csv"])
