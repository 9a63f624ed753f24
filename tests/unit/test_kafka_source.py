"""KafkaSource.poll's batching rule, against a scripted consumer (the real broker is exercised by
the integration tests): a batch never waits for records that have not arrived."""

from __future__ import annotations

import time

from kafka import TopicPartition

from detector.config import load_config
from detector.kafka_io import KafkaSource

TP = TopicPartition("events", 0)


class ScriptedConsumer:
    """Answers each poll with the next scripted list of records (an empty dict once they run out,
    after sleeping the poll's timeout as a real consumer would)."""

    def __init__(self, script: list[list[int]], **_options) -> None:
        self.script = list(script)
        self.timeouts: list[int] = []

    def subscribe(self, topics, listener) -> None:  # noqa: ARG002
        pass

    def poll(self, timeout_ms: int, max_records: int) -> dict:
        self.timeouts.append(timeout_ms)
        if not self.script:
            time.sleep(timeout_ms / 1000)
            return {}
        records = self.script.pop(0)
        assert len(records) <= max_records
        return {TP: records} if records else {}


def source(script: list[list[int]]) -> KafkaSource:
    return KafkaSource(
        load_config(None).kafka, consumer_factory=lambda **o: ScriptedConsumer(script, **o)
    )


def test_returns_what_is_buffered_without_waiting_to_fill():
    src = source([[1, 2], [3], []])
    started = time.monotonic()
    batch = src.poll(batch_size=100, max_wait_ms=2000)
    assert batch == {TP: [1, 2, 3]}
    assert time.monotonic() - started < 1.0
    # The first poll may wait for a record; the top-ups only take what is already fetched.
    assert src.consumer.timeouts[0] > 0 and src.consumer.timeouts[1:] == [0, 0]


def test_stops_at_the_batch_size():
    src = source([[1, 2, 3], [4, 5], [6]])
    assert src.poll(batch_size=5, max_wait_ms=100) == {TP: [1, 2, 3, 4, 5]}
    assert src.poll(batch_size=5, max_wait_ms=100) == {TP: [6]}


def test_waits_up_to_max_wait_for_a_first_record():
    src = source([])
    started = time.monotonic()
    assert src.poll(batch_size=10, max_wait_ms=150) == {}
    assert 0.1 <= time.monotonic() - started < 1.0
