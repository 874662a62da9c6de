"""Issue 15, bounded under abuse: the emitter side. --max-emitters (over it the relay stops
accepting; connections wait in the backlog), --max-emitters-per-uid (a uid over its share is
accepted and parked, not read), --emitter-idle-timeout and --emitter-partial-line-timeout (the
contract's drain: read side shut, complete lines published, the partial one dropped, closed),
answers dropped for an emitter that never reads them, rate-limited rejection logs, and fairness
between a flooding and a polite emitter.

The rule behind every bound: an emitter counts a line as written once the kernel took its bytes,
so no test here may lose such a line. The negative timing checks ("nothing arrives within 1 s")
only show that a bound holds; every positive wait is generous."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from relaylib import (
    _unused_id, async_test, drops_privileges, event_text, expect_close, expect_nothing,
    recv_events, recv_json, wait_until, ws_connect,
)

PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
OTHER_UID = _unused_id(1234, 1999)


def connect(relay) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(relay.socket_path)
    return s


def line(topic: str, **fields) -> bytes:
    return json.dumps({"topic": topic, **fields}, separators=(",", ":")).encode() + b"\n"


async def subscriber(relay, *topics):
    ws = await ws_connect(relay, topics=list(topics))
    for _ in topics:
        f = await recv_json(ws)
        assert f["op"] == "subscribed", f
    return ws


def read_to_eof(s: socket.socket, timeout: float) -> bytes:
    """Everything the relay writes until it closes; fails when it does not close in time."""
    s.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            raise AssertionError(f"the relay did not close the emitter connection within {timeout}s")
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def write_fails(s: socket.socket) -> bool:
    """True when a write on `s` fails (the relay shut its reading side, or closed it)."""
    try:
        for _ in range(3):
            s.sendall(line("late", n=1))
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        return True
    return False


def metric(relay, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", relay.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith("VmRSS:"):
                return int(l.split()[1])
    raise AssertionError("no VmRSS")


# An emitter under another uid: connect, send stdin, half-close, print the relay's answers.
EMITTER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
s.sendall(sys.stdin.buffer.read())
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
"""


def emit_as(relay, data: bytes, uid: int) -> None:
    cp = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", PYTHON, "-c", EMITTER,
         relay.socket_path],
        input=data, capture_output=True, timeout=30)
    assert cp.returncode == 0, cp.stderr.decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# --max-emitters

@async_test
async def test_over_max_emitters_the_next_connection_waits_and_loses_nothing(relay_factory):
    relay = relay_factory("--max-emitters", "8", "--max-emitters-per-uid", "8")
    ws = await subscriber(relay, "lim")
    held = []
    for i in range(8):
        s = connect(relay)
        s.sendall(line("lim", c=i))
        held.append(s)
    first = await recv_events(ws, 8)
    assert sorted(e["c"] for e in first) == list(range(8))
    assert relay.stats()["emitter_connections"] == 8

    # The 9th: connect and write succeed (the kernel's backlog), but nothing is read.
    ninth = connect(relay)
    waiting = [line("lim", ninth=k) for k in range(3)]
    ninth.sendall(b"".join(waiting))
    await expect_nothing(ws, 1.0)
    assert relay.stats()["emitter_connections"] == 8

    held.pop().close()          # one closes: the relay accepts again
    got = await recv_events(ws, 3, timeout=10)
    assert [e["ninth"] for e in got] == [0, 1, 2]
    # ... and serves it like any other from then on.
    ninth.sendall(line("lim", ninth=3))
    assert (await recv_events(ws, 1))[0]["ninth"] == 3
    for s in held + [ninth]:
        s.close()
    wait_until(lambda: relay.stats()["emitter_connections"] == 0, 10, what="all emitters gone")


# ---------------------------------------------------------------------------------------------
# --max-emitters-per-uid

