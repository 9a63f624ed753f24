"""EmbeddedBroker without a broker: argument checks and start failures (no tansu needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.broker import EmbeddedBroker
from detector.errors import BrokerError, DetectorError


def test_bootstrap_servers_needs_a_port() -> None:
    assert EmbeddedBroker(port=19092).bootstrap_servers == "127.0.0.1:19092"
    with pytest.raises(BrokerError, match="start"):
        EmbeddedBroker().bootstrap_servers  # noqa: B018


def test_a_binary_that_exits_at_once_raises_with_its_status(tmp_path: Path) -> None:
    script = tmp_path / "fake-tansu"
    script.write_text("#!/bin/sh\necho 'address already in use, or worse' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(BrokerError, match=r"exited with status 3(.|\n)*or worse"):
        EmbeddedBroker(binary=script, log_dir=tmp_path, startup_timeout=5).start()


def test_a_missing_binary_raises_a_detector_error(tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match="cannot start"):
        EmbeddedBroker(binary=tmp_path / "no-such-tansu").start()


def test_create_topics_checks_its_arguments_before_the_broker() -> None:
    broker = EmbeddedBroker(port=19092)
    with pytest.raises(BrokerError, match="partition"):
        broker.create_topics(["events"], partitions=0)
    with pytest.raises(BrokerError, match="not running"):
        broker.create_topics(["events"])
