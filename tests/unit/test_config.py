"""load_config: defaults, environment overrides, and errors that name the bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.config import Config, load_config
from detector.errors import ConfigError, DetectorError


def test_defaults_load_without_a_file() -> None:
    config = load_config(None, environ={})
    assert config == Config()
    assert config.kafka.bootstrap_servers == ["127.0.0.1:9092"]
    assert config.model.cell == "gru"
    assert config.metrics.port == 9108


def test_an_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("")
    assert load_config(path, environ={}) == Config()


def test_config_is_frozen() -> None:
    config = load_config(None, environ={})
    with pytest.raises(ValueError):
        config.train.epochs = 3  # type: ignore[misc]


def test_env_overrides_a_list() -> None:
    config = load_config(None, environ={"DETECTOR__KAFKA__BOOTSTRAP_SERVERS": "[a:1, b:2]"})
    assert config.kafka.bootstrap_servers == ["a:1", "b:2"]


def test_env_overrides_a_scalar_and_beats_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.01\nkafka:\n  group_id: from-file\n")
    config = load_config(
        path,
        environ={
            "DETECTOR__TRAIN__EPOCHS": "5",
            "DETECTOR__KAFKA__GROUP_ID": "from-env",
            "UNRELATED": "ignored",
        },
    )
    assert config.train.epochs == 5
    assert config.train.lr == 0.01  # siblings from the file survive the merge
    assert config.kafka.group_id == "from-env"


def test_unknown_key_names_its_dotted_path(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("kafka:\n  bootstrap_server: [a:1]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert "kafka.bootstrap_server" in message
    assert "unknown key" in message
    assert str(path) in message


def test_unknown_env_key_names_its_dotted_path() -> None:
    with pytest.raises(ConfigError, match=r"scoring\.treshold"):
        load_config(None, environ={"DETECTOR__SCORING__TRESHOLD": "0.9"})


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert "train.epochs" in str(caught.value)
    assert "'many'" in str(caught.value)


def test_out_of_range_and_bad_literal_name_their_fields() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            None, environ={"DETECTOR__METRICS__PORT": "70000", "DETECTOR__MODEL__CELL": "tcn"}
        )
    message = str(caught.value)
    assert "2 invalid field(s)" in message
    assert "metrics.port" in message
    assert "model.cell" in message


def test_invalid_yaml_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("kafka: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, environ={})


def test_a_top_level_that_is_not_a_mapping_raises(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path, environ={})


def test_missing_file_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config") as caught:
        load_config(path, environ={})
    assert isinstance(caught.value, DetectorError)
    assert str(path) in str(caught.value)
