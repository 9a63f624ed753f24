"""`detector demo`: the whole pipeline on one machine, bounded in time.

1. Start the embedded tansu broker and create the topics.
2. Train two small models on generated *normal* history, with a progress bar: one for sensor
   streams (4 features), one for card transactions (amount + category and channel).
3. Start one `detector run` worker per model (subprocesses, each with its own /metrics port).
4. Produce generated sensor and transaction streams with injected anomalies at a steady rate, as
   if live: event times are the wall clock, the generated time compressed to the run's length,
   and the stream id is the message key.
5. Print each alert from the alerts topic as it arrives: stream, time, score, the feature that
   drove it, expected vs observed.
6. After `--duration` seconds (Ctrl-C stops earlier, cleanly) print a summary: events, alerts,
   precision and recall per injected anomaly episode (caught or missed; an alert outside every
   episode is a false alarm), throughput. The last line is the same summary as JSON.

`history_from_dataset` and `train_artifact` are also what the integration tests train with.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from detector.artifact import load_artifact, save_artifact
from detector.config import Config, load_config
from detector.events import hash_attr, parse_timestamp
from detector.synthetic import Dataset, sensor_streams, transaction_streams


def history_from_dataset(data: Dataset, attr_buckets: int = 1024):
    """A generated data set as training history: per stream, time-ordered arrays."""
    from detector.train import History, StreamHistory

    rows: dict[str, list[int]] = {}
    for i, event in enumerate(data.events):
        rows.setdefault(event["stream"], []).append(i)
    streams = []
    for name, index in rows.items():
        events = [data.events[i] for i in index]
        events.sort(key=lambda e: parse_timestamp(e["ts"]))
        values = np.array(
            [[e["values"][f] for f in data.features] for e in events], dtype=np.float32
        )
        attrs = np.array(
            [[hash_attr(e.get("attrs", {}).get(a, ""), attr_buckets) for a in data.attrs]
             for e in events],
            dtype=np.int64,
        ).reshape(len(events), len(data.attrs))  # fmt: skip
        streams.append(StreamHistory(name, values, attrs))
    return History(streams, list(data.features), list(data.attrs), len(data.events), 0)


def train_artifact(
    data: Dataset,
    output: str | Path,
    config: Config,
    *,
    hidden_size: int = 32,
    epochs: int = 3,
    version: str = "demo",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train a small forecaster on `data` (normal history) and write its artifact."""
    from detector.train import fit, forecaster_config

    history = history_from_dataset(data, config.model.attr_buckets)
    model_config = forecaster_config(
        config, data.features, data.attrs, hidden_size=hidden_size, num_layers=1
    )
    result = fit(history, model_config, config, epochs=epochs, seed=seed, progress=progress)
    return save_artifact(
        output,
        result.model,
        features=list(data.features),
        attrs=list(data.attrs),
        calibration=result.calibration,
        version=version,
        training={"streams": len(history.streams), "events": history.events, "seed": seed},
        metrics=result.metrics,
    )


# ------------------------------------------------------------------------------ the live demo

SENSOR_TOPIC, TRANSACTION_TOPIC = "sensor-events", "transaction-events"
ALERTS_TOPIC, DEAD_LETTER_TOPIC = "alerts", "events-dead-letter"
PARTITIONS = 4
SENSOR_STREAMS, SENSOR_STEPS_PER_S = 20, 25.0  # 500 sensor events/s, long histories
ACCOUNTS, TRANSACTIONS_PER_S = 100, 200.0
SLACK_EVENTS = 2  # an alert this many events of its stream after an episode still catches it
WARMUP_EVENTS = 30
# The demo's streams are young (a sensor ~1,100 events, an account ~90 purchases), so much of
# their evidence rests on statistics of a few dozen events and lands just below the daemon's
# default alert level of 1e-4. The demo alerts at 2e-4: on demo seeds 0-4, 3-10 more episodes
# caught for 1-4 more false alarms (docs/evaluation.md).
ALERT_THRESHOLD = 0.9998


@dataclass
class Pipeline:
    """One model and its worker: which topic, which data, which episodes."""

    name: str
    topic: str
    data: Dataset
    novelty_window: float | None = None  # the worker's scoring.novelty_window (None: config's)
    model_dir: Path | None = None
    process: subprocess.Popen | None = None
    metrics_port: int = 0
    summary: dict = field(default_factory=dict)


