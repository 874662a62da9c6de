"""pytest configuration of the Python client tests: the fixtures shared with the shell client's
tests are in prfixtures.py; the Celery tests' broker is here, where both Celery test files get
it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prfixtures import *  # noqa: E402,F401,F403
from prhelpers import free_port, short_tmpdir  # noqa: E402


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def broker():
    """Environment for the worker and the client: Redis on a free loopback port, or the
    filesystem transport."""
    d = short_tmpdir("prc-broker-")
    proc = None
    server = shutil.which("redis-server")
    if server and os.environ.get("PRTEST_BROKER_KIND", "redis") == "redis":
        port = free_port()
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(d), "--logfile", str(d / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _redis_ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("redis-server did not start")
            time.sleep(0.05)
        env = {"PRTEST_BROKER": f"redis://127.0.0.1:{port}/0",
               "PRTEST_BACKEND": f"redis://127.0.0.1:{port}/1"}
    else:
        for sub in ("out", "processed", "results"):
            (d / sub).mkdir()
        env = {"PRTEST_BROKER": "filesystem://", "PRTEST_BACKEND": f"file://{d / 'results'}",
               "PRTEST_FS_DIR": str(d)}
    env["PRTEST_QUEUE"] = "prtest-" + uuid.uuid4().hex[:8]
    yield env
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(d, ignore_errors=True)