@pytest.mark.skipif(not drops_privileges(), reason="an emitter under another uid needs root (setpriv)")
@async_test
async def test_a_uid_over_its_share_is_parked_then_read_losing_nothing(relay_factory):
    relay = relay_factory("--max-emitters", "8", "--max-emitters-per-uid", "4",
                          "--socket-mode", "0666", start=False)
    os.chmod(relay.dir, 0o711)      # other uids reach the socket
    relay.start()
    ws = await subscriber(relay, "uid")
    mine = []
    for i in range(4):              # the test's own uid (root): its whole share
        s = connect(relay)
        s.sendall(line("uid", c=i))
        mine.append(s)
    assert sorted(e["c"] for e in await recv_events(ws, 4)) == [0, 1, 2, 3]

    fifth = connect(relay)          # accepted, parked
    fifth.sendall(b"".join(line("uid", fifth=k) for k in range(3)))
    await expect_nothing(ws, 1.0)
    wait_until(lambda: "emitter connection parked" in relay.log_text(), 5, what="the parked log line")
    assert relay.stats()["emitter_connections"] == 5

    # Another uid is under its own share: read at once while root's fifth stays parked.
    await asyncio.to_thread(emit_as, relay, line("uid", other=1), OTHER_UID)
    got = await recv_events(ws, 1)
    assert got[0].get("other") == 1, got

    mine.pop(0).close()             # root is under its share again: the fifth is read
    got = await recv_events(ws, 3, timeout=10)
    assert [e["fifth"] for e in got] == [0, 1, 2]
    for s in mine + [fifth]:
        s.close()


@async_test
async def test_shutdown_drains_a_parked_connection(relay_factory):
    relay = relay_factory("--max-emitters", "8", "--max-emitters-per-uid", "1")
    ws = await subscriber(relay, "park")
    reading = connect(relay)
    reading.sendall(line("park", n=1))
    assert (await recv_events(ws, 1))[0]["n"] == 1
    parked = connect(relay)
    parked.sendall(line("park", n=2) + line("park", n=3) + b'{"topic":"park","partial":')
    await expect_nothing(ws, 1.0)
    relay.send_signal(signal.SIGTERM)
    frames, code = await expect_close(ws, timeout=6)
    assert code == 1001
    assert [f["n"] for f in frames] == [2, 3]
    assert await asyncio.to_thread(relay.wait, 6) == 0
    reading.close()
    parked.close()


# ---------------------------------------------------------------------------------------------
# --emitter-idle-timeout, --emitter-partial-line-timeout

@async_test
async def test_idle_emitter_is_drained_complete_lines_published_partial_dropped(relay_factory):
    relay = relay_factory("--emitter-idle-timeout", "1")
    ws = await subscriber(relay, "idl")
    s = connect(relay)
    s.sendall(line("idl", n=1) + line("idl", n=2) + b'{"topic":"idl","n":3')
    assert [e["n"] for e in await recv_events(ws, 2)] == [1, 2]
    answers = await asyncio.to_thread(read_to_eof, s, 15)    # closed by the relay
    assert answers == b""
    assert await asyncio.to_thread(write_fails, s)
    await expect_nothing(ws, 0.5)                              # the partial line is dropped
    log = relay.log_text()
    assert any("drained and closed" in l and "reason=idle" in l for l in log.splitlines()), log[-3000:]
    s.close()


@async_test
async def test_an_active_emitter_is_not_idle(relay_factory):
    relay = relay_factory("--emitter-idle-timeout", "2")
    ws = await subscriber(relay, "act")
    s = connect(relay)
    for n in range(16):             # 4 s of lines, one every 0.25 s: never 2 s of silence
        s.sendall(line("act", n=n))
        await asyncio.sleep(0.25)
    assert [e["n"] for e in await recv_events(ws, 16)] == list(range(16))
    s.sendall(line("act", n=16))
    assert (await recv_events(ws, 1))[0]["n"] == 16
    s.close()


@async_test
async def test_a_partial_line_older_than_its_bound_drains_the_connection(relay_factory):
    relay = relay_factory("--emitter-partial-line-timeout", "1")
    ws = await subscriber(relay, "par")
    s = connect(relay)
    s.sendall(line("par", n=1) + b'{"topic":"par","n":2,"slow":"')
    assert (await recv_events(ws, 1))[0]["n"] == 1
    # A byte every 0.2 s: the connection is not idle, yet its line never ends.
    closed_after = None
    t0 = time.monotonic()
    for _ in range(100):
        await asyncio.sleep(0.2)
        try:
            s.sendall(b"x")
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - t0
            break
    assert closed_after is not None, "the relay never drained the connection"
    assert closed_after >= 0.9, closed_after       # not before the bound
    await expect_nothing(ws, 0.5)                  # the partial line is dropped
    log = relay.log_text()
    assert any("drained and closed" in l and "reason=partial_line" in l for l in log.splitlines()), \
        log[-3000:]
    print(f"\npartial line drained {closed_after:.2f} s after it began (bound 1 s)")
    s.close()


# ---------------------------------------------------------------------------------------------
# answers to an emitter that never reads them

