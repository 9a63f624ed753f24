"""The worker against the real (embedded tansu) broker: alerts, dead letters, crashes, shutdown."""

from __future__ import annotations

import base64
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from safetensors import safe_open

from detector.artifact import load_artifact
from detector.broker import EmbeddedBroker
from detector.config import load_config
from detector.demo import train_artifact
from detector.synthetic import sensor_streams
from detector.worker import Worker

FEATURES = ("temperature", "pressure", "vibration", "power")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sensor model, trained once per session on generated normal history."""
    config = load_config(None, environ={"DETECTOR__TRAIN__WINDOW": "32"})
    data = sensor_streams(6, 200, seed=3, anomalies=False)
    out = tmp_path_factory.mktemp("model") / "sensors"
    return train_artifact(data, out, config, hidden_size=16, epochs=1, progress=False)


def names(prefix: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {
        "topic": f"{prefix}-in-{tag}",
        "alerts": f"{prefix}-alerts-{tag}",
        "dead": f"{prefix}-dead-{tag}",
        "group": f"{prefix}-group-{tag}",
    }


@pytest.fixture(params=["kafka-python", "librdkafka"])
def consumer(request: pytest.FixtureRequest) -> str:
    """Both consumer clients pass the same tests."""
    return request.param


def make_env(
    broker: EmbeddedBroker,
    n: dict[str, str],
    state: Path,
    consumer: str = "kafka-python",
    **extra: str,
) -> dict:
    env = {
        "DETECTOR__KAFKA__CONSUMER": consumer,
        "DETECTOR__KAFKA__BOOTSTRAP_SERVERS": f"[{broker.bootstrap_servers}]",
        "DETECTOR__KAFKA__TOPICS": f"[{n['topic']}]",
        "DETECTOR__KAFKA__ALERTS_TOPIC": n["alerts"],
        "DETECTOR__KAFKA__DEAD_LETTER_TOPIC": n["dead"],
        "DETECTOR__KAFKA__GROUP_ID": n["group"],
        "DETECTOR__KAFKA__SESSION_TIMEOUT_MS": "6000",
        "DETECTOR__KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "DETECTOR__KAFKA__MAX_WAIT_MS": "100",
        "DETECTOR__METRICS__PORT": "0",
        "DETECTOR__METRICS__HOST": "127.0.0.1",
        "DETECTOR__CHECKPOINT__DIR": str(state),
        "DETECTOR__SCORING__WARMUP_EVENTS": "10",
    }
    env.update(extra)
    return env


def setup_topics(broker: EmbeddedBroker, n: dict[str, str], partitions: int = 1) -> None:
    broker.create_topics([n["topic"]], partitions=partitions)
    broker.create_topics([n["alerts"], n["dead"]], partitions=1)


def produce(broker: EmbeddedBroker, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value)
        producer.flush(30)
    finally:
        producer.close()


def read_all(broker: EmbeddedBroker, topic: str, idle_ms: int = 1500) -> list:
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=idle_ms,
    )
    try:
        partitions = consumer.partitions_for_topic(topic) or {0}
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        return list(consumer)
    finally:
        consumer.close()


def end_offsets(broker: EmbeddedBroker, topic: str, partitions: int) -> dict[int, int]:
    """Next offset per partition, read off the records themselves (tansu's ListOffsets(latest)
    answers the base offset of the last batch)."""
    ends = dict.fromkeys(range(partitions), 0)
    for record in read_all(broker, topic):
        ends[record.partition] = max(ends[record.partition], record.offset + 1)
    return ends


def committed(broker: EmbeddedBroker, group: str, topic: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    return {
        tp.partition: meta.offset
        for tp, meta in offsets.items()
        if tp.topic == topic and meta.offset >= 0
    }


def sensor_events(n_streams: int, n_steps: int, seed: int = 0, t0: float = 1.79e9):
    """Simple smooth sensor streams, stream-interleaved in time order."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(10, 100, (n_streams, 4))
    out = []
    for t in range(n_steps):
        for s in range(n_streams):
            x = base[s] * (1 + 0.02 * math.sin(t / 15.0)) + rng.normal(0, 0.01, 4) * base[s]
            out.append(
                {
                    "stream": f"pump-{s}",
                    "ts": t0 + 60.0 * t,
                    "values": dict(zip(FEATURES, x.round(4).tolist(), strict=True)),
                }
            )
    return out


def encode(events: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(e["stream"].encode(), orjson.dumps(e)) for e in events]


def in_process_worker(broker, n, tmp_path, model_dir, consumer="kafka-python", **extra) -> Worker:
    config = load_config(None, environ=make_env(broker, n, tmp_path / "state", consumer, **extra))
    return Worker(config, load_artifact(model_dir), serve_http=False, install_signals=False)


