"""RdkafkaSource's batching rule and its error and commit plumbing, against a scripted consumer
(the real broker is exercised by the integration tests, which run with both clients)."""

from __future__ import annotations

import confluent_kafka as ck
import pytest
from kafka import TopicPartition
from kafka.errors import KafkaError

from detector.config import load_config
from detector.rdkafka_io import RdkafkaSource, Record

TP = TopicPartition("events", 0)


class Message:
    def __init__(self, offset: int, error: object = None) -> None:
        self._offset, self._error = offset, error

    def error(self):
        return self._error

    def topic(self) -> str:
        return TP.topic

    def partition(self) -> int:
        return TP.partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"v%d" % self._offset


class Error:
    def __init__(self, fatal: bool) -> None:
        self._fatal = fatal

    def fatal(self) -> bool:
        return self._fatal

    def __str__(self) -> str:
        return "fatal" if self._fatal else "transient"


class ScriptedConsumer:
    """Answers each consume with the next scripted list of offsets (nothing once they run out)."""

    def __init__(self, script: list[list], options: dict) -> None:
        self.script = list(script)
        self.options = options
        self.calls: list[tuple[int, float]] = []
        self.commits: list = []

    def subscribe(self, topics, on_assign, on_revoke) -> None:  # noqa: ARG002
        pass

    def consume(self, count: int, timeout: float) -> list:
        self.calls.append((count, timeout))
        if not self.script:
            return []
        return [m if isinstance(m, Message) else Message(m) for m in self.script.pop(0)]

    def commit(self, offsets, asynchronous: bool) -> None:
        self.commits.append(([(tp.topic, tp.partition, tp.offset) for tp in offsets], asynchronous))


def source(script: list[list]) -> RdkafkaSource:
    return RdkafkaSource(
        load_config(None).kafka, consumer_factory=lambda options: ScriptedConsumer(script, options)
    )


def offsets(batch: dict) -> list[int]:
    return [r.offset for r in batch[TP]]


def test_returns_what_librdkafka_holds_without_waiting():
    src = source([[1, 2, 3]])
    batch = src.poll(batch_size=100, max_wait_ms=2000)
    assert batch[TP][0] == Record("events", 0, 1, b"k", b"v1")
    assert offsets(batch) == [1, 2, 3]
    assert src.consumer.calls == [(100, 0.0)]


def test_with_nothing_held_waits_for_one_record_then_tops_up():
    src = source([[], [4], [5, 6]])
    assert offsets(src.poll(batch_size=100, max_wait_ms=2000)) == [4, 5, 6]
    # consume(100, t) would wait for 100 records: it asks for one with a timeout, then the rest.
    (first, _), (one, timeout), (rest, later) = src.consumer.calls
    assert (first, one, rest, later) == (100, 1, 99, 0.0) and timeout > 0


def test_gives_up_after_max_wait():
    src = source([])
    assert src.poll(batch_size=10, max_wait_ms=50) == {}


def test_skips_transient_errors_and_raises_fatal_ones():
    src = source([[Message(0, Error(fatal=False)), 7]])
    assert offsets(src.poll(batch_size=10, max_wait_ms=50)) == [7]
    src = source([[Message(0, Error(fatal=True))]])
    with pytest.raises(KafkaError, match="fatal"):
        src.poll(batch_size=10, max_wait_ms=50)


def test_commit_callbacks_get_their_offsets_in_order():
    src = source([])
    answers = []
    src.commit_async({TP: 10}, lambda offsets, error: answers.append((offsets, error)))
    src.commit({TP: 15})  # synchronous: librdkafka answers it by returning, not through on_commit
    src.commit_async({TP: 20}, lambda offsets, error: answers.append((offsets, error)))
    assert src.consumer.commits == [
        ([("events", 0, 10)], True),
        ([("events", 0, 15)], False),
        ([("events", 0, 20)], True),
    ]
    on_commit = src.consumer.options["on_commit"]  # librdkafka calls it from inside a poll
    on_commit(None, [ck.TopicPartition("events", 0, 10)])
    on_commit("broker gone", [ck.TopicPartition("events", 0, 20)])
    assert answers[0] == ({TP: 10}, None)
    assert answers[1][0] == {TP: 20} and isinstance(answers[1][1], KafkaError)