def test_unread_answers_are_dropped_and_memory_stays_bounded(relay):
    n = 1_500_000                   # its answers would be about 50 MB
    before = rss_kib(relay.proc.pid)
    s = connect(relay)
    s.settimeout(120)
    chunk = b"x\n" * 50_000
    for _ in range(n // 50_000):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)      # and never read
    wait_until(lambda: relay.stats()["events_rejected"] >= n, 120, interval=0.2,
               what="every bad line read")
    after = rss_kib(relay.proc.pid)
    dropped = metric(relay, "progress_relay_ingest_answers_dropped_total")
    print(f"\nRSS {before} KiB -> {after} KiB; answers dropped {dropped:.0f} of {n}")
    assert dropped >= n - 100_000, dropped
    assert after - before < 24 * 1024, (before, after)
    assert relay.stats()["ingest_answers_dropped"] == dropped
    # The relay still closes it (the answers it could write are never read).
    wait_until(lambda: relay.stats()["emitter_connections"] == 0, 30, what="the connection closed")
    s.close()


# ---------------------------------------------------------------------------------------------
# rejected lines in the log

def test_rejected_lines_are_logged_ten_a_minute_then_summarised(relay):
    answers = relay.emit_lines([b"not json %d" % i for i in range(1000)], timeout=30)
    assert len(answers) == 1000
    wait_until(lambda: "not logged" in relay.log_text(), 10, what="the summary line")
    log = relay.log_text().splitlines()
    logged = [l for l in log if "rejected ingest line" in l]
    summaries = [l for l in log if "rejected on this connection and not logged" in l]
    assert len(logged) == 10, logged
    assert len(summaries) == 1, summaries
    assert "count=990" in summaries[0], summaries[0]


# ---------------------------------------------------------------------------------------------
# fairness

@async_test(timeout=120)
async def test_a_flooding_emitter_does_not_starve_a_polite_one(relay):
    ws = await subscriber(relay, "polite")
    stop = threading.Event()
    flooded = [0]

    def flood():
        s = connect(relay)
        s.settimeout(30)
        payload = b"".join(line("flood", n=i, pad="p" * 100) for i in range(2000))
        try:
            while not stop.is_set():
                s.sendall(payload)
                flooded[0] += len(payload)
        finally:
            s.close()

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    await asyncio.sleep(0.5)
    polite = connect(relay)
    count = 200
    latencies = []

    async def send_polite():
        for i in range(count):
            polite.sendall(line("polite", i=i, t=time.time()))
            await asyncio.sleep(0.01)

    sender = asyncio.create_task(send_polite())
    got = []
    while len(got) < count:
        f = await recv_json(ws, timeout=30)
        assert "op" not in f, f
        latencies.append(time.time() - f["t"])
        got.append(f["i"])
    await sender
    stop.set()
    flooder.join(30)
    polite.close()
    assert got == list(range(count))
    latencies.sort()
    print(f"\nflooder sent {flooded[0] / 1e6:.0f} MB meanwhile; polite latency "
          f"p50 {latencies[count // 2] * 1000:.1f} ms, p99 {latencies[int(count * 0.99)] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms")


# ---------------------------------------------------------------------------------------------
# flags

@pytest.mark.parametrize("args, needle", [
    (["--max-emitters", "0"], "--max-emitters 0"),
    (["--max-emitters", "8", "--max-emitters-per-uid", "9"], "--max-emitters-per-uid 9"),
    (["--max-emitters-per-uid", "0"], "--max-emitters-per-uid 0"),
    (["--emitter-idle-timeout", "0"], "--emitter-idle-timeout"),
    (["--emitter-partial-line-timeout", "-1"], "--emitter-partial-line-timeout"),
    (["--emitter-idle-timeout", "nan"], "--emitter-idle-timeout"),
])
def test_bad_emitter_flags_exit_2(relay_factory, args, needle):
    relay = relay_factory(*args, start=False)
    cp = relay.run_to_exit()
    assert cp.returncode == 2, cp
    assert needle in cp.stderr.decode(), cp.stderr


def test_emitter_flags_from_the_environment(relay_factory):
    relay = relay_factory(start=False, env={"PROGRESS_RELAY_MAX_EMITTERS": "0"})
    cp = relay.run_to_exit()
    assert cp.returncode == 2
    assert "PROGRESS_RELAY_MAX_EMITTERS" in cp.stderr.decode(), cp.stderr