@dataclass
class Scoreboard:
    """Alerts matched against the injected episodes of every pipeline."""

    alerts: int = 0
    caught: set = field(default_factory=set)  # (pipeline, episode id)
    false_alarms: int = 0
    lookup: dict = field(default_factory=dict)  # (stream, ts ms) -> (pipeline, event index)
    per_stream: dict = field(default_factory=dict)  # (pipeline, stream) -> sorted event indices

    def match(self, alert: dict, pipelines: dict[str, Pipeline]) -> tuple[str, int] | None:
        """The (pipeline, episode) an alert caught, or None for a false alarm."""
        ms = int(round(parse_timestamp(alert["ts"]) * 1000))
        found = self.lookup.get((alert["stream"], ms))
        if found is None:
            return None
        name, index = found
        episodes = pipelines[name].data.episodes
        order = self.per_stream[(name, alert["stream"])]
        at = bisect.bisect_left(order, index)
        for back in range(0, SLACK_EVENTS + 1):
            if at - back < 0:
                break
            episode = episodes[order[at - back]]
            if episode >= 0:
                return name, episode
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _say(text: str) -> None:
    print(text, flush=True)


def _live_schedule(
    pipelines: list[Pipeline], start: float, duration: float
) -> tuple[list[tuple[float, str, int]], Scoreboard]:
    """Every event as (live time, pipeline, index), in time order; generated time compressed."""
    board = Scoreboard()
    schedule: list[tuple[float, str, int]] = []
    for pipe in pipelines:
        ts = np.array([parse_timestamp(e["ts"]) for e in pipe.data.events])
        span = max(float(ts.max() - ts.min()), 1.0)
        live = start + (ts - ts.min()) * (duration * 0.98 / span)
        live = np.round(live, 3)
        for i, (event, moment) in enumerate(zip(pipe.data.events, live.tolist(), strict=True)):
            key = (event["stream"], int(round(moment * 1000)))
            if key in board.lookup:  # two events of one stream in the same ms: nudge
                moment += 0.001
                key = (event["stream"], int(round(moment * 1000)))
            board.lookup[key] = (pipe.name, i)
            board.per_stream.setdefault((pipe.name, event["stream"]), []).append(i)
            schedule.append((moment, pipe.name, i))
    schedule.sort()
    return schedule, board


def _produce(
    bootstrap: str,
    pipelines: dict[str, Pipeline],
    schedule: list[tuple[float, str, int]],
    stop: threading.Event,
    produced: dict[str, int],
    played: set,
) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=10, acks=1)
    try:
        for moment, name, index in schedule:
            if stop.is_set():
                break
            wait = moment - time.time()
            if wait > 0 and stop.wait(wait):
                break
            pipe = pipelines[name]
            event = dict(pipe.data.events[index])
            event["ts"] = moment
            producer.send(
                pipe.topic, key=event["stream"].encode("utf-8"), value=orjson.dumps(event)
            )
            produced[name] += 1
            episode = pipe.data.episodes[index]
            if episode >= 0:
                played.add((name, episode))
        producer.flush(10)
    finally:
        producer.close(timeout=5)


def _print_alert(alert: dict, verdict: str) -> None:
    contributions = alert["contributions"]
    top = max(contributions, key=contributions.get)
    ts = alert["ts"][11:23]
    observed = alert["observed"][top]
    if top in alert["expected"]:
        what = f"{top} observed {observed:.4g} expected {alert['expected'][top]:.4g}"
    else:  # a categorical attr: nothing is "expected", the value is unusual for the stream
        what = f"{top} {observed!r} is unusual for this stream"
    _say(
        f"  ALERT {ts}  {alert['stream']:<12} score {alert['score']:.5f}  {what} "
        f"({100 * contributions[top]:.0f}% of the error)  [{verdict}]"
    )


def _watch_alerts(
    bootstrap: str,
    pipelines: dict[str, Pipeline],
    board: Scoreboard,
    stop: threading.Event,
) -> None:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    try:
        consumer.assign([TopicPartition(ALERTS_TOPIC, p) for p in range(PARTITIONS)])
        seen: set[str] = set()
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=200).values():
                for record in records:
                    alert = orjson.loads(record.value)
                    if alert["alert_id"] in seen:  # at-least-once: a redelivered duplicate
                        continue
                    seen.add(alert["alert_id"])
                    board.alerts += 1
                    hit = board.match(alert, pipelines)
                    if hit is None:
                        board.false_alarms += 1
                        verdict = "false alarm"
                    else:
                        verdict = "new episode" if hit not in board.caught else "same episode"
                        board.caught.add(hit)
                    _print_alert(alert, verdict)
    finally:
        consumer.close()


