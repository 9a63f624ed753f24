"""The daemon loop: poll -> decode -> engine step -> alerts and dead letters -> flush -> commit.

One `Worker` is one consumer-group member. Each micro-batch (at most `engine.batch_size` records:
whatever the client has fetched, without waiting for more) is decoded into the engine's columns
(`Schema.decode_many`; a record that fails becomes a dead letter with the reason, the source
position and the original bytes), stepped through the engine in one call, and its alerts and dead
letters are produced keyed by stream id. Offsets are committed only once every message of the batch
is acknowledged (quix-streams' `Checkpoint.commit` order: sinks, producer, offsets); the wait for
those acknowledgements overlaps the next poll, so it costs no time in the loop; a batch whose
outputs cannot be delivered is retried with backoff and never committed before. An unexpected
exception stops the worker without committing, so Kafka delivers the batch again: at-least-once, and
`alert_id` makes duplicates recognisable.

Lifecycle, after quix-streams' `Application.run`: resources live on an `ExitStack`; SIGTERM and
SIGINT set a stop flag that the loop checks between polls, so the batch in hand is finished,
flushed and committed, then state is checkpointed and the consumer leaves the group. The broker
being unreachable, at start or later, sets a problem on /healthz and the worker retries with
exponential backoff; the per-stream state is saved to `checkpoint.dir` every
`checkpoint.interval_seconds` and on shutdown, and restored at start, so a restart is warm.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka import KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError

from detector import snapshot as snapshots
from detector.allocator import quiet_collector
from detector.artifact import Artifact
from detector.config import Config
from detector.engine import REJECTED, SCORED, WARMUP, Engine
from detector.errors import SnapshotError
from detector.events import DeadLetter, Position, Schema
from detector.health import Health
from detector.health import start as start_http
from detector.kafka_io import DeliveryError, KafkaSink, KafkaSource, alert_record, client_options
from detector.metrics import Metrics

log = logging.getLogger(__name__)

LAG_INTERVAL_SECONDS = 5.0
# How long the outputs of processed batches may await their acknowledgements before the loop
# stops to wait for them (their offsets are committed only then).
UNSETTLED_SECONDS_MAX = 0.25
BACKOFF_START, BACKOFF_MAX = 0.5, 30.0


def schema_for(config: Config, artifact: Artifact) -> Schema:
    return Schema.from_config(config.data, artifact.features, artifact.attrs)


@dataclass
class WorkerSummary:
    """What one run did; `offsets` maps "topic[partition]" to [first offset read, next offset]."""

    records: int = 0
    scored: int = 0
    warmup: int = 0
    invalid: int = 0
    alerts: int = 0
    batches: int = 0
    commits: int = 0
    checkpoints: int = 0
    restored_streams: int = 0
    reasons: Counter = field(default_factory=Counter)
    offsets: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    busy_seconds: float = 0.0
    first_data: float | None = None  # time.monotonic() when the first records arrived
    last_batch: float | None = None  # time.monotonic() when the last batch was committed

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "scored": self.scored,
            "warmup": self.warmup,
            "invalid": self.invalid,
            "alerts": self.alerts,
            "batches": self.batches,
            "commits": self.commits,
            "checkpoints": self.checkpoints,
            "restored_streams": self.restored_streams,
            "invalid_reasons": dict(self.reasons),
            "offsets": self.offsets,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.records / self.seconds) if self.seconds > 0 else None,
        }


class Worker:
    """Consume, score, alert, commit; see the module docstring.

    Parameters
    ----------
    config, artifact
        The validated configuration and the loaded model.
    metrics, health
        Injected for tests; fresh ones by default.
    serve_http
        Serve /metrics, /healthz and /readyz on `metrics.host:metrics.port`.
    on_alert
        Called with each alert's dict once the broker has acknowledged it (the demo prints them).
    install_signals
        Handle SIGTERM/SIGINT while running (only possible in the main thread).
    """

    def __init__(
        self,
        config: Config,
        artifact: Artifact,
        *,
        metrics: Metrics | None = None,
        health: Health | None = None,
        serve_http: bool = True,
        on_alert: Callable[[dict], None] | None = None,
        install_signals: bool = True,
    ) -> None:
        self.config = config
        self.artifact = artifact
        self.schema = schema_for(config, artifact)
        self.engine = Engine.from_config(artifact.model, config, artifact.calibration)
        self.metrics = metrics or Metrics()
        self.health = health or Health(
            stuck_after_seconds=max(60.0, 10 * config.kafka.session_timeout_ms / 1000)
        )
        self.serve_http = serve_http
        self.on_alert = on_alert
        self.install_signals = install_signals
        self.model_sha256 = snapshots.model_hash(artifact.manifest)
        self.checkpoint_path = Path(config.checkpoint.dir) / snapshots.FILENAME
        self.features = list(artifact.features)
        self.attrs = list(artifact.attrs)
        self.threshold = float(self.engine.scorer.threshold)
        self.attr_buckets = artifact.model.config.attr_buckets
        self.summary = WorkerSummary()
        self.http: Any = None
        self._stop = threading.Event()
        self._source: KafkaSource | None = None
        self._producer: Any = None
        self._alerts: KafkaSink | None = None
        self._dead: KafkaSink | None = None
        # Offsets of processed batches: sent (outputs not yet acknowledged), then delivered.
        self._in_flight: dict[TopicPartition, int] = {}
        self._uncommitted: dict[TopicPartition, int] = {}
        self._committing = False  # an async commit awaits its answer
        self._in_flight_since = 0.0  # when the oldest unacknowledged batch was processed
        self._announce: list[bytes] = []  # alerts for `on_alert` once they are acknowledged
        self._failed = False
        self._rebalances = 0
        self._last_checkpoint = time.monotonic()
        self._last_lag = 0.0
        self._assigned_at = math.inf
        self.metrics.set_model(artifact.version or "unknown")
        self.health.model_loaded = True

    # ---- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and shut down cleanly (thread/signal safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _sleep(self, seconds: float) -> None:
        """Back off, waking early on stop; keeps the liveness beat going (we are not stuck)."""
        end = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < end:
            self.health.beat()
            self._stop.wait(min(0.2, max(0.0, end - time.monotonic())))

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if not self.install_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def handler(signum, frame):  # noqa: ARG001
            log.info("received %s: finishing the batch in hand", signal.Signals(signum).name)
            if self._stop.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # ---- run --------------------------------------------------------------------------------

    def run(
        self,
        *,
        max_records: int | None = None,
        duration: float | None = None,
        idle_exit: float | None = None,
    ) -> WorkerSummary:
        """Run until stopped (signal or `stop()`), or a bound: records, seconds, or idle seconds.

        `duration` counts from the end of the kernels' compilation, which happens once before
        the worker joins its group (about a minute after a fresh install, cached after that)."""
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._signals())
            if self.serve_http:
                m = self.config.metrics
                self.http = start_http(
                    m.host, m.port, registry=self.metrics.registry, health=self.health
                )
                stack.callback(self.http.stop)
            seconds = self.engine.warm_up()
            if seconds > 1.0:
                log.info("compiled the engine's kernels in %.0f s (cached for next time)", seconds)
            deadline = time.monotonic() + duration if duration else math.inf
            self._restore()
            if not self._connect(deadline):
                self.summary.seconds = time.monotonic() - started
                return self.summary
            stack.callback(self._close_clients)
            stack.callback(self._shutdown)
            quiet_collector()
            batch_size = self.config.engine.batch_size
            max_wait = self.config.kafka.max_wait_ms
            last_data = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= deadline:
                    log.info("stopping: --duration reached")
                    break
                if max_records is not None and self.summary.records >= max_records:
                    log.info("stopping: %d records read", self.summary.records)
                    break
                # Idle time counts from the latest data or partition assignment (joining takes s).
                if idle_exit is not None and now - max(last_data, self._assigned_at) >= idle_exit:
                    log.info("stopping: no input for %.1f s", idle_exit)
                    break
                want = batch_size
                if max_records is not None:
                    want = min(want, max_records - self.summary.records)
                assert self._source is not None
                generation = self._rebalances
                polled = self._source.poll(want, max_wait, stop=self._stop.is_set)
                if generation != self._rebalances and polled:
                    polled = self._owned(polled)
                self.health.beat()
                # Earlier batches' acknowledgements arrived while this one was fetched.
                if not self._settle(block=False):
                    break
                self._commit_async()
                if polled:
                    if self.summary.first_data is None:
                        self.summary.first_data = time.monotonic()
                    self._process(polled)
                    last_data = self.summary.last_batch = time.monotonic()
                else:
                    self.metrics.last_batch_timestamp.set(time.time())
                self._periodic()
        self.summary.seconds = time.monotonic() - started
        return self.summary

    # ---- connection and retries -----------------------------------------------------------

    def _connect(self, deadline: float) -> bool:
        """Create the consumer and producer, retrying with backoff while the broker is down."""
        kafka = self.config.kafka
        delay = BACKOFF_START
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._producer = KafkaProducer(
                    **client_options(kafka),
                    acks="all",
                    linger_ms=5,
                    batch_size=256 * 1024,
                    max_block_ms=10_000,
                    bootstrap_timeout_ms=5_000,
                )
                self._alerts = KafkaSink(kafka, kafka.alerts_topic, producer=self._producer)
                self._dead = KafkaSink(kafka, kafka.dead_letter_topic, producer=self._producer)
                self._source = self._open_source()
                self.health.clear_problem()
                log.info("connected to %s; subscribed to %s", kafka.bootstrap_servers, kafka.topics)
                return True
            except KafkaError as exc:
                self._close_clients()
                text = f"broker unreachable at {','.join(kafka.bootstrap_servers)}: {exc}"
                self.health.set_problem(text)
                log.warning("%s; retrying in %.1f s", text, delay)
                self._sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        return False

    def _open_source(self) -> Any:
        kafka = self.config.kafka
        if kafka.consumer == "librdkafka":
            from detector.rdkafka_io import RdkafkaSource  # the optional `fast` extra

            return RdkafkaSource(kafka, on_assign=self._on_assign, on_revoke=self._on_revoke)
        return KafkaSource(
            kafka,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            max_poll_records=self.config.engine.batch_size,
            bootstrap_timeout_ms=5_000,
        )

    def _close_clients(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except KafkaError as exc:
                log.warning("closing the producer: %s", exc)
            self._producer = None

    def _settle(self, block: bool = True) -> bool:
        """Wait until the outputs of every processed batch are acknowledged; their offsets then
        become committable. False, with nothing committable, if stopped while the broker is down
        (Kafka then delivers those records again to the next worker).

        Unless `block`, return at once while acknowledgements are still on their way, for up to
        UNSETTLED_SECONDS_MAX: a batch with alerts then costs no round trip of its own.
        """
        if not self._in_flight:
            return True
        assert self._alerts is not None and self._dead is not None
        if (
            not block
            and time.monotonic() - self._in_flight_since < UNSETTLED_SECONDS_MAX
            and not (self._alerts.acknowledged() and self._dead.acknowledged())
        ):
            return True
        if not self._deliver():
            self._failed = True
            return False
        self._uncommitted.update(self._in_flight)
        self._in_flight.clear()
        announce, self._announce = self._announce, []
        if self.on_alert is not None:
            for value in announce:
                self.on_alert(orjson.loads(value))
        return True

    def _deliver(self) -> bool:
        """Flush both sinks until every message is acknowledged; False if stopped first."""
        delay = BACKOFF_START
        while True:
            try:
                assert self._alerts is not None and self._dead is not None
                self._alerts.flush(timeout=10.0)
                self._dead.flush(timeout=10.0)
                if delay != BACKOFF_START:
                    self.health.clear_problem()
                return True
            except DeliveryError as exc:
                self.health.set_problem(f"cannot deliver alerts/dead letters: {exc}")
                log.warning("%s; retrying in %.1f s", exc, delay)
                if self._stop.is_set():
                    return False
                self._sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def _commit(self, retry: bool = True) -> bool:
        """Commit every delivered batch's offsets; retries transient failures with backoff."""
        delay = BACKOFF_START
        while self._uncommitted:
            offsets = dict(self._uncommitted)
            try:
                assert self._source is not None
                self._source.commit(offsets)
                self._committed(offsets)
                if delay != BACKOFF_START:
                    self.health.clear_problem()
                return True
            except CommitFailedError as exc:
                # The group moved on: these partitions are someone else's now, and Kafka will
                # deliver the records again from the last commit.
                log.warning(
                    "commit refused after a rebalance (%s); records will be redelivered", exc
                )
                self._uncommitted.clear()
                return False
            except KafkaError as exc:
                self.health.set_problem(f"cannot commit offsets: {exc}")
                log.warning("commit failed: %s; retrying in %.1f s", exc, delay)
                if not retry or self._stop.is_set():
                    return False
                self._sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        return True

    def _committed(self, offsets: dict[TopicPartition, int]) -> None:
        """The broker took `offsets`: forget those that nothing later has superseded. A
        successful commit also ends the wait for an async one, whose answer, if it never comes
        (a client closed under it), must not stop async commits for good."""
        self.summary.commits += 1
        self._committing = False
        for tp, offset in offsets.items():
            if self._uncommitted.get(tp) == offset:
                del self._uncommitted[tp]

    def _commit_async(self) -> None:
        """Commit the delivered offsets without waiting for the broker's answer.

        Everything committed here was acknowledged by the broker first, so an async commit keeps
        the at-least-once order; what it saves is a round trip per batch. A failed async commit
        is superseded by the next one; shutdown, revoke and checkpoints commit synchronously.
        """
        offsets = dict(self._uncommitted)
        if not offsets or self._source is None or self._committing:
            return

        def done(_answered: dict, response: Any) -> None:
            self._committing = False
            if isinstance(response, Exception):
                log.warning("async commit failed (the next commit covers it): %s", response)
                return
            self._committed(offsets)

        try:
            self._source.commit_async(offsets, done)
            # One commit in flight at a time: sending one per batch while the answers lag
            # queues commits in the client faster than the broker answers them.
            self._committing = True
        except KafkaError as exc:
            log.warning("async commit not sent: %s", exc)

    # ---- rebalance hooks (called from inside poll) -----------------------------------------

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        self._rebalances += 1
        self._assigned_at = time.monotonic()
        log.info("assigned %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        self.health.partitions_assigned = bool(partitions)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        self._rebalances += 1
        log.info("revoked %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        self.health.partitions_assigned = False
        if self._failed:
            return  # quix's rule: never commit for a worker that failed
        revoked = set(partitions)
        if self._settle() and any(tp in revoked for tp in self._uncommitted):
            self._commit(retry=False)
        self.metrics.forget_partitions((tp.topic, tp.partition) for tp in partitions)
        if partitions:
            self._checkpoint()

    def _owned(self, polled: dict) -> dict:
        """Drop records of partitions revoked while the batch was being filled."""
        assert self._source is not None
        owned = self._source.assignment()
        return {tp: records for tp, records in polled.items() if tp in owned}

    # ---- state ------------------------------------------------------------------------------

    def _restore(self) -> None:
        if not self.checkpoint_path.is_file():
            log.info("no checkpoint at %s: starting cold", self.checkpoint_path)
            return
        try:
            loaded = snapshots.restore_engine(
                self.checkpoint_path, self.engine, model_sha256=self.model_sha256
            )
        except SnapshotError as exc:
            log.warning("not restoring state: %s; starting cold", exc)
            return
        self.summary.restored_streams = len(loaded.snapshot.streams)
        self.metrics.observe_engine(self.engine.active_streams, self.engine.evictions)
        log.info("restored %d streams from %s", self.summary.restored_streams, self.checkpoint_path)

    def _checkpoint(self, level: int = logging.INFO) -> None:
        """Save every stream's state, but only when it matches the committed offsets."""
        self._last_checkpoint = time.monotonic()
        if self._in_flight or self._uncommitted or self._failed:
            log.warning("not checkpointing: some processed records are not committed")
            return
        try:
            saved = snapshots.save_engine(
                self.checkpoint_path,
                self.engine,
                model_sha256=self.model_sha256,
                extra={
                    "model_version": self.artifact.version,
                    "offsets": orjson.dumps(self.summary.offsets).decode(),
                },
            )
        except OSError as exc:
            self.metrics.checkpoints.labels(result="failure").inc()
            log.error("checkpoint to %s failed: %s", self.checkpoint_path, exc)
            return
        self.metrics.checkpoints.labels(result="success").inc()
        self.summary.checkpoints += 1
        log.log(
            level,
            "checkpointed %d streams to %s (%.1f MB, %.0f ms)",
            saved.streams,
            saved.path,
            saved.bytes / 1e6,
            saved.seconds * 1000,
        )

    def _periodic(self) -> None:
        now = time.monotonic()
        if now - self._last_checkpoint >= self.config.checkpoint.interval_seconds:
            if self._settle():  # the state saved must match the committed offsets
                self._commit(retry=False)
            self._checkpoint(logging.DEBUG)
        if now - self._last_lag >= LAG_INTERVAL_SECONDS and self._source is not None:
            self._last_lag = now
            try:
                lags = self._source.lag()
            except KafkaError as exc:
                self.health.set_problem(f"broker unreachable: {exc}")
                log.warning("broker unreachable: %s", exc)
                return
            if self.health.problem is not None and self.health.problem.startswith("broker"):
                self.health.clear_problem()
            for tp, lag in lags.items():
                self.metrics.set_consumer_lag(tp.topic, tp.partition, lag)

    def _shutdown(self) -> None:
        """Finish cleanly: deliver and commit what was processed, save state."""
        if self._failed or not self._settle():
            return
        self._commit(retry=False)
        self._checkpoint()

    # ---- one batch --------------------------------------------------------------------------

    def _process(self, polled: dict[TopicPartition, list]) -> None:
        started = time.perf_counter()
        try:
            self._process_inner(polled)
        except BaseException:
            self._failed = True
            raise
        self.summary.busy_seconds += time.perf_counter() - started
        self.metrics.batch_duration.observe(time.perf_counter() - started)

    def _process_inner(self, polled: dict[TopicPartition, list]) -> None:
        received: list = []  # the ConsumerRecords of the batch, in order
        next_offsets: dict[TopicPartition, int] = {}
        offsets = self.summary.offsets
        for tp, polled_records in polled.items():
            received.extend(polled_records)
            next_offsets[tp] = polled_records[-1].offset + 1
            key = f"{tp.topic}[{tp.partition}]"
            span = offsets.get(key)
            if span is None:
                offsets[key] = [polled_records[0].offset, polled_records[-1].offset + 1]
            else:
                span[1] = polled_records[-1].offset + 1
        records = len(received)
        decoded = self.schema.decode_many([rec.value for rec in received], self.attr_buckets)
        dead: list[DeadLetter] = []
        for at, exc in decoded.invalid:
            rec = received[at]
            position = Position(rec.topic, rec.partition, rec.offset)
            dead.append(DeadLetter.from_invalid(exc, position, rec.value or b""))
        kept = [received[at] for at in decoded.kept]  # the ConsumerRecord of each event
        batch = decoded.batch
        result = self.engine.step_many(batch)
        now = time.time()
        outcome = result.outcome

        rejected = np.flatnonzero(outcome == REJECTED)
        for row in rejected.tolist():
            rec = kept[row]
            dead.append(
                DeadLetter(
                    "streams_full",
                    f"stream {batch.streams[row]!r} is new and max_streams "
                    f"({self.engine.max_streams}) streams are active",
                    Position(rec.topic, rec.partition, rec.offset),
                    rec.value or b"",
                )
            )
        assert self._alerts is not None and self._dead is not None
        for letter in dead:
            self._dead.add(self._dead_key(letter, polled), letter.to_json())

        alerts = []
        alert_rows = np.flatnonzero(result.is_alert).tolist()
        version = self.artifact.version
        for row in alert_rows:
            rec = kept[row]
            stream = batch.streams[row]
            value = alert_record(
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                stream=stream,
                ts=float(batch.ts[row]),
                score=float(result.score[row]),
                threshold=self.threshold,
                error=float(result.error[row]),
                features=self.features,
                observed=decoded.values[row].tolist(),
                expected=result.expected[row].tolist(),
                contributions=result.contributions[row].tolist(),
                model_version=version,
                detected_at=now,
                attrs=self.attrs,
                observed_attrs=decoded.attrs[row],
            )
            self._alerts.add(stream.encode("utf-8", "surrogatepass"), value)
            alerts.append(value)

        if not self._in_flight:
            self._in_flight_since = time.monotonic()
        self._in_flight.update(next_offsets)
        if self.on_alert is not None:
            self._announce.extend(alerts)

        reasons = Counter(letter.reason for letter in dead)
        self.metrics.observe_step(result, batch.ts, now, reasons)
        self.metrics.observe_engine(self.engine.active_streams, self.engine.evictions)
        s = self.summary
        s.records += records
        s.batches += 1
        counts = np.bincount(outcome, minlength=3)
        s.scored += int(counts[SCORED])
        s.warmup += int(counts[WARMUP])
        s.invalid += len(dead)
        s.alerts += len(alert_rows)
        s.reasons.update(reasons)

    @staticmethod
    def _dead_key(letter: DeadLetter, polled: dict) -> bytes:
        """The original record's key (its stream id when the producer keyed it)."""
        position = letter.position
        for tp, records in polled.items():
            if tp.topic == position.source and tp.partition == position.partition:
                first = records[0].offset
                index = position.offset - first
                if 0 <= index < len(records) and records[index].offset == position.offset:
                    return records[index].key or b""
                for rec in records:
                    if rec.offset == position.offset:
                        return rec.key or b""
        return b""


@contextlib.contextmanager
def with_embedded_broker(config: Config, enabled: bool, partitions: int = 4) -> Iterator[Config]:
    """With `enabled`, start the embedded broker, create the topics, and point `config` at it.

    `detector run` never starts a broker unless asked (`--embedded-broker`).
    """
    if not enabled:
        yield config
        return
    from detector.broker import EmbeddedBroker

    kafka = config.kafka
    with EmbeddedBroker() as broker:
        broker.create_topics(kafka.topics, partitions=partitions)
        broker.create_topics([kafka.alerts_topic, kafka.dead_letter_topic], partitions=partitions)
        log.info("embedded broker on %s", broker.bootstrap_servers)
        yield config.model_copy(
            update={
                "kafka": kafka.model_copy(update={"bootstrap_servers": [broker.bootstrap_servers]})
            }
        )
