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
from detector.errors import DetectorError, InputError

DEFAULT_CONFIG = Path("config.yaml")
DEFAULT_MODEL = Path(__file__).parent / "default_model"  # shipped; `make default-model` rebuilds it


def _config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return load_config(path)


def _schema(config: Config, features: list[str], attrs: list[str]):
    from detector.events import Schema

    return Schema.from_config(config.data, features, attrs)


def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.path)
    resolved = config.model_dump(mode="json")
    print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from detector.artifact import save_artifact
    from detector.train import fit, forecaster_config, infer_features, load_history

    config = _config(args)
    seed = config.train.seed if args.seed is None else args.seed
    if args.synthetic:
        from detector.synthetic import synthetic_history

        history = synthetic_history(args.synthetic_streams, args.synthetic_steps, seed)
        features, attrs = history.features, history.attrs
        sources = [
            f"synthetic general_corpus(streams={args.synthetic_streams}, "
            f"steps={args.synthetic_steps}, seed={seed})"
        ]
    else:
        if not args.input:
            raise InputError("pass --input FILE... (or --synthetic to train on generated data)")
        inputs = [Path(p) for p in args.input]
        sources = [str(p) for p in inputs]
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
    model_config = forecaster_config(config, features, attrs)
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
            "inputs": sources,
            "streams": len(history.streams),
            "events": history.events,
            "invalid": history.invalid,
            "seed": seed,
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
    if args.labelled_files:
        files = data.write_labelled_files(args.output)
        print(f"wrote {len(data.events)} events to {len(files)} files in {args.output}",
              file=sys.stderr)  # fmt: skip
        return 0
    data.write_events(args.output)
    if args.labels:
        data.write_labels(args.labels)
    print(f"wrote {len(data.events)} events to {args.output}", file=sys.stderr)
    return 0


def _model_dir(args: argparse.Namespace, config: Config) -> Path:
    """--model, else the config's model_path, else the shipped default model."""
    path = args.model or config.model_path
    if path is not None:
        return Path(path)
    if not (DEFAULT_MODEL / "manifest.json").is_file():
        raise InputError("no default model shipped yet; pass --model or run make default-model")
    return DEFAULT_MODEL