def test_an_injected_anomaly_becomes_an_alert(broker, model_dir, tmp_path, consumer):
    n = names("alert")
    setup_topics(broker, n)
    events = sensor_events(3, 120, seed=1)
    spike = next(i for i, e in enumerate(events) if e["stream"] == "pump-1" and i > 300)
    events[spike]["values"]["temperature"] *= 40.0
    produce(broker, n["topic"], encode(events))

    worker = in_process_worker(broker, n, tmp_path, model_dir, consumer)
    summary = worker.run(idle_exit=2.0, duration=60)
    assert summary.records == len(events)
    assert summary.scored + summary.warmup == len(events)

    alerts = read_all(broker, n["alerts"])
    by_id = {orjson.loads(a.value)["alert_id"]: a for a in alerts}
    alert_id = f"{n['topic']}:0:{spike}"
    assert alert_id in by_id, sorted(by_id)
    record = by_id[alert_id]
    alert = orjson.loads(record.value)
    assert record.key == b"pump-1"
    assert alert["stream"] == "pump-1"
    assert set(alert) == {
        "alert_id", "stream", "ts", "score", "threshold", "error", "observed", "expected",
        "contributions", "model_version", "detected_at",
    }  # fmt: skip
    assert alert["score"] >= alert["threshold"]
    assert max(alert["contributions"], key=alert["contributions"].get) == "temperature"
    assert alert["observed"]["temperature"] == pytest.approx(events[spike]["values"]["temperature"])
    assert alert["ts"].endswith("Z") and alert["detected_at"].endswith("Z")
    assert len(alerts) == summary.alerts
    assert committed(broker, n["group"], n["topic"]) == {0: len(events)}


MALFORMED = [
    (b"{not json", "bad_json"),
    (b'{"stream": "pump-0", "ts": 1790000000, "values": {"temperature": "hot"}}', "bad_value"),
    (b'{"stream": "pump-0", "ts": 1790000000, "values": {"temperature": NaN}}', "bad_json"),
    (
        b'{"stream": "pump-0", "ts": 1790000000, "values": {"temperature": "NaN",'
        b' "pressure": 1, "vibration": 1, "power": 1}}',
        "bad_value",
    ),
    (b'{"ts": 1790000000, "values": {"temperature": 1}}', "missing_stream"),
    (b'{"stream": "", "ts": 1790000000, "values": {}}', "missing_stream"),
    (
        b'{"stream": "pump-0", "ts": "yesterday", "values": {"temperature": 1, "pressure": 1,'
        b' "vibration": 1, "power": 1}}',
        "bad_timestamp",
    ),
    (b'{"stream": "pump-0", "ts": 1790000000}', "missing_value"),
    (b"[1, 2, 3]", "not_an_object"),
    (b"\xff\xfe\x00garbage", "bad_encoding"),
    (b"", "bad_json"),
    (b'{"stream": "pump-0", "ts": 1, "values": {"t": "' + b"x" * 70000 + b'"}}', "too_large"),
]


def test_malformed_records_go_to_the_dead_letter_topic_and_counts_add_up(
    broker, model_dir, tmp_path, consumer
):
    n = names("poison")
    setup_topics(broker, n)
    good = encode(sensor_events(2, 20, seed=2))
    records = []
    bad_offsets = {}
    for i, (key, value) in enumerate(good):
        records.append((key, value))
        if i % 3 == 0 and len(bad_offsets) < len(MALFORMED):
            payload, reason = MALFORMED[len(bad_offsets)]
            bad_offsets[len(records)] = (payload, reason)
            records.append((b"pump-0", payload))
    produce(broker, n["topic"], records)

    worker = in_process_worker(broker, n, tmp_path, model_dir, consumer)
    summary = worker.run(idle_exit=2.0, duration=60)

    assert summary.records == len(records)
    assert summary.scored + summary.warmup + summary.invalid == len(records)
    assert summary.invalid == len(MALFORMED)
    value = worker.metrics.registry.get_sample_value
    outcomes = {o: value("detector_events_total", {"outcome": o}) for o in ("scored", "warmup")}
    invalid = value("detector_events_total", {"outcome": "invalid"})
    assert outcomes["scored"] + outcomes["warmup"] + invalid == len(records)

    letters = [orjson.loads(r.value) for r in read_all(broker, n["dead"])]
    assert len(letters) == len(MALFORMED)
    seen = {}
    for letter in letters:
        source = letter["source"]
        assert source["topic"] == n["topic"] and source["partition"] == 0
        seen[source["offset"]] = (base64.b64decode(letter["payload_b64"]), letter["reason"])
    assert seen == bad_offsets
    expected_reasons: dict[str, int] = {}
    for _, reason in MALFORMED:
        expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    for reason, count in expected_reasons.items():
        assert value("detector_dead_letters_total", {"reason": reason}) == count
    assert committed(broker, n["group"], n["topic"]) == {0: len(records)}


