"""The embedded broker speaks enough Kafka for producers, consumer groups and admin calls."""

from __future__ import annotations

import json
import socket
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from detector.broker import EmbeddedBroker
from detector.errors import BrokerError


def consume(consumer: KafkaConsumer, count: int, timeout: float = 30.0) -> list:
    """Poll until `count` records arrived or `timeout` seconds passed."""
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


def test_records_round_trip_through_a_consumer_group(broker: EmbeddedBroker, topic: str) -> None:
    sent = [
        {"stream": f"pump-{i % 7}", "seq": i, "values": {"temperature": 20.0 + i}}
        for i in range(100)
    ]
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
    try:
        for record in sent:
            producer.send(
                topic, key=str(record["stream"]).encode(), value=json.dumps(record).encode()
            )
        producer.flush(timeout=10)
    finally:
        producer.close(timeout=5)

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        group_id=f"{topic}-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    try:
        received = consume(consumer, len(sent))
        consumer.commit()
        assert consumer.committed(TopicPartition(topic, 0)) == len(sent)
    finally:
        consumer.close()

    assert [record.offset for record in received] == list(range(100))
    assert [record.key.decode() for record in received] == [
        str(record["stream"]) for record in sent
    ]
    assert [json.loads(record.value) for record in received] == sent


def test_create_topics_is_idempotent_and_honours_partitions(
    broker: EmbeddedBroker, topic: str
) -> None:
    broker.create_topics([topic])  # exists already: no error
    wide = f"{topic}-wide"
    broker.create_topics([wide], partitions=3)
    broker.create_topics([wide], partitions=3)
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
    try:
        assert consumer.partitions_for_topic(wide) == {0, 1, 2}
        assert consumer.partitions_for_topic(topic) == {0}
    finally:
        consumer.close()


def test_create_topics_rejects_a_bad_name(broker: EmbeddedBroker) -> None:
    with pytest.raises(BrokerError, match="invalid topic name"):
        broker.create_topics(["no spaces allowed"])


def test_stop_ends_the_process_and_frees_the_port() -> None:
    broker = EmbeddedBroker(stop_timeout=5.0)
    with broker:
        port = broker.port
        assert port is not None
        assert broker.running
        process = broker._process
        assert process is not None
    assert not broker.running
    assert process.returncode is not None
    broker.stop()  # a second stop is harmless

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    # Nothing listens any more: the port can be bound again (SO_REUSEADDR skips TIME_WAIT).
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