def cmd_evaluate(args: argparse.Namespace) -> int:
    from detector import evaluate
    from detector.artifact import load_artifact

    config = _config(args)
    artifact = load_artifact(_model_dir(args, config))
    output = args.output or Path("runs") / f"evaluate-{args.mode}"
    if args.mode == "nab":
        report = evaluate.evaluate_nab(
            args.dir, artifact, config, output, profiles=args.profile, threshold=args.threshold,
            plots=not args.no_plots, jobs=args.jobs, batch_size=args.batch_size,
        )  # fmt: skip
    elif args.mode == "csv":
        report = evaluate.evaluate_csv(
            args.dir, artifact, config, sep=args.sep, time_col=args.time_col,
            label_col=args.label_col, ignore_cols=args.ignore_cols or [],
            train_rows=args.train_rows, output_dir=output, threshold=args.threshold,
            plots=not args.no_plots, jobs=args.jobs, batch_size=args.batch_size,
        )  # fmt: skip
    else:
        from detector.synthetic import generate

        kind = args.kind or ("transactions" if artifact.features == ["amount"] else "sensors")
        data = generate(kind, args.streams, args.steps, args.seed)
        report = evaluate.evaluate_synthetic(
            artifact, config, data, output, batch_size=args.batch_size
        )
    print(evaluate.format_report(report))
    seconds = report.get("seconds", {})
    print(f"report: {output / 'report.json'} ({seconds.get('total', seconds)} s)", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from detector.artifact import load_artifact
    from detector.worker import Worker, with_embedded_broker

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import torch

    # Micro-batches are small tensors: extra intra-op threads only spin against the Kafka client.
    torch.set_num_threads(args.torch_threads)
    config = _config(args)
    artifact = load_artifact(_model_dir(args, config))
    with with_embedded_broker(config, args.embedded_broker, args.partitions) as config:
        worker = Worker(config, artifact)
        summary = worker.run(
            max_records=args.max_events, duration=args.duration, idle_exit=args.idle_exit
        )
    print(orjson.dumps(summary.to_dict()).decode(), flush=True)
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
    train.add_argument("--input", nargs="+", help="CSV or JSON-lines files")
    train.add_argument(
        "--synthetic", action="store_true", help="train on the generated general corpus instead"
    )
    train.add_argument("--synthetic-streams", type=int, default=256, help="generated streams")
    train.add_argument("--synthetic-steps", type=int, default=2000, help="steps per stream")
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
    gen.add_argument(
        "--labelled-files",
        action="store_true",
        help="--output is a directory: one CSV per stream (timestamp, features, label), the "
        "layout of `detector evaluate csv`",
    )
    gen.set_defaults(func=cmd_generate)

    evaluate = commands.add_parser("evaluate", help="score labelled data: tables, plots")
    modes = evaluate.add_subparsers(dest="mode", required=True)
    nab_cmd = modes.add_parser("nab", help="a NAB layout: data/<category>/*.csv and labels/")
    csv_cmd = modes.add_parser("csv", help="labelled CSV files, one stream each")
    syn_cmd = modes.add_parser("synthetic", help="generated streams with injected anomalies")
    for sub in (nab_cmd, csv_cmd, syn_cmd):
        with_config(sub)
        sub.add_argument("--model", type=Path, help="artifact (default: the shipped model)")
        sub.add_argument(
            "--output", type=Path, help="report directory (default: runs/evaluate-MODE)"
        )
        sub.add_argument("--batch-size", type=int, help="events per micro-batch (default: config)")
        sub.set_defaults(func=cmd_evaluate)
    for sub in (nab_cmd, csv_cmd):
        sub.add_argument("dir", type=Path, help="the directory to evaluate")
        sub.add_argument("--threshold", type=float, help="fixed threshold (default: see docs)")
        sub.add_argument("--jobs", type=int, default=1, help="processes, files split among them")
        sub.add_argument("--no-plots", action="store_true", help="skip the PNGs and index page")
    nab_cmd.add_argument(
        "--profile", action="append", choices=["standard", "reward_low_FP_rate",
        "reward_low_FN_rate"], help="NAB profile, repeatable (default: all three)",
    )  # fmt: skip
    csv_cmd.add_argument("--sep", default=",", help="field separator")
    csv_cmd.add_argument("--time-col", default="timestamp", help="time column")
    csv_cmd.add_argument("--label-col", default="label", help="0/1 anomaly label column")
    csv_cmd.add_argument("--ignore-cols", nargs="*", help="columns that are not features")
    csv_cmd.add_argument("--train-rows", type=int, default=0, help="normal rows, not scored")
    syn_cmd.add_argument("--kind", choices=["sensors", "transactions"], help="default: by model")
    syn_cmd.add_argument("--streams", type=int, default=50)
    syn_cmd.add_argument("--steps", type=int, default=4000, help="events per stream")
    syn_cmd.add_argument("--seed", type=int, default=1)

    run = with_config(commands.add_parser("run", help="the daemon: consume, score, alert"))
    run.add_argument("--model", type=Path, help="artifact (default: config, else shipped model)")
    run.add_argument(
        "--embedded-broker", action="store_true", help="start a local tansu broker (not for prod)"
    )
    run.add_argument("--partitions", type=int, default=4, help="with --embedded-broker: per topic")
    run.add_argument("--max-events", type=int, help="stop after this many input records")
    run.add_argument(
        "--duration", type=float, help="stop after this many seconds (after the kernels compile)"
    )
    run.add_argument("--idle-exit", type=float, help="stop after this many seconds without input")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--torch-threads", type=int, default=1, help="intra-op threads (default 1)")
    run.set_defaults(func=cmd_run)

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
