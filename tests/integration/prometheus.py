"""A real Prometheus server for end-to-end tests: scrape loopback targets, query with PromQL.

`run_prometheus(["127.0.0.1:9108"], tmp_path)` writes a config that scrapes the targets every
second, starts the `prometheus` binary on a free loopback port with its TSDB under `tmp_path`,
waits for `/-/ready` and yields the base URL; leaving the block stops the server.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

PROMETHEUS = shutil.which("prometheus")
JOB = "detector"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@contextmanager
def run_prometheus(
    targets: list[str], tmp_path: Path, startup_timeout: float = 30.0
) -> Iterator[str]:
    """Run Prometheus scraping `targets` (host:port) every second; yields its base URL."""
    if PROMETHEUS is None:
        raise FileNotFoundError("the prometheus binary is not on PATH")
    root = Path(tmp_path) / "prometheus"
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}],
    }
    config_file = root / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_file = root / "prometheus.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {process.returncode}:\n{log_file.read_text()[-4000:]}"
                )
            try:
                if _get(f"{base_url}/-/ready", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"prometheus not ready after {startup_timeout:.0f} s:\n"
                    f"{log_file.read_text()[-4000:]}"
                )
            time.sleep(0.1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def query(base_url: str, promql: str) -> list:
    """The `result` list of an instant query (`[{"metric": {...}, "value": [t, "v"]}, ...]`)."""
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    status, body = _get(url)
    answer = json.loads(body)
    if status != 200 or answer.get("status") != "success":
        raise RuntimeError(f"query {promql!r} failed ({status}): {answer.get('error', body[:200])}")
    return answer["data"]["result"]


def wait_for(base_url: str, promql: str, predicate, timeout: float = 20.0) -> list:
    """Poll `query` until `predicate(result)` holds; returns that result or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    result: list = []
    while time.monotonic() < deadline:
        result = query(base_url, promql)
        if predicate(result):
            return result
        time.sleep(0.25)
    raise TimeoutError(f"{promql!r} did not reach the expected value in {timeout:.0f} s: {result}")