def _warm_up(pipelines, config: Config) -> None:
    """Compile the engine's kernels here, once, into numba's on-disk cache: two workers
    compiling them at the same time after a fresh install took over a minute, while the events
    they should have scored went by."""
    from detector.engine import Engine

    for pipe in pipelines:
        artifact = load_artifact(pipe.model_dir)
        seconds = Engine.from_config(artifact.model, config, artifact.calibration).warm_up()
        if seconds > 1.0:
            _say(f"compiled the scoring kernels in {seconds:.0f} s (once after an install; "
                 "later runs load them from numba's cache)")  # fmt: skip


def _start_worker(pipe: Pipeline, bootstrap: str, workdir: Path, run_seconds: float) -> None:
    env = {
        **os.environ,
        "DETECTOR__KAFKA__BOOTSTRAP_SERVERS": f"[{bootstrap}]",
        "DETECTOR__KAFKA__TOPICS": f"[{pipe.topic}]",
        "DETECTOR__KAFKA__ALERTS_TOPIC": ALERTS_TOPIC,
        "DETECTOR__KAFKA__DEAD_LETTER_TOPIC": DEAD_LETTER_TOPIC,
        "DETECTOR__KAFKA__GROUP_ID": f"demo-{pipe.name}",
        "DETECTOR__KAFKA__SESSION_TIMEOUT_MS": "6000",
        "DETECTOR__KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "DETECTOR__KAFKA__MAX_WAIT_MS": "100",
        "DETECTOR__METRICS__HOST": "127.0.0.1",
        "DETECTOR__METRICS__PORT": str(pipe.metrics_port),
        "DETECTOR__CHECKPOINT__DIR": str(workdir / "state" / pipe.name),
        "DETECTOR__SCORING__WARMUP_EVENTS": str(WARMUP_EVENTS),
        "DETECTOR__SCORING__THRESHOLD": str(ALERT_THRESHOLD),
    }
    if pipe.novelty_window is not None:
        env["DETECTOR__SCORING__NOVELTY_WINDOW"] = str(pipe.novelty_window)
    log = open(workdir / f"worker-{pipe.name}.log", "wb")  # noqa: SIM115 - lives with the process
    pipe.process = subprocess.Popen(
        [sys.executable, "-m", "detector", "run", "--model", str(pipe.model_dir),
         "--duration", f"{run_seconds:.0f}", "--idle-exit", "4"],
        env=env, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _stop_worker(pipe: Pipeline, timeout: float) -> None:
    process = pipe.process
    if process is None:
        return
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
    lines = out.decode(errors="replace").strip().splitlines() if out else []
    if lines:
        with contextlib.suppress(ValueError):
            pipe.summary = orjson.loads(lines[-1])


@contextlib.contextmanager
def _sigint_as_stop(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C sets `stop` instead of raising mid-way; a second Ctrl-C raises."""
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):  # noqa: ARG001
        if stop.is_set():
            raise KeyboardInterrupt
        _say("\nstopping (Ctrl-C again to abort)...")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_demo(args: argparse.Namespace) -> int:
    from detector.broker import EmbeddedBroker

    duration = float(args.duration)
    if duration <= 0:
        raise ValueError("--duration must be positive")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Every demo plays new streams on a freshly trained model: the workers' checkpoints of an
    # earlier demo would start them warm on another run's history (the model, trained with the
    # same seed, has the same hash, so the worker would accept them).
    shutil.rmtree(workdir / "state", ignore_errors=True)
    seed = int(args.seed)
    config_path = getattr(args, "config", None)
    config = load_config(config_path)
    stop = threading.Event()
    started = time.time()

    with _sigint_as_stop(stop), contextlib.ExitStack() as stack:
        _say("detector demo: starting the embedded Kafka-protocol broker (tansu)...")
        broker = stack.enter_context(EmbeddedBroker(log_dir=workdir))
        bootstrap = broker.bootstrap_servers
        broker.create_topics([SENSOR_TOPIC, TRANSACTION_TOPIC, ALERTS_TOPIC], PARTITIONS)
        broker.create_topics([DEAD_LETTER_TOPIC], 1)
        _say(f"  broker on {bootstrap}; topics {SENSOR_TOPIC}, {TRANSACTION_TOPIC}, "
             f"{ALERTS_TOPIC}, {DEAD_LETTER_TOPIC}")  # fmt: skip

        sensor_steps = max(int(SENSOR_STEPS_PER_S * duration), 60)
        n_tx = max(int(TRANSACTIONS_PER_S * duration), ACCOUNTS * 40)
        pipelines = {
            "sensors": Pipeline(
                "sensors",
                SENSOR_TOPIC,
                sensor_streams(SENSOR_STREAMS, sensor_steps, seed=seed + 1, anomalies=True),
            ),
            # A purchase is one event, not an episode that goes on: each is judged on its own
            # (novelty_window 1), where the default holds a peak for 200 events and a second
            # unusual purchase soon after a first would not alert.
            "transactions": Pipeline(
                "transactions",
                TRANSACTION_TOPIC,
                transaction_streams(ACCOUNTS, n_tx, seed=seed + 1, anomalies=True),
                novelty_window=1.0,
            ),
        }
        train = config.train.model_copy(update={"patience": 2})
        log_features = {"sensors": [], "transactions": ["amount"]}  # amounts are heavy-tailed
        histories = {
            "sensors": sensor_streams(100, 2000, seed=seed + 100, anomalies=False),
            "transactions": transaction_streams(64, 64 * 150, seed=seed + 100, anomalies=False),
        }
        for name, pipe in pipelines.items():
            if stop.is_set():
                break
            history = histories[name]
            _say(f"training the {name} model on {len(history.events)} events of normal history "
                 f"({', '.join(history.features + history.attrs)})...")  # fmt: skip
            model = config.model.model_copy(update={"log_features": log_features[name]})
            train_config = config.model_copy(update={"train": train, "model": model})
            pipe.model_dir = train_artifact(
                history, workdir / "models" / name, train_config, hidden_size=64, epochs=8,
                version=f"demo-{name}", seed=seed,
            )  # fmt: skip
        if stop.is_set():
            return 130
        _warm_up(pipelines.values(), config)

        for pipe in pipelines.values():
            pipe.metrics_port = _free_port()
            _start_worker(pipe, bootstrap, workdir, duration + 60)
            stack.callback(_stop_worker, pipe, 0.1)
        _say("workers: " + ", ".join(
            f"{p.name} -> http://127.0.0.1:{p.metrics_port}/metrics" for p in pipelines.values()
        ) + f" (logs in {workdir})")  # fmt: skip

        live_start = time.time() + 3.0  # the workers join their groups meanwhile
        schedule, board = _live_schedule(list(pipelines.values()), live_start, duration)
        produced = dict.fromkeys(pipelines, 0)
        played: set = set()
        _say(f"producing {len(schedule)} events over {duration:.0f} s "
             f"({len(schedule) / duration:.0f}/s) with injected anomalies; alerts:")  # fmt: skip
        watcher_stop = threading.Event()
        watcher = threading.Thread(
            target=_watch_alerts, args=(bootstrap, pipelines, board, watcher_stop), daemon=True
        )
        watcher.start()
        producer = threading.Thread(
            target=_produce,
            args=(bootstrap, pipelines, schedule, stop, produced, played),
            daemon=True,
        )
        producer.start()
        while producer.is_alive():
            producer.join(0.2)
        live_end = time.time()

        _say("live run over: letting the workers drain and stop...")
        for pipe in pipelines.values():
            _stop_worker(pipe, timeout=30)
        time.sleep(1.0)  # the last alerts reach the watcher
        watcher_stop.set()
        watcher.join(5)

    events = sum(produced.values())
    processed = sum(int(p.summary.get("records", 0)) for p in pipelines.values())
    busy = max((float(p.summary.get("seconds", 0.0)) for p in pipelines.values()), default=0.0)
    caught = len(board.caught & played)
    episodes = len(played)
    precision = caught / (caught + board.false_alarms) if caught + board.false_alarms else None
    recall = caught / episodes if episodes else None
    live_seconds = max(live_end - live_start, 1e-9)
    summary = {
        "events": events,
        "alerts": board.alerts,
        "precision": None if precision is None else round(precision, 3),
        "recall": None if recall is None else round(recall, 3),
        "events_per_s": round(processed / live_seconds) if processed else 0,
    }
    _say("")
    _say("summary")
    _say(f"  events produced      {events}  (sensors {produced['sensors']}, transactions "
         f"{produced['transactions']}); read by the workers: {processed}")  # fmt: skip
    _say(f"  alerts               {board.alerts}")
    _say(f"  anomaly episodes     {episodes} injected, {caught} caught, {episodes - caught} missed")
    for name in pipelines:
        mine = {hit for hit in played if hit[0] == name}
        _say(f"    {name:<18} {len(mine)} injected, {len(board.caught & mine)} caught")
    _say(f"  false alarms         {board.false_alarms}")
    if precision is not None:
        _say(f"  precision            {precision:.3f}  (caught / (caught + false alarms))")
    if recall is not None:
        _say(f"  recall               {recall:.3f}  (caught / injected episodes)")
    _say(f"  throughput           {summary['events_per_s']} events/s over {live_seconds:.0f} s "
         f"(the producer's pace; a worker's ceiling is far higher: make bench)")  # fmt: skip
    _say(f"  wall time            {time.time() - started:.0f} s; worker run time {busy:.0f} s")
    print(orjson.dumps(summary).decode(), flush=True)
    return 0
