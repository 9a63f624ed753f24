"""The consumer-group source on librdkafka (`confluent-kafka`), in `KafkaSource`'s shape.

librdkafka fetches and parses records in its own threads, outside the GIL, so records wait in
its queue while the worker steps a batch instead of waiting for the worker's thread to fetch
them. Records come out as `Record` tuples keyed by kafka-python's `TopicPartition`, and client
failures as kafka-python's `KafkaError`, so the worker does not know which client it has.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import confluent_kafka as ck
from kafka import TopicPartition
from kafka.errors import KafkaError

from detector.config import KafkaConfig
from detector.kafka_io import FETCH_WAIT_MAX_MS, client_options

log = logging.getLogger(__name__)


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


RDKAFKA_NAMES = {  # kafka-python's option -> librdkafka's
    "bootstrap_servers": "bootstrap.servers",
    "client_id": "client.id",
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
}


def rdkafka_options(config: KafkaConfig) -> dict[str, Any]:
    """The connection settings of `kafka_io.client_options`, in librdkafka's names."""
    options = client_options(config)
    options["bootstrap_servers"] = ",".join(options["bootstrap_servers"])
    return {RDKAFKA_NAMES[name]: value for name, value in options.items()}


def _ours(partitions) -> list[TopicPartition]:
    return sorted(TopicPartition(p.topic, p.partition) for p in partitions)


class RdkafkaSource:
    """`KafkaSource` on librdkafka: the same `poll`, `commit`, `commit_async`, `assignment`,
    `lag` and `close`."""

    def __init__(
        self,
        config: KafkaConfig,
        *,
        on_assign: Callable[[list[TopicPartition]], None] | None = None,
        on_revoke: Callable[[list[TopicPartition]], None] | None = None,
        consumer_factory: Callable[[dict], Any] = ck.Consumer,
    ) -> None:
        # Async commits awaiting librdkafka's answer, oldest first. Only async commits answer
        # through on_commit (a synchronous one raises instead), so each answer is matched to
        # the oldest commit of the same offsets, not merely to the oldest commit.
        self._commit_callbacks: deque[tuple[dict, Callable]] = deque()
        self.consumer = consumer_factory(
            {
                **rdkafka_options(config),
                "group.id": config.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": config.session_timeout_ms,
                "heartbeat.interval.ms": config.heartbeat_interval_ms,
                "fetch.wait.max.ms": max(10, min(config.max_wait_ms, FETCH_WAIT_MAX_MS)),
                "on_commit": self._committed,
            }
        )
        assign, revoke = on_assign or (lambda _: None), on_revoke or (lambda _: None)
        self.topics = list(config.topics)
        self.consumer.subscribe(
            self.topics,
            on_assign=lambda _c, parts: assign(_ours(parts)),
            on_revoke=lambda _c, parts: revoke(_ours(parts)),
        )

    def _committed(self, error, partitions) -> None:
        answered = {TopicPartition(p.topic, p.partition): p.offset for p in partitions}
        for k, (offsets, callback) in enumerate(self._commit_callbacks):
            if offsets == answered:
                del self._commit_callbacks[k]
                callback(offsets, KafkaError(str(error)) if error else None)
                return

    def poll(
        self, batch_size: int, max_wait_ms: int, stop: Callable[[], bool] = lambda: False
    ) -> dict[TopicPartition, list]:
        """Up to `batch_size` records: what librdkafka holds now, else the first to arrive within
        `max_wait_ms` and whatever came with it."""
        deadline = time.monotonic() + max_wait_ms / 1000.0
        messages = self._consume(batch_size, 0.0)
        while not messages and not stop():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # consume(n, timeout) would wait for n records: wait for one, then take the rest.
            messages = self._consume(1, min(left, 0.1))
            if messages:
                messages += self._consume(batch_size - 1, 0.0)
        out: dict[TopicPartition, list] = {}
        for message in messages:
            tp = TopicPartition(message.topic(), message.partition())
            out.setdefault(tp, []).append(
                Record(tp.topic, tp.partition, message.offset(), message.key(), message.value())
            )
        return out

    def _consume(self, count: int, timeout: float) -> list:
        try:
            messages = self.consumer.consume(count, timeout)
        except ck.KafkaException as exc:
            raise KafkaError(str(exc)) from exc
        good = []
        for message in messages:
            error = message.error()
            if error is None:
                good.append(message)
            elif error.fatal():
                raise KafkaError(str(error))
            else:
                log.warning("consumer: %s", error)
        return good

    def _offsets(self, offsets: Mapping[TopicPartition, int]) -> list:
        return [ck.TopicPartition(tp.topic, tp.partition, offset) for tp, offset in offsets.items()]

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit `offsets` (the next offset to read, per partition); raises KafkaError."""
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=self._offsets(offsets), asynchronous=False)
        except ck.KafkaException as exc:
            raise KafkaError(str(exc)) from exc

    def commit_async(
        self,
        offsets: Mapping[TopicPartition, int],
        callback: Callable[[dict, Any], None] | None = None,
    ) -> None:
        """Send a commit without waiting; `callback(offsets, None or KafkaError)` runs inside a
        later poll."""
        if not offsets:
            return
        self._commit_callbacks.append((dict(offsets), callback or (lambda _o, _e: None)))
        try:
            self.consumer.commit(offsets=self._offsets(offsets), asynchronous=True)
        except ck.KafkaException as exc:
            self._commit_callbacks.pop()
            raise KafkaError(str(exc)) from exc

    def assignment(self) -> set[TopicPartition]:
        return set(_ours(self.consumer.assignment()))

    def lag(self, timeout_ms: int = 2000) -> dict[TopicPartition, int]:
        """Records between the consumer's position and the end of each assigned partition;
        raises KafkaError when the broker cannot be reached (the worker's health probe)."""
        assigned = self.consumer.assignment()
        if not assigned:
            return {}
        try:
            positions = self.consumer.position(assigned)
            lags = {}
            for tp in positions:
                _, end = self.consumer.get_watermark_offsets(
                    tp, timeout=timeout_ms / 1000.0, cached=False
                )
                position = tp.offset if tp.offset >= 0 else 0
                lags[TopicPartition(tp.topic, tp.partition)] = max(0, end - position)
            return lags
        except ck.KafkaException as exc:
            raise KafkaError(str(exc)) from exc

    def close(self) -> None:
        """Leave the group (without committing anything more)."""
        try:
            self.consumer.close()
        except (ck.KafkaException, RuntimeError) as exc:
            log.warning("closing the consumer: %s", exc)
