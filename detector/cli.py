"""The `detector` command: config check | train | score | generate | demo.

Every expected failure (bad config, bad input file, bad model artifact) prints one clear line
to stderr and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import yaml

from detector import __version__
from detector.config import Config, load_config
from detector.errors import DetectorError

DEFAULT_CONFIG = Path("config.yaml")


def _config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return load_config(path)


def _schema(config: Config, features: list[str], attrs: list[str]):
    from detector.events import Schema

    data = config.data
    return Schema(
        features=tuple(features),
        attrs=tuple(attrs),
        fill=dict(data.fill),
        stream_field=data.stream_field,
        time_field=data.time_field,
        max_record_bytes=data.max_record_bytes,
    )


def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.path)
    resolved = config.model_dump(mode="json")
    print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from detector.artifact import save_artifact
    from detector.model import ForecasterConfig
    from detector.train import fit, infer_features, load_history

    config = _config(args)
    inputs = [Path(p) for p in args.input]
    features = args.features.split(",") if args.features else list(config.data.features)
    if not features:
        features = infer_features(inputs[0], _schema(config, [], list(config.data.attrs)))
    attrs = list(config.data.attrs)
    schema = _schema(config, features, attrs)
    history = load_history(inputs, schema, config.model.attr_buckets)
    print(
        f"read {history.events} events of {len(history.streams)} streams "
        f"({history.invalid} invalid rows skipped); features: {', '.join(features)}",
        file=sys.stderr,
    )
    m = config.model
    model_config = ForecasterConfig(
        n_features=len(features),
        cell=m.cell,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        dropout=m.dropout,
        n_attrs=len(attrs),
        attr_buckets=m.attr_buckets,
        attr_dim=m.attr_dim,
    )
    result = fit(history, model_config, config, epochs=args.epochs, seed=args.seed)
    version = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%S")
    path = save_artifact(
        args.output,
        result.model,
        features=features,
        attrs=attrs,
        calibration=result.calibration,
        version=version,
        training={
            "inputs": [str(p) for p in inputs],
            "streams": len(history.streams),
            "events": history.events,
            "invalid": history.invalid,
            "seed": config.train.seed if args.seed is None else args.seed,
            "config": config.train.model_dump(mode="json"),
        },
        metrics=result.metrics,
    )
    print(f"wrote {path} (val_nll {result.metrics['val_nll']:.4f})", file=sys.stderr)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from detector.artifact import load_artifact
    from detector.engine import Engine
    from detector.replay import score_file
    from detector.sources import FileSource

    config = _config(args)
    artifact = load_artifact(args.model)
    schema = _schema(config, artifact.features, artifact.attrs)
    batch_size = args.batch_size or config.engine.batch_size
    source = FileSource(args.input, schema, batch_size=batch_size)
    engine = Engine.from_config(artifact.model, config, artifact.calibration)
    output = Path(args.output)
    errors = Path(args.errors) if args.errors else output.with_name(output.stem + ".errors.jsonl")
    summary = score_file(
        source, engine, artifact.features, output, errors, artifact.model.config.attr_buckets
    )
    if summary.events == 0:
        print(f"{args.input}: no events in the file", file=sys.stderr)
    print(
        f"scored {summary.scored}, warm-up {summary.warmup}, invalid {summary.invalid} "
        f"(of {summary.events} records; invalid rows in {errors}); {summary.alerts} alerts",
        file=sys.stderr,
    )
    print(orjson.dumps(summary.to_dict()).decode())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from detector.synthetic import generate

    data = generate(args.kind, args.streams, args.steps, args.seed, not args.no_anomalies)
    data.write_events(args.output)
    if args.labels:
        data.write_labels(args.labels)
    print(f"wrote {len(data.events)} events to {args.output}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from detector.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detector", description="Streaming anomaly detection with a per-stream GRU."
    )
    parser.add_argument("--version", action="version", version=f"detector {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--config", type=Path, help="config.yaml (default: ./config.yaml if present)"
        )
        return sub

    config_cmd = commands.add_parser("config", help="inspect the configuration")
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate and print the resolved config")
    check.add_argument("path", nargs="?", type=Path, help="config file (default: built-ins)")
    check.set_defaults(func=cmd_config_check)

    train = with_config(commands.add_parser("train", help="train a model from history files"))
    train.add_argument("--input", nargs="+", required=True, help="CSV or JSON-lines files")
    train.add_argument("--output", required=True, type=Path, help="artifact directory to write")
    train.add_argument("--features", help="comma-separated feature names (default: config)")
    train.add_argument("--epochs", type=int, help="maximum epochs (default: config)")
    train.add_argument("--seed", type=int, help="random seed (default: config)")
    train.set_defaults(func=cmd_train)

    score = with_config(commands.add_parser("score", help="replay a file through the engine"))
    score.add_argument("--model", required=True, type=Path, help="model artifact directory")
    score.add_argument("--input", required=True, type=Path, help="CSV or JSON-lines events")
    score.add_argument("--output", required=True, type=Path, help=".csv or .jsonl scores")
    score.add_argument("--errors", type=Path, help="invalid rows (default: OUTPUT.errors.jsonl)")
    score.add_argument("--batch-size", type=int, help="events per micro-batch (default: config)")
    score.set_defaults(func=cmd_score)

    gen = commands.add_parser("generate", help="write synthetic streams with labelled anomalies")
    gen.add_argument("--kind", default="sensors", choices=["sensors", "transactions", "general"])
    gen.add_argument("--streams", type=int, default=100)
    gen.add_argument("--steps", type=int, default=2000, help="events per stream")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-anomalies", action="store_true", help="normal data only")
    gen.add_argument("--output", required=True, type=Path, help=".csv or .jsonl")
    gen.add_argument("--labels", type=Path, help="CSV of per-event anomaly labels")
    gen.set_defaults(func=cmd_generate)

    demo = with_config(commands.add_parser("demo", help="everything on one machine"))
    demo.add_argument("--duration", type=float, default=60.0, help="seconds of live streams")
    demo.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DetectorError as exc:
        print(f"detector {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
