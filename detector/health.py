"""The worker's HTTP side: `/metrics`, `/healthz` (liveness) and `/readyz` (readiness).

`Health` is the state the probes report; the worker calls `beat()` every loop iteration, flips
the readiness conditions, and sets a problem when something outside it is wrong. `start` serves
it, with the metrics registry, from a daemon thread:

>>> import urllib.request
>>> from prometheus_client import CollectorRegistry
>>> health = Health(stuck_after_seconds=60)
>>> server = start("127.0.0.1", 0, registry=CollectorRegistry(), health=health)
>>> urllib.request.urlopen(f"{server.url}/healthz").read()
b'ok\\n'
>>> health.ready, health.missing()
(False, ['model_loaded', 'partitions_assigned'])
>>> health.model_loaded = health.partitions_assigned = True
>>> urllib.request.urlopen(f"{server.url}/readyz").status
200
>>> server.stop()
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

READY_CONDITIONS = ("model_loaded", "partitions_assigned")


class Health:
    """Liveness (the loop beats, no problem is set) and readiness (every condition holds).

    Liveness fails when the last `beat()` is older than `stuck_after_seconds`, or while a problem
    is set (`set_problem("broker unreachable since 10:02:11")`). Readiness fails until every
    condition is true; `model_loaded` and `partitions_assigned` are attributes, and any other
    condition can be declared through `conditions` and flipped with `set_condition`.

    >>> now = [100.0]
    >>> health = Health(stuck_after_seconds=30, clock=lambda: now[0])
    >>> health.live()
    (True, 'ok')
    >>> now[0] = 142.0
    >>> health.live()
    (False, 'loop stuck for 42 s (limit 30 s)')
    >>> health.beat(); health.set_problem("broker unreachable since 10:02:11")
    >>> health.live()
    (False, 'broker unreachable since 10:02:11')
    """

    def __init__(
        self,
        stuck_after_seconds: float = 60.0,
        conditions: Iterable[str] = READY_CONDITIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stuck_after_seconds <= 0:
            raise ValueError(f"stuck_after_seconds must be positive, got {stuck_after_seconds}")
        self.stuck_after_seconds = stuck_after_seconds
        self._clock = clock
        self._last_beat = clock()  # starting counts as a beat: loading a model is not stuck
        self._problem: str | None = None
        self._conditions = dict.fromkeys(conditions, False)
        self._lock = threading.Lock()

    # ---- liveness -------------------------------------------------------------------------

    def beat(self) -> None:
        """The loop is alive: call once per iteration (an empty poll counts)."""
        self._last_beat = self._clock()

    def set_problem(self, text: str) -> None:
        """Fail liveness with `text` until `clear_problem()`."""
        with self._lock:
            self._problem = text

    def clear_problem(self) -> None:
        with self._lock:
            self._problem = None

    @property
    def problem(self) -> str | None:
        return self._problem

    def live(self) -> tuple[bool, str]:
        """(alive, reason): 'ok', the problem's text, or how long the loop has been stuck."""
        problem = self._problem
        if problem is not None:
            return False, problem
        silent = self._clock() - self._last_beat
        if silent > self.stuck_after_seconds:
            return False, f"loop stuck for {silent:.0f} s (limit {self.stuck_after_seconds:g} s)"
        return True, "ok"

    # ---- readiness ------------------------------------------------------------------------

    def set_condition(self, name: str, ok: bool) -> None:
        with self._lock:
            if name not in self._conditions:
                raise KeyError(
                    f"unknown readiness condition {name!r}; known: {list(self._conditions)}"
                )
            self._conditions[name] = bool(ok)

    def missing(self) -> list[str]:
        """The readiness conditions that do not hold, in declaration order."""
        with self._lock:
            return [name for name, ok in self._conditions.items() if not ok]

    @property
    def ready(self) -> bool:
        return not self.missing()

    @property
    def model_loaded(self) -> bool:
        return self._conditions.get("model_loaded", False)

    @model_loaded.setter
    def model_loaded(self, ok: bool) -> None:
        self.set_condition("model_loaded", ok)

    @property
    def partitions_assigned(self) -> bool:
        return self._conditions.get("partitions_assigned", False)

    @partitions_assigned.setter
    def partitions_assigned(self, ok: bool) -> None:
        self.set_condition("partitions_assigned", ok)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the http.server spelling)
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, encoder(self.server.registry), content_type)
            elif path == "/healthz":
                alive, reason = self.server.health.live()
                self._text(200 if alive else 503, reason)
            elif path == "/readyz":
                missing = self.server.health.missing()
                self._text(
                    503 if missing else 200,
                    f"not ready: {', '.join(missing)} missing" if missing else "ready",
                )
            elif path == "/":
                self._text(200, "detector: /metrics /healthz /readyz")
            else:
                self._text(404, f"no such endpoint: {path}")
        except Exception:  # a broken collector must not kill the server thread
            log.exception("error serving %s", self.path)
            self._text(500, "internal error; see the worker's log")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _text(self, status: int, text: str) -> None:
        self._reply(status, (text + "\n").encode(), "text/plain; charset=utf-8")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # probes every few s: not INFO
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, health: Health):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.health = health
        super().__init__(address, _Handler)


class HealthServer:
    """The running HTTP server: `port` is the bound port (useful after asking for port 0)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        self.health = health
        self._server = _Server((host, port), registry, health)
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"detector-http-{self.port}",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("serving /metrics /healthz /readyz on %s:%d", self.host, self.port)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread; safe to call twice."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout)
        self._server.server_close()

    def __enter__(self) -> HealthServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    host: str,
    port: int,
    *,
    registry: CollectorRegistry,
    health: Health | None = None,
) -> HealthServer:
    """Serve `registry` and `health` on (host, port) from a daemon thread; port 0 picks one.

    With `metrics.Metrics`, pass `registry=metrics.registry`. Raises OSError when the port is
    taken.
    """
    return HealthServer(host, port, registry, health or Health()).start()
