"""The shipped systemd units: they verify, they are hardened, and socket activation by
systemd's own tool serves events (issue: systemd)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from relaylib import free_port, mint_jwt, relay_bin, require_bin, short_tmpdir

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: .ci/run installs Debian's systemd package")
        pytest.skip(f"{tool} not installed (apt-get install systemd)")
    return path


def installable_units(tmp: Path) -> Path:
    """The units as shipped, with ExecStart pointing at the binary under test."""
    require_bin()
    for name in ("progress-relay.service", "progress-relay.socket"):
        text = (UNITS / name).read_text()
        (tmp / name).write_text(text.replace("/usr/local/bin/progress-relay", relay_bin()))
    return tmp


def test_units_verify():
    tool = need("systemd-analyze")
    tmp = installable_units(short_tmpdir("units-"))
    result = subprocess.run([tool, "verify", "--man=no", "progress-relay.socket", "progress-relay.service"],
                            cwd=tmp, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_service_is_hardened():
    tool = need("systemd-analyze")
    tmp = installable_units(short_tmpdir("units-"))
    result = subprocess.run([tool, "security", "--offline=yes", "--no-pager", "progress-relay.service"],
                            cwd=tmp, capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for progress-relay.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    # 'OK' starts below 2.0 on systemd's scale (0 safest, 10 unprotected).
    assert float(match.group(1)) < 2.0, result.stdout[-3000:]


def test_units_say_what_the_contract_and_issue_ask():
    service = (UNITS / "progress-relay.service").read_text()
    sock = (UNITS / "progress-relay.socket").read_text()
    assert "ListenStream=/run/progress.sock" in sock
    assert "SocketMode=0660" in sock and "SocketGroup=progress" in sock
    for line in ["Type=notify", "StateDirectory=", "EnvironmentFile=", "LimitNOFILE=", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SystemCallFilter=@system-service",
                 "WatchdogSec="]:
        assert line in service, line


def test_systemd_socket_activate_starts_a_relay_that_serves():
    tool = need("systemd-socket-activate")
    require_bin()
    tmp = short_tmpdir("ssa-")
    secret = b"systemd-socket-activate-secret-0123456789"
    (tmp / "secret").write_bytes(secret)
    sock_path = str(tmp / "p.sock")
    port = free_port()
    log = open(tmp / "relay-stderr.log", "wb")
    proc = subprocess.Popen([tool, "-l", sock_path, "--fdname=ingest", relay_bin(), "serve",
                             "--listen", f"127.0.0.1:{port}", "--jwt-secret-file", str(tmp / "secret")],
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock_path):
            assert time.monotonic() < deadline and proc.poll() is None, "no socket from systemd-socket-activate"
            time.sleep(0.02)
        # The first connection makes systemd-socket-activate exec the relay with the socket.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock_path)
            s.sendall(b'{"topic":"activated","type":"progress","progress":7}\nnope\n')
            s.shutdown(socket.SHUT_WR)
            s.settimeout(15)
            answers = b""
            while chunk := s.recv(4096):
                answers += chunk
        assert json.loads(answers) == {"error": "invalid_json", "line": 2}

        import asyncio
        import websockets

        token = mint_jwt(secret, {"sub": "a", "exp": int(time.time()) + 60, "topics": ["activated"]})

        async def newest():
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws?token={token}&topic=activated") as ws:
                subscribed = json.loads(await asyncio.wait_for(ws.recv(), 5))
                event = json.loads(await asyncio.wait_for(ws.recv(), 5))
                return subscribed, event

        subscribed, event = asyncio.run(newest())
        assert subscribed["seq"] == 1
        assert event == {"seq": 1, "topic": "activated", "type": "progress", "progress": 7}
        # The relay did not bind the path itself: it kept systemd's socket.
        log.flush()
        assert "sockets from systemd" in (tmp / "relay-stderr.log").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
