"""Integration fixtures: one real tansu broker per session, a fresh topic per test.

Every test under tests/integration/ is marked `integration` here, so `pytest -m integration`
selects exactly these and `pytest -m 'not integration'` runs without a broker.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from detector.broker import EmbeddedBroker

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not just this directory's: filter by path.
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A running embedded broker, shared by the whole session."""
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def topic(broker: EmbeddedBroker, request: pytest.FixtureRequest) -> str:
    """A new, empty one-partition topic named after the test."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:80].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:8]}"
    broker.create_topics([name])
    return name
