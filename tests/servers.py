"""Real servers on 127.0.0.1 for tests: an ``mlflow server`` and a moto S3 endpoint.

Session-scoped pytest fixtures (register with ``pytest_plugins = ["tests.servers"]``):

- ``mlflow_server`` -> ``"http://127.0.0.1:PORT"``: ``mlflow server`` in a subprocess, SQLite
  backend and proxied artifacts in a temporary directory, job execution off (0.5 GB instead of
  1.8 GB). Started once per session (~7 s here), killed (its whole process group) at the end.
  :func:`running_mlflow_server` starts one a test owns (to kill it, and start it again).
- ``s3_server`` -> ``"http://127.0.0.1:PORT"``: moto's S3 in a thread, with fake ``AWS_*``
  credentials in the environment for the session.
- ``prefect_server`` -> ``"http://127.0.0.1:PORT/api"``: ``prefect server start`` with its own
  SQLite database; :func:`prefect_cli` runs the ``prefect`` CLI against it.

Nothing starts at import time; a server starts when a test first asks for it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0  # generous: 2 shared cores; usually up in 6-12 s
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, *, timeout_s: float, alive: Callable[[], bool] = lambda: True, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200, ``alive()`` turns false, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    reason = "exited" if not alive() else f"did not answer within {timeout_s:.0f}s"
    raise RuntimeError(f"server at {url} {reason}; log tail:\n{tail}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (mlflow starts uvicorn as a child), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def running_mlflow_server(root: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mlflow server`` on 127.0.0.1 with its store (SQLite + local artifacts) in ``root``: yields its URI and
    process (the leader of its own process group), stops it at exit. Started again on the same ``root`` and
    ``port``, it serves the same store at the same URI (a server back after an outage)."""
    port = port or free_port()
    log = root / "server.log"
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]
    with log.open("ab") as log_file:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", timeout_s=START_TIMEOUT_S, alive=lambda: process.poll() is None, log=log)
        yield uri, process
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of a real ``mlflow server`` (SQLite + local artifacts) for the session."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as (uri, _):
        yield uri


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of moto's S3 on 127.0.0.1, with fake AWS credentials set for the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            env.setenv(key, value)
        for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_SECURITY_TOKEN"):
            env.delenv(key, raising=False)
        try:
            wait_for_http(f"{endpoint}/moto-api/", timeout_s=START_TIMEOUT_S)
            yield endpoint
        finally:
            server.stop()


@contextmanager
def running_prefect_server(home: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`prefect server start` on 127.0.0.1 with its own SQLite database in ``home``: (API URL, the server's process,
    the leader of its process group)."""
    port = free_port()
    log = home / "server.log"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": ""}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout_s=120, alive=lambda: proc.poll() is None, log=log)
        yield f"http://127.0.0.1:{port}/api", proc
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` for the session (:func:`running_prefect_server`); yields the API URL."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-home")) as (url, _):
        yield url


def prefect_cli(args: list[str], env: dict, cwd: Path, timeout: int = 120):
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout
