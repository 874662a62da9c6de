"""Running out of file descriptors: new connections wait or are refused, without a busy loop or
a crash, and the relay serves again once descriptors are free (issue: relay core, operation)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import time
import urllib.request

from relaylib import (
    assert_unprivileged, free_port, give_to_relay_user, require_bin, relay_bin, short_tmpdir,
    unprivileged_prefix, write_secret,
)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_descriptor_exhaustion_neither_spins_nor_crashes():
    require_bin()
    tmp = short_tmpdir("fd-")
    give_to_relay_user(tmp)
    write_secret(tmp / "secret", b"descriptor-limit-secret-0123456789")
    port = free_port()
    sock_path = str(tmp / "p.sock")
    limit = 96

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    log = open(tmp / "relay-stderr.log", "wb")
    relay = subprocess.Popen([*unprivileged_prefix(), relay_bin(), "serve", "--socket", sock_path,
                              "--listen", f"127.0.0.1:{port}",
                              "--jwt-secret-file", str(tmp / "secret")],
                             preexec_fn=low_limit, stdout=subprocess.DEVNULL, stderr=log)
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock_path):
            assert relay.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        assert_unprivileged(relay.pid)

        # Far more connections than descriptors: TCP and Unix-socket clients both.
        for _ in range(150):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            held.append(s)
        for _ in range(60):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(sock_path)
            except (BlockingIOError, OSError):
                pass
            held.append(s)
        time.sleep(0.5)
        assert open_descriptors(relay.pid) <= limit

        before = cpu_seconds(relay.pid)
        time.sleep(2)
        spent = cpu_seconds(relay.pid) - before
        assert relay.poll() is None, "the relay died when it ran out of descriptors"
        # A busy accept loop would burn the whole 2 s; backing off costs next to nothing.
        assert spent < 0.5, f"the relay used {spent:.2f} s of CPU in 2 s while out of descriptors"

        for s in held:
            s.close()
        held.clear()

        # Descriptors free again: it serves HTTP and ingest as before.
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "HTTP did not recover after descriptors were freed"
                time.sleep(0.2)
        deadline = time.monotonic() + 15
        while True:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(sock_path)
                s.sendall(b'{"topic":"after","n":1}\nbroken\n')
                s.shutdown(socket.SHUT_WR)
                answer = s.recv(4096)
            if answer:
                assert json.loads(answer) == {"error": "invalid_json", "line": 2}
                break
            assert time.monotonic() < deadline, "ingest did not recover after descriptors were freed"
            time.sleep(0.2)
        log.flush()
        assert b"cannot accept connections, refusing them" in (tmp / "relay-stderr.log").read_bytes()
    finally:
        for s in held:
            s.close()
        relay.terminate()
        assert relay.wait(10) == 0
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