def test_streams_refused_when_full_are_dead_lettered(broker, model_dir, tmp_path):
    n = names("full")
    setup_topics(broker, n)
    events = sensor_events(5, 4, seed=3)
    produce(broker, n["topic"], encode(events))
    worker = in_process_worker(broker, n, tmp_path, model_dir, DETECTOR__ENGINE__MAX_STREAMS="2")
    summary = worker.run(idle_exit=2.0, duration=60)
    assert summary.reasons == {"streams_full": 12}
    assert summary.warmup == 8
    letters = [orjson.loads(r.value) for r in read_all(broker, n["dead"])]
    assert {letter["reason"] for letter in letters} == {"streams_full"}
    assert len(letters) == 12


def start_worker(model_dir: Path, env: dict, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "detector", "run", "--model", str(model_dir), *args],
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_commit(broker, group, topic, process, timeout=30.0, above=0) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        offsets = committed(broker, group, topic)
        if sum(offsets.values()) > above:
            return offsets
        if process.poll() is not None:
            raise AssertionError(f"worker exited early: {process.communicate()}")
        time.sleep(0.05)
    raise AssertionError("the worker never committed")


def wait_for_checkpoint_with_streams(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            with safe_open(str(path), framework="pt") as handle:
                if int(handle.metadata().get("streams", 0)) > 0:
                    return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint with streams at {path}")


def last_json(stdout: bytes) -> dict:
    return orjson.loads(stdout.decode().strip().splitlines()[-1])


def test_sigkill_mid_stream_then_restart_loses_and_skips_nothing(
    broker, model_dir, tmp_path, consumer
):
    n = names("kill")
    partitions = 2
    setup_topics(broker, n, partitions=partitions)
    events = sensor_events(200, 100, seed=4)
    records = encode(events)
    bad = set(range(7, len(records), 997))
    for i in bad:
        records[i] = (records[i][0], b'{"broken": ')
    # The topic fills in three parts: the first is there at the start; the second is produced
    # while the worker reads, and the kill lands as soon as the worker is into it, so it most
    # likely hits a batch in flight; the last arrives while the worker is down, so the kill is
    # mid-stream however fast the worker reads (librdkafka once read a 20,000-record topic that
    # was all there from the start before its first checkpoint with streams).
    first_part, before_kill = len(records) // 5, len(records) * 3 // 4
    produce(broker, n["topic"], records[:first_part])

    env = make_env(
        broker,
        n,
        tmp_path / "state",
        consumer,
        DETECTOR__ENGINE__BATCH_SIZE="250",
        DETECTOR__CHECKPOINT__INTERVAL_SECONDS="0.5",
    )
    first = start_worker(model_dir, env, tmp_path, "--idle-exit", "30")
    second_part = threading.Thread(
        target=produce, args=(broker, n["topic"], records[first_part:before_kill])
    )
    try:
        wait_for_commit(broker, n["group"], n["topic"], first, above=first_part // 2)
        # A warm restart needs a checkpoint that holds streams: without this wait the kill can
        # land between the first commits and the first checkpoint after them.
        wait_for_checkpoint_with_streams(tmp_path / "state" / "state.safetensors")
        second_part.start()
        wait_for_commit(broker, n["group"], n["topic"], first, above=first_part + 1000)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        if second_part.is_alive():
            second_part.join(60)
    assert first.returncode == -signal.SIGKILL
    at_kill = committed(broker, n["group"], n["topic"])
    done = sum(at_kill.values())
    assert first_part < done <= before_kill
    assert (tmp_path / "state" / "state.safetensors").is_file()
    produce(broker, n["topic"], records[before_kill:])
    ends = end_offsets(broker, n["topic"], partitions)
    assert sum(ends.values()) == len(records)

    second = start_worker(model_dir, env, tmp_path, "--idle-exit", "2", "--duration", "90")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err.decode()[-3000:]
    summary = last_json(out)
    assert summary["restored_streams"] > 0, "the restart should be warm"
    # The second run starts exactly where the last commit was and reads to the end.
    for p in range(partitions):
        key = f"{n['topic']}[{p}]"
        start = at_kill.get(p, 0)
        if start < ends[p]:
            assert summary["offsets"][key] == [start, ends[p]]
        else:
            assert key not in summary["offsets"]
    assert summary["records"] == len(records) - done
    assert committed(broker, n["group"], n["topic"]) == ends

    # Every input offset is accounted for: committed by one run or the other, and every invalid
    # record is in the dead-letter topic (a batch in flight at the kill may appear twice).
    letters = [orjson.loads(r.value) for r in read_all(broker, n["dead"])]
    bad_positions = set()
    for i in bad:
        # which partition/offset did record i land on? find it by payload and key
        bad_positions.add(records[i][0])
    letter_sources = {(x["source"]["partition"], x["source"]["offset"]) for x in letters}
    inputs = read_all(broker, n["topic"])
    expected_bad = {(r.partition, r.offset) for r in inputs if r.value == b'{"broken": '}
    assert len(expected_bad) == len(bad)
    assert letter_sources == expected_bad
    # Scored + warm-up + invalid of the two runs cover every offset at least once.
    assert summary["scored"] + summary["warmup"] + summary["invalid"] == summary["records"]


def test_sigterm_exits_cleanly_with_offsets_committed(broker, model_dir, tmp_path, consumer):
    n = names("term")
    setup_topics(broker, n, partitions=2)
    records = encode(sensor_events(200, 150, seed=5))
    # As in the SIGKILL test: a first part is there at the start, a second is produced while
    # the worker reads and the signal lands once the worker is into it, and the rest is never
    # produced, so the signal is mid-stream however fast the worker reads.
    first_part, before_term = len(records) // 5, len(records) * 3 // 4
    produce(broker, n["topic"], records[:first_part])
    env = make_env(broker, n, tmp_path / "state", consumer, DETECTOR__ENGINE__BATCH_SIZE="500")
    worker = start_worker(model_dir, env, tmp_path, "--idle-exit", "30")
    second_part = threading.Thread(
        target=produce, args=(broker, n["topic"], records[first_part:before_term])
    )
    try:
        wait_for_commit(broker, n["group"], n["topic"], worker, above=1000)
        second_part.start()
        wait_for_commit(broker, n["group"], n["topic"], worker, above=first_part + 1000)
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=20)
    finally:
        if worker.poll() is None:
            worker.kill()
        if second_part.is_alive():
            second_part.join(60)
    assert worker.returncode == 0, err.decode()[-3000:]
    summary = last_json(out)
    assert first_part < summary["records"] <= before_term < len(records)
    # Every record the worker read is committed: the next offset of each partition it read.
    offsets = committed(broker, n["group"], n["topic"])
    for key, (_, next_offset) in summary["offsets"].items():
        partition = int(key.rsplit("[", 1)[1].rstrip("]"))
        assert offsets[partition] == next_offset
    assert sum(offsets.values()) == summary["records"]
    assert (tmp_path / "state" / "state.safetensors").is_file()
    assert b"received SIGTERM" in err


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def test_a_broker_outage_mid_run_is_reported_then_nothing_is_lost(model_dir, tmp_path, consumer):
    """The broker freezes (SIGSTOP: unreachable, its data kept) while the worker runs; /healthz
    reports it, and once the broker is back the worker reads on without skipping a record."""
    with EmbeddedBroker() as own:  # not the session's broker: this test freezes it
        n = names("outage")
        setup_topics(own, n)
        events = sensor_events(20, 100, seed=6)
        half = len(events) // 2
        produce(own, n["topic"], encode(events[:half]))
        worker = in_process_worker(own, n, tmp_path, model_dir, consumer)
        runner = threading.Thread(target=worker.run, kwargs={"duration": 120}, daemon=True)
        runner.start()
        try:
            wait_until(lambda: worker.summary.records >= half, 30, "the first half to be read")
            seen_problems = []
            os.kill(own.pid, signal.SIGSTOP)
            try:
                # The lag probe (every 5 s) is the worker's broker health check.
                deadline = time.monotonic() + 12
                while time.monotonic() < deadline and not seen_problems:
                    if worker.health.problem is not None:
                        seen_problems.append(worker.health.problem)
                    time.sleep(0.1)
            finally:
                os.kill(own.pid, signal.SIGCONT)
            assert seen_problems and "broker" in seen_problems[0], seen_problems
            produce(own, n["topic"], encode(events[half:]))
            wait_until(
                lambda: committed(own, n["group"], n["topic"]).get(0) == len(events),
                60,
                "every offset to be committed after the outage",
            )
            wait_until(lambda: worker.health.problem is None, 15, "/healthz to recover")
        finally:
            worker.stop()
            runner.join(30)
        summary = worker.summary
        # Nothing skipped: the worker read offsets 0..end (a rebalance after the freeze may
        # deliver some records twice), and every record it read is counted once per reading.
        assert summary.offsets[f"{n['topic']}[0]"] == [0, len(events)]
        assert summary.records >= len(events)
        assert summary.scored + summary.warmup + summary.invalid == summary.records
