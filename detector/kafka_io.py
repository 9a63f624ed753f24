"""Kafka in and out with kafka-python: the consumer-group source and the alert/dead-letter sinks.

`KafkaSource` polls raw records from a consumer group with auto-commit off; the worker commits
explicitly, after every alert and dead letter of a batch is acknowledged. Partition assignment
changes go to the worker's `on_assign` / `on_revoke` hooks through a `RebalanceHandler`, which
subclasses `kafka.ConsumerRebalanceListener` (kafka-python refuses anything else).

`KafkaSink` is the `AlertSink` shape for Kafka: `add(key, value)` sends at once and keeps the
future, `flush()` waits for every future of the batch and raises `DeliveryError` if any failed,
so the caller skips the commit. `alert_record` builds the alert JSON of DESIGN.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from detector.config import KafkaConfig
from detector.errors import DetectorError

log = logging.getLogger(__name__)

# How long the broker may hold a fetch that has no records yet. A Kafka broker answers as soon as
# records arrive, but tansu holds the fetch for the whole wait (measured at 1,000 events/s: p50
# delivery 104 ms with 500 ms, 14 ms with 50 ms): kept short, as event latency is bounded by it.
FETCH_WAIT_MAX_MS = 20


class DeliveryError(DetectorError):
    """A message could not be delivered to the broker: the batch's offsets must not be committed."""


def client_options(config: KafkaConfig) -> dict[str, Any]:
    """Connection settings shared by the consumer and the producers (kafka-python's names)."""
    options: dict[str, Any] = {
        "bootstrap_servers": list(config.bootstrap_servers),
        "client_id": config.client_id,
        "security_protocol": config.security_protocol,
    }
    if config.sasl_mechanism:
        options["sasl_mechanism"] = config.sasl_mechanism
    if config.sasl_plain_username is not None:
        options["sasl_plain_username"] = config.sasl_plain_username
    if config.sasl_plain_password is not None:
        options["sasl_plain_password"] = config.sasl_plain_password.get_secret_value()
    if config.ssl_cafile:
        options["ssl_cafile"] = config.ssl_cafile
    return options


class RebalanceHandler(ConsumerRebalanceListener):
    """Forwards kafka-python's rebalance callbacks to plain functions (the worker's hooks)."""

    def __init__(
        self,
        on_assign: Callable[[list[TopicPartition]], None],
        on_revoke: Callable[[list[TopicPartition]], None],
    ) -> None:
        self._on_assign = on_assign
        self._on_revoke = on_revoke

    def on_partitions_revoked(self, revoked):  # noqa: D401 - kafka-python's names
        self._on_revoke(sorted(revoked))

    def on_partitions_assigned(self, assigned):
        self._on_assign(sorted(assigned))


