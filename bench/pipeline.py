"""End-to-end worker throughput and event->alert latency through the embedded broker.

    .venv/bin/python bench/pipeline.py [--records 400000] [--streams 100000] [--partitions 4]

1. Throughput. A topic is preloaded with `--records` events of `--streams` streams (4 features,
   keyed by stream id), then read twice in the same run: by a bare kafka-python consumer doing
   only `json.loads` per record (the client's ceiling), and by the real `Worker` (consumer group,
   decode and validation, engine step with a hidden-64 GRU over 100,000 streams' state, alerts and
   dead letters produced and acknowledged, offsets committed every batch). Rates count records
   from the first one received to the last one done (group join excluded).
2. Latency. A separate producer process sends events at half the worker's measured rate for
   `--latency-seconds`; 1% of them are spikes that alert. Latency is the time from an event's
   send (its `ts`) to its alert arriving at a consumer of the alerts topic.

The model is trained for a few seconds on normal events of the same kind, so its scores are
calibrated and alerts are rare, as in production. The last line is JSON: events_per_s,
bare_consume_per_s, ratio, p50_ms, p99_ms and the settings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import torch

FEATURES = ["temperature", "pressure", "vibration", "power"]
HIDDEN = 64
WARM_EVENTS = 31  # one past the default warm-up, so every bench event is scored


def make_model(directory: Path) -> Path:
    """A forecaster trained for a moment on normal events like the ones the bench sends, so its
    scores are calibrated and alerts are as rare as in production (only the injected spikes)."""
    from detector.artifact import save_artifact
    from detector.config import load_config
    from detector.model import ForecasterConfig
    from detector.train import History, StreamHistory, fit

    rng = np.random.default_rng(0)
    history = History(
        [
            StreamHistory(f"s{i}", normal_values(rng, 400), np.zeros((400, 0), dtype=np.int64))
            for i in range(64)
        ],
        FEATURES,
    )
    config = ForecasterConfig(n_features=len(FEATURES), hidden_size=HIDDEN)
    result = fit(history, config, load_config(None), epochs=2, seed=0, progress=False)
    return save_artifact(
        directory,
        result.model,
        features=FEATURES,
        calibration=result.calibration,
        version="bench",
    )


def normal_values(rng: np.random.Generator, n: int) -> np.ndarray:
    return (50.0 + rng.standard_normal((n, len(FEATURES)))).astype(np.float32)


# One event as JSON, formatted from a template: cheaper than building and dumping a dict, which
# matters for the steady producer (it shares the 2 cores with the worker).
EVENT_TEMPLATE = (
    '{"stream":"stream-%06d","ts":%.6f,"values":{'
    + ",".join(f'"{name}":%.4f' for name in FEATURES)
    + "}}"
)


def event_bytes(stream: int, ts: float, values: list[float]) -> bytes:
    return (EVENT_TEMPLATE % (stream, ts, *values)).encode()


def preload(bootstrap: str, topic: str, records: int, streams: int) -> float:
    from kafka import KafkaProducer

    rng = np.random.default_rng(1)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, batch_size=512 * 1024, acks=1
    )
    started = time.perf_counter()
    ids = rng.integers(0, streams, records)
    ids[:streams] = np.arange(streams)  # every stream appears
    base = time.time() - 3600
    for i, s in enumerate(ids.tolist()):
        producer.send(
            topic,
            key=f"stream-{s:06d}".encode(),
            value=event_bytes(s, base + i * 1e-3, normal_values(rng, 1)[0].tolist()),
        )
    producer.flush(120)
    producer.close()
    return time.perf_counter() - started


def bare_consume(bootstrap: str, topic: str, partitions: int, records: int) -> float:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=4096,
        max_partition_fetch_bytes=4 << 20,
    )
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    loads = json.loads
    count = 0
    first = None
    while count < records:
        for batch in consumer.poll(timeout_ms=500, max_records=4096).values():
            if first is None:
                first = time.perf_counter()
            for record in batch:
                loads(record.value)
            count += len(batch)
    elapsed = time.perf_counter() - (first or time.perf_counter())
    consumer.close()
    return count / elapsed


def worker_config(bootstrap: str, topic: str, state: Path, max_wait_ms: int, consumer: str):
    from detector.config import load_config

    tag = uuid.uuid4().hex[:6]
    return load_config(
        None,
        environ={
            "DETECTOR__KAFKA__BOOTSTRAP_SERVERS": f"[{bootstrap}]",
            "DETECTOR__KAFKA__TOPICS": f"[{topic}]",
            "DETECTOR__KAFKA__ALERTS_TOPIC": "bench-alerts",
            "DETECTOR__KAFKA__DEAD_LETTER_TOPIC": "bench-dead",
            "DETECTOR__KAFKA__GROUP_ID": f"bench-{tag}",
            "DETECTOR__KAFKA__SESSION_TIMEOUT_MS": "6000",
            "DETECTOR__KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
            "DETECTOR__KAFKA__MAX_WAIT_MS": str(max_wait_ms),
            "DETECTOR__KAFKA__CONSUMER": consumer,
            "DETECTOR__CHECKPOINT__DIR": str(state),
            "DETECTOR__CHECKPOINT__INTERVAL_SECONDS": "3600",
            "DETECTOR__ENGINE__INITIAL_CAPACITY": "131072",
        },
    )


def steady_producer(bootstrap: str, topic: str, rate: float, seconds: float, streams: int) -> None:
    """Send events at `rate` per second, each stamped with its send time, as cheaply as possible:
    on 2 cores the load generator competes with the worker and the broker for CPU. librdkafka
    (confluent-kafka) sends, and each 5 ms slice of events is drawn at once. (The first version,
    kafka-python and one orjson.dumps per event, took 70% of a core at 14,000 events/s; with a
    bare consumer and no worker it alone gave p99 347 ms.)

    Batches linger 10 ms (librdkafka's default is 5): tansu's memory storage keeps every
    produced batch as an object and its work per fetch grows with their number. At 2 ms the
    generator wrote over a thousand batches a second, and within a 20 s phase at 10,000 events/s
    the broker went from 64% to 107% of a core and the latency from 33 ms to 1.2 s, the worker
    idle meanwhile. The linger is inside what is measured: events are stamped before it."""
    from confluent_kafka import Producer

    rng = np.random.default_rng(2)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10, "acks": 1})
    started = time.time()
    total = int(rate * seconds)
    chunk = max(1, int(rate / 200))
    sent = 0
    while sent < total:
        delay = started + sent / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        n = min(chunk, total - sent)
        ids = rng.integers(0, streams, n).tolist()
        values = normal_values(rng, n).astype(np.float64)
        values[rng.random(n) < 0.01, 0] *= 1000.0  # spikes that alert
        now = time.time()
        for s, row in zip(ids, values.tolist(), strict=True):
            producer.produce(topic, key=b"stream-%06d" % s, value=event_bytes(s, now, row))
        producer.poll(0)
        sent += n
    producer.flush(30)


def warm_up(worker, streams: int) -> None:
    """Give every stream a past: step `WARM_EVENTS` normal events of each through the engine, as
    if the worker had been running for a while (this also compiles what is compiled once)."""
    from detector.events import EventBatch

    rng = np.random.default_rng(3)
    names = [f"stream-{s:06d}" for s in range(streams)]
    start = time.time() - 7200.0
    for k in range(WARM_EVENTS):
        for lo in range(0, streams, 4096):
            chunk = names[lo : lo + 4096]
            worker.engine.step_many(
                EventBatch(
                    chunk,
                    np.full(len(chunk), start + k),
                    normal_values(rng, len(chunk)),
                    np.zeros((len(chunk), 0), dtype=np.int64),
                )
            )


def _group_member(config, model_dir: str, streams: int, start, results) -> None:
    """One worker process of a scaled-out group: warm, wait for the others, read until idle."""
    torch.set_num_threads(1)
    from detector.artifact import load_artifact
    from detector.worker import Worker

    worker = Worker(config, load_artifact(model_dir), serve_http=False, install_signals=False)
    warm_up(worker, streams)
    start.wait()
    summary = worker.run(idle_exit=3.0, duration=300)
    results.put((summary.records, summary.first_data, summary.last_batch))


def scale_out(config, model_dir: Path, streams: int, workers: int) -> tuple[float, int]:
    """events/s of `workers` worker processes in one consumer group reading the whole topic
    (time.monotonic is one clock for all processes here), and how many records they read."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(workers), context.Queue()
    members = [
        context.Process(
            target=_group_member,
            args=(
                config.model_copy(
                    update={"checkpoint": config.checkpoint.model_copy(
                        update={"dir": Path(config.checkpoint.dir) / f"member-{k}"})}
                ),
                str(model_dir), streams, start, results,
            ),
        )
        for k in range(workers)
    ]  # fmt: skip
    for member in members:
        member.start()
    answers = [results.get(timeout=600) for _ in members]
    for member in members:
        member.join(30)
    records = sum(n for n, _, _ in answers)
    first = min(t for n, t, _ in answers if n)
    last = max(t for n, _, t in answers if n)
    return records / (last - first), records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=400_000)
    parser.add_argument("--streams", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--max-wait-ms", type=int, default=100)
    parser.add_argument(
        "--consumer", choices=["kafka-python", "librdkafka"], default="kafka-python"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="also time this many worker processes in one group"
    )
    parser.add_argument(
        "--latency-rate", type=float, default=None, help="events/s (default: half the measured)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from kafka import KafkaConsumer, TopicPartition

    from detector.artifact import load_artifact
    from detector.broker import EmbeddedBroker
    from detector.worker import Worker

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    model_dir = make_model(work / "model")
    model = load_artifact(model_dir)
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        topic = "bench-events"
        broker.create_topics([topic, "bench-alerts"], partitions=args.partitions)
        broker.create_topics(["bench-dead"], partitions=1)
        seconds = preload(bootstrap, topic, args.records, args.streams)
        print(f"preloaded {args.records} records in {seconds:.1f} s", file=sys.stderr)

        bare = bare_consume(bootstrap, topic, args.partitions, args.records)
        print(f"bare kafka-python consumer + json.loads: {bare:,.0f} records/s", file=sys.stderr)

        config = worker_config(bootstrap, topic, work / "state", args.max_wait_ms, args.consumer)
        worker = Worker(config, model, serve_http=False, install_signals=False)
        warm_up(worker, args.streams)
        summary = worker.run(max_records=args.records)
        active = (summary.last_batch or 0.0) - (summary.first_data or 0.0)
        rate = summary.records / active
        print(
            f"worker: {rate:,.0f} records/s ({summary.records} records, {summary.alerts} alerts, "
            f"{worker.engine.active_streams} streams, {active:.1f} s; "
            f"{rate / bare:.0%} of the bare consumer)",
            file=sys.stderr,
        )

        group_rate = None
        if args.workers > 1:
            group_config = worker_config(
                bootstrap, topic, work / "group-state", args.max_wait_ms, args.consumer
            )
            group_rate, group_records = scale_out(
                group_config, model_dir, args.streams, args.workers
            )
            print(
                f"{args.workers} worker processes in one group: {group_rate:,.0f} records/s "
                f"({group_records} records read, {group_rate / rate:.2f}x one worker)",
                file=sys.stderr,
            )

        # ---- latency at half the measured rate -------------------------------------------
        target = args.latency_rate or rate / 2
        latencies: list[tuple[float, float]] = []
        stop = threading.Event()

        phase_start = time.time()

        def watch() -> None:
            # A short fetch wait, so the watcher's own polling adds little to what is measured.
            consumer = KafkaConsumer(
                bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
            )
            parts = [TopicPartition("bench-alerts", p) for p in range(args.partitions)]
            consumer.assign(parts)
            consumer.seek_to_end()
            consumer.poll(timeout_ms=0)
            ready.set()
            while not stop.is_set():
                for batch in consumer.poll(timeout_ms=50).values():
                    now = time.time()
                    for record in batch:
                        alert = orjson.loads(record.value)
                        sent, detected = (
                            float(np.datetime64(alert[k].rstrip("Z"), "ms").astype(float)) / 1e3
                            for k in ("ts", "detected_at")
                        )
                        # tansu's seek_to_end lands up to a batch early: skip older alerts.
                        if sent >= phase_start:
                            latencies.append((now - sent, detected - sent))
            consumer.close()

        ready = threading.Event()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        ready.wait(30)
        latency_worker = Worker(
            worker_config(
                bootstrap, topic, work / "state2", args.max_wait_ms, args.consumer
            ).model_copy(
                update={"kafka": config.kafka}  # same group: continue where the first one ended
            ),
            model,
            serve_http=False,
            install_signals=False,
        )
        latency_worker.engine = worker.engine  # warm: the 100,000 streams' state
        runner = threading.Thread(
            target=latency_worker.run, kwargs={"duration": args.latency_seconds + 15}
        )
        runner.start()
        # Load starts once the worker holds its partitions: a slow group join (the first worker's
        # session may still be open) must not be measured as event latency.
        joined = time.monotonic() + 60.0
        while not latency_worker.health.partitions_assigned and time.monotonic() < joined:
            time.sleep(0.1)
        time.sleep(0.5)
        producer = multiprocessing.get_context("spawn").Process(
            target=steady_producer,
            args=(bootstrap, topic, target, args.latency_seconds, args.streams),
        )
        producer.start()
        producer.join()
        time.sleep(2.0)
        latency_worker.stop()
        runner.join(30)
        stop.set()
        watcher.join(5)

    both = np.array(latencies).reshape(-1, 2) * 1000.0
    lat, scored = both[:, 0], both[:, 1]  # event -> alert received; event -> scored
    p50 = float(np.percentile(lat, 50)) if lat.size else None
    p99 = float(np.percentile(lat, 99)) if lat.size else None
    print(
        f"latency at {target:,.0f} events/s: {lat.size} alerts, p50 {p50:.0f} ms, p99 {p99:.0f} ms"
        f" (event -> scored: p50 {np.percentile(scored, 50):.0f} ms,"
        f" p99 {np.percentile(scored, 99):.0f} ms)"
        if lat.size
        else "latency: no alerts seen",
        file=sys.stderr,
    )
    result = {
        "events_per_s": round(rate),
        "bare_consume_per_s": round(bare),
        "ratio": round(rate / bare, 3),
        "p50_ms": None if p50 is None else round(p50, 1),
        "p99_ms": None if p99 is None else round(p99, 1),
        "latency_load_per_s": round(target),
        "latency_alerts": int(lat.size),
        "records": args.records,
        "streams": args.streams,
        "partitions": args.partitions,
        "hidden": HIDDEN,
        "features": len(FEATURES),
        "max_wait_ms": args.max_wait_ms,
        "consumer": args.consumer,
        "workers": args.workers,
        "group_events_per_s": None if group_rate is None else round(group_rate),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
