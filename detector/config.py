"""The configuration: `config.yaml` validated by frozen pydantic models.

Every field has a default, so an empty file is a valid configuration. Environment variables
override any field: `DETECTOR__KAFKA__BOOTSTRAP_SERVERS=broker:9092` sets
`kafka.bootstrap_servers`; values are parsed as YAML, so `DETECTOR__TRAIN__EPOCHS=5` is an int
and `DETECTOR__KAFKA__TOPICS='[a, b]'` a list.

>>> config = load_config(None, environ={"DETECTOR__TRAIN__EPOCHS": "5",
...                                      "DETECTOR__KAFKA__BOOTSTRAP_SERVERS": "k1:9092,k2:9092"})
>>> config.train.epochs, config.model.cell, config.kafka.bootstrap_servers
(5, 'gru', ['k1:9092', 'k2:9092'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from detector.errors import ConfigError

ENV_PREFIX = "DETECTOR__"


def _split_commas(value: Any) -> Any:
    """ "a:1,b:2" -> ["a:1", "b:2"], as operators write server and topic lists in env vars."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


NameList = Annotated[list[str], BeforeValidator(_split_commas)]


class Section(BaseModel):
    """Base of every section: frozen, and unknown keys are errors rather than silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid", revalidate_instances="always")


class DataConfig(Section):
    """Where the fields of an event are, in files and in Kafka records."""

    stream_field: str = "stream"
    time_field: str = "ts"
    features: list[str] = Field(
        default_factory=list,
        description="numeric features, in order; empty = every numeric column (training only)",
    )
    attrs: list[str] = Field(
        default_factory=list, description="categorical fields, embedded through hashing"
    )
    fill: dict[str, float] = Field(
        default_factory=dict, description="feature -> value used when an event lacks it"
    )
    max_record_bytes: int = Field(default=65536, gt=0)


class ModelConfig(Section):
    cell: Literal["gru", "lstm", "rnn"] = "gru"
    hidden_size: int = Field(default=64, gt=0, le=4096)
    num_layers: int = Field(default=1, ge=1, le=8)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    attr_buckets: int = Field(default=1024, gt=0, description="hash buckets per categorical field")
    attr_dim: int = Field(default=8, gt=0, description="embedding size per categorical field")
    log_features: list[str] = Field(
        default_factory=list,
        description="features forecast on a signed log scale (heavy-tailed: amounts, counts)",
    )


class TrainConfig(Section):
    epochs: int = Field(default=20, gt=0)
    window: int = Field(default=64, gt=1, description="truncated BPTT length, in steps")
    batch_streams: int = Field(default=32, gt=0, description="streams per training batch")
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    patience: int = Field(default=3, ge=1, description="epochs without validation gain before stop")
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0


class EngineConfig(Section):
    initial_capacity: int = Field(default=1024, gt=0)
    max_streams: int = Field(default=1_000_000, gt=0)
    stream_ttl_seconds: float = Field(
        default=7 * 86400.0,
        gt=0,
        description="a stream idle this long (event time) may be evicted when max_streams is full",
    )
    batch_size: int = Field(default=4096, gt=0, description="events per micro-batch")


class ScoringConfig(Section):
    warmup_events: int = Field(default=30, ge=1, description="events per stream before scoring")
    threshold: float = Field(default=0.9999, gt=0, lt=1, description="alert when score >= this")
    cooldown_seconds: float = Field(default=0.0, ge=0, description="quiet time after an alert")
    windows: list[Annotated[float, Field(ge=1)]] = Field(
        default_factory=lambda: [1.0, 4.0],
        min_length=1,
        description="horizons (events) over which recent errors are averaged and judged",
    )
    long_window: float = Field(
        default=1000.0, ge=10, description="events that define a stream's normal error"
    )
    novelty_window: float = Field(
        default=200.0,
        ge=1,
        description="an event scores (and alerts) only if more surprising than any in this many "
        "events before it",
    )
    norm_window: float = Field(
        default=2000.0, ge=10, description="events that define a stream's normal value range"
    )


class KafkaConfig(Section):
    """Client settings keep kafka-python's spelling."""

    bootstrap_servers: NameList = Field(default_factory=lambda: ["127.0.0.1:9092"])
    topics: NameList = Field(default_factory=lambda: ["events"])
    alerts_topic: str = "alerts"
    dead_letter_topic: str = "events-dead-letter"
    group_id: str = "detector"
    client_id: str = "detector"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    session_timeout_ms: int = Field(default=10000, gt=0)
    heartbeat_interval_ms: int = Field(default=3000, gt=0)
    max_wait_ms: int = Field(
        default=100, ge=0, description="longest a poll waits for a first record (never to fill)"
    )
    consumer: Literal["kafka-python", "librdkafka"] = Field(
        default="kafka-python",
        description="consumer client; librdkafka (the `fast` extra) fetches outside the GIL",
    )


class MetricsConfig(Section):
    host: str = "0.0.0.0"
    port: int = Field(default=9108, ge=0, le=65535)


class CheckpointConfig(Section):
    dir: Path = Path("state")
    interval_seconds: float = Field(default=60.0, gt=0)


class Config(Section):
    model_path: Path | None = Field(
        default=None, description="model artifact directory; empty = the shipped default model"
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    engine: EngineConfig = EngineConfig()
    scoring: ScoringConfig = ScoringConfig()
    kafka: KafkaConfig = KafkaConfig()
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _features_are_distinct(self) -> Config:
        for name in ("features", "attrs"):
            values = getattr(self.data, name)
            if len(set(values)) != len(values):
                raise ValueError(f"data.{name} lists a name twice: {values}")
        return self


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested dict of the DETECTOR__SECTION__FIELD variables, values parsed as YAML."""
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        try:
            node[path[-1]] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            node[path[-1]] = raw
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling (see config.yaml)"
        lines.append(f"  {where}: {message} (got {item.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge with the environment's overrides and validate; raises ConfigError."""
    raw: Any = {}
    if path is not None:
        source = Path(path)
        try:
            raw = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config: {exc.strerror}") from exc
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    merged = _merge(raw, _env_overrides(os.environ if environ is None else environ))
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        origin = str(path) if path is not None else "config"
        raise ConfigError(
            f"{origin}: {exc.error_count()} invalid field(s)\n{_describe(exc)}"
        ) from exc