class KafkaSource:
    """A consumer-group member on the configured topics; offsets committed only by `commit`.

    `poll(batch_size, max_wait_ms)` returns up to `batch_size` records: as soon as it holds some
    and the client has nothing more already fetched, or after `max_wait_ms` with none (or when
    `stop()` says so). A micro-batch never waits for records that have not arrived: under load the
    fetch buffers are full and batches come out full-sized, under a trickle each event goes
    through as soon as it arrives. Records come grouped by partition, in offset order within each.
    """

    def __init__(
        self,
        config: KafkaConfig,
        *,
        on_assign: Callable[[list[TopicPartition]], None] | None = None,
        on_revoke: Callable[[list[TopicPartition]], None] | None = None,
        max_poll_records: int = 4096,
        consumer_factory: Callable[..., Any] = KafkaConsumer,
        **overrides: Any,
    ) -> None:
        options = {
            **client_options(config),
            "group_id": config.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": config.session_timeout_ms,
            "heartbeat_interval_ms": config.heartbeat_interval_ms,
            "max_poll_records": max_poll_records,
            "fetch_max_wait_ms": max(10, min(config.max_wait_ms, FETCH_WAIT_MAX_MS)),
            "max_partition_fetch_bytes": 4 << 20,
            **overrides,
        }
        self.topics = list(config.topics)
        self.consumer = consumer_factory(**options)
        self.consumer.subscribe(
            topics=self.topics,
            listener=RebalanceHandler(on_assign or (lambda _: None), on_revoke or (lambda _: None)),
        )

    def poll(
        self, batch_size: int, max_wait_ms: int, stop: Callable[[], bool] = lambda: False
    ) -> dict[TopicPartition, list]:
        deadline = time.monotonic() + max_wait_ms / 1000.0
        out: dict[TopicPartition, list] = {}
        count = 0
        while True:
            # Once something is in hand, only top up from what the client already fetched.
            wait_ms = 0 if count else int(max(0.0, deadline - time.monotonic()) * 1000)
            added = _merge(
                out, self.consumer.poll(timeout_ms=wait_ms, max_records=batch_size - count)
            )
            if count and not added:
                break
            count += added
            if count >= batch_size or stop() or (not count and wait_ms <= 0):
                break
        # kafka-python signals an empty wait with an exception whose traceback and the client's
        # future form a reference cycle holding every frame on the stack, this one included. So
        # that the cycle does not keep the batch alive until the next full collection (measured:
        # ~190,000 objects and 280 ms pauses), this frame hands the records over and keeps none.
        return _hand_over(out)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit `offsets` (the next offset to read, per partition); raises KafkaError."""
        if offsets:
            self.consumer.commit(
                {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
            )

    def commit_async(
        self,
        offsets: Mapping[TopicPartition, int],
        callback: Callable[[dict, Any], None] | None = None,
    ) -> None:
        """Send a commit without waiting; `callback(offsets, response_or_exception)` runs later,
        inside a poll. Later commits supersede earlier ones, so a lost one costs nothing."""
        if offsets:
            self.consumer.commit_async(
                {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()},
                callback=callback,
            )

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def lag(self, timeout_ms: int = 2000) -> dict[TopicPartition, int]:
        """Records between the consumer's position and the end of each assigned partition.

        Asks the broker for the end offsets: raises KafkaError (KafkaTimeoutError) when it cannot
        be reached, which makes it the worker's broker health probe too.
        """
        assigned = list(self.consumer.assignment())
        if not assigned:
            return {}
        ends = self.consumer.end_offsets(assigned, timeout_ms=timeout_ms)
        lags = {}
        for tp in assigned:
            # The high watermark of the last fetch response as well: tansu answers ListOffsets
            # (latest) with the base offset of the partition's last batch, short by up to a batch.
            known = [o for o in (ends.get(tp), self.consumer.highwater(tp)) if o is not None]
            if not known:
                continue
            end = max(known)
            try:
                position = self.consumer.position(tp, timeout_ms=timeout_ms)
            except KafkaError:
                position = None
            lags[tp] = max(0, end - position) if position is not None else end
        return lags

    def close(self) -> None:
        """Leave the group (without committing anything more)."""
        try:
            self.consumer.close(autocommit=False)
        except KafkaError as exc:
            log.warning("closing the consumer: %s", exc)


def _merge(out: dict[TopicPartition, list], polled: dict[TopicPartition, list]) -> int:
    """Append a poll's records to `out`, per partition; returns how many."""
    added = 0
    for tp, records in polled.items():
        if records:
            held = out.setdefault(tp, [])
            held.extend(records)
            added += len(records)
    return added


def _hand_over(out: dict[TopicPartition, list]) -> dict[TopicPartition, list]:
    moved = dict(out)
    out.clear()
    return moved


class KafkaSink:
    """Messages to one topic, keyed; `flush` raises DeliveryError unless all were acknowledged.

    A failed message is kept and sent again by the next `flush(retry=True)`, so a broker outage
    delays a batch's commit but loses nothing.
    """

    def __init__(
        self,
        config: KafkaConfig,
        topic: str,
        *,
        producer: Any | None = None,
        linger_ms: int = 5,
        **overrides: Any,
    ) -> None:
        self.topic = topic
        self.sent = 0
        self._owns_producer = producer is None
        self.producer = producer or KafkaProducer(
            **{
                **client_options(config),
                "acks": "all",
                "linger_ms": linger_ms,
                "batch_size": 256 * 1024,
                "max_block_ms": 10_000,
                **overrides,
            }
        )
        self._pending: list[tuple[bytes, bytes, Any]] = []

    def add(self, key: bytes, value: bytes) -> None:
        self._pending.append((key, value, self._send(key, value)))

    def add_many(self, messages: Iterable[tuple[bytes, bytes]]) -> None:
        for key, value in messages:
            self.add(key, value)

    def _send(self, key: bytes, value: bytes) -> Any:
        try:
            return self.producer.send(self.topic, key=key, value=value)
        except KafkaError as exc:  # buffer full / metadata timeout: sent again by flush
            return exc

    @property
    def pending(self) -> int:
        return len(self._pending)

    def acknowledged(self) -> bool:
        """Whether the broker has answered every message added since the last flush (which
        then only checks the answers, without waiting)."""
        return all(not isinstance(f, Exception) and f.is_done for _, _, f in self._pending)

    def flush(self, timeout: float | None = 30.0) -> int:
        """Wait for every message added since the last successful flush; returns how many.

        Raises DeliveryError when any failed or did not finish in `timeout` seconds; the failed
        ones are sent again on the next call.
        """
        if not self._pending:
            return 0
        try:
            self.producer.flush(timeout=timeout)
        except KafkaError as exc:
            raise DeliveryError(f"{self.topic}: flush did not finish: {exc}") from exc
        failed: list[tuple[bytes, bytes, Any]] = []
        first_error: object = None
        for key, value, future in self._pending:
            if isinstance(future, Exception):
                error: object = future
            elif not future.is_done:
                error = "not acknowledged in time"
            elif future.failed():
                error = future.exception
            else:
                continue
            first_error = first_error or error
            failed.append((key, value, future))
        if failed:
            # Send the failed ones again now; the next flush waits for them.
            self._pending = [(k, v, self._send(k, v)) for k, v, _ in failed]
            raise DeliveryError(
                f"{self.topic}: {len(failed)} message(s) not delivered ({first_error})"
            )
        done = len(self._pending)
        self.sent += done
        self._pending = []
        return done

    def close(self, timeout: float = 5.0) -> None:
        if self._owns_producer:
            try:
                self.producer.close(timeout=timeout)
            except KafkaError as exc:
                log.warning("closing the %s producer: %s", self.topic, exc)


def iso_time(seconds: float) -> str:
    """RFC 3339 UTC with milliseconds.

    >>> iso_time(1795514400.012)
    '2026-11-24T10:00:00.012Z'
    """
    stamp = np.datetime64(int(round(seconds * 1000.0)), "ms")
    return str(np.datetime_as_string(stamp, unit="ms")) + "Z"


def alert_record(
    *,
    topic: str,
    partition: int,
    offset: int,
    stream: str,
    ts: float,
    score: float,
    threshold: float,
    error: float,
    features: Sequence[str],
    observed: Sequence[float],
    expected: Sequence[float],
    contributions: Sequence[float],
    model_version: str,
    detected_at: float,
    attrs: Sequence[str] = (),
    observed_attrs: Sequence[str] = (),
) -> bytes:
    """The alert message of DESIGN.md; `alert_id` is the input record's topic:partition:offset.

    A model with categorical `attrs` adds their observed values, and their shares of the blame
    after the features' in `contributions` (a card used in a category its owner never uses).

    >>> orjson.loads(alert_record(topic="t", partition=3, offset=7, stream="pump-1", ts=0.0,
    ...     score=0.99999, threshold=0.9999, error=7.5, features=["x"], observed=[96.0],
    ...     expected=[71.5], contributions=[1.0], model_version="v1", detected_at=0.012))
    ... # doctest: +NORMALIZE_WHITESPACE
    {'alert_id': 't:3:7', 'stream': 'pump-1', 'ts': '1970-01-01T00:00:00.000Z', 'score': 0.99999,
     'threshold': 0.9999, 'error': 7.5, 'observed': {'x': 96.0}, 'expected': {'x': 71.5},
     'contributions': {'x': 1.0}, 'model_version': 'v1', 'detected_at': '1970-01-01T00:00:00.012Z'}
    """
    return orjson.dumps(
        {
            "alert_id": f"{topic}:{partition}:{offset}",
            "stream": stream,
            "ts": iso_time(ts),
            "score": round(float(score), 6),
            "threshold": float(threshold),
            "error": round(float(error), 4),
            "observed": {
                **{name: float(v) for name, v in zip(features, observed, strict=True)},
                **dict(zip(attrs, observed_attrs, strict=True)),
            },
            "expected": {
                name: round(float(v), 4) for name, v in zip(features, expected, strict=True)
            },
            "contributions": {
                name: round(float(v), 4)
                for name, v in zip([*features, *attrs], contributions, strict=True)
            },
            "model_version": model_version,
            "detected_at": iso_time(detected_at),
        }
    )
