"""--state-file safety (issue 12, section 2): a failed start keeps the file, an unwritable
directory is refused at start, a file that cannot be consumed is not restored, a failed write at
shutdown is an error, and SIGHUP neither kills the relay nor loses its state."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from relaylib import (
    RELAY_UID, _unused_id, async_test, drops_privileges, event_text, expect_close, expect_nothing,
    give_to_relay_user, ping_pong, recv_event_texts, recv_events, recv_json, settle, subscribe,
    wait_until, ws_connect,
)


def ev(topic: str, i: int) -> bytes:
    return b'{"topic":"%s","i":%d}' % (topic.encode(), i)


def error_lines(stderr: bytes) -> list[str]:
    """The relay's own error lines (`progress-relay: ...`), not its log lines (which start with
    a timestamp)."""
    return [l for l in stderr.decode("utf-8", "replace").splitlines()
            if l.startswith("progress-relay:")]


def with_state_file(relay_factory, state: Path | None = None):
    relay = relay_factory(start=False)
    state = state or relay.dir / "state.json"
    relay.extra_args += ["--state-file", str(state)]
    return relay, state


async def publish_and_stop(relay, topic: str, n: int) -> dict:
    """Start the relay, publish n events on `topic`, stop it cleanly (state written).
    Returns the topic's subscribed frame (epoch, seq) before the stop."""
    relay.start()
    lines = [ev(topic, i) for i in range(1, n + 1)]
    assert await relay.aemit(lines) == []
    s = await settle(relay, topic, n)
    assert relay.stop() == 0
    return s


def this_start_log(relay) -> str:
    """What the relay logged since its latest start."""
    return relay.log_text().rsplit("===== start #", 1)[-1]


async def assert_recovered(relay, topic: str, epoch: str, n: int, since: int = 1):
    """A resume with the old epoch is recovered: same epoch, same seq, the missed events."""
    ws = await ws_connect(relay)
    f = await subscribe(ws, topic, epoch=epoch, since=since)
    assert f == {"op": "subscribed", "topic": topic, "epoch": epoch, "seq": n,
                 "recovered": True, "ping_interval": 25}, f"the state was not restored: {f}"
    assert await recv_event_texts(ws, n - since) == [event_text(i, ev(topic, i))
                                                     for i in range(since + 1, n + 1)]
    await expect_nothing(ws, 0.2)
    await ws.close()


# ---------------------------------------------------------------------------------------------
# a start that fails keeps the file

@async_test(timeout=90)
async def test_start_refused_for_a_taken_port_keeps_the_state_file(relay_factory):
    relay, state = with_state_file(relay_factory)
    s0 = await publish_and_stop(relay, "pt", 3)
    kept = state.read_bytes()

    with socket.socket() as blocker:   # someone else listens on the relay's port
        # (past the TIME_WAIT of the connections just closed, as the relay itself would)
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", relay.port))
        blocker.listen()
        cp = await asyncio.to_thread(relay.run_to_exit)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    lines = error_lines(cp.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"progress-relay: --listen 127.0.0.1:{relay.port}"), \
        lines
    assert state.exists(), "a start refused for its port removed the state file"
    assert state.read_bytes() == kept

    relay.start()
    await assert_recovered(relay, "pt", s0["epoch"], 3)


@async_test(timeout=90)
async def test_start_refused_for_a_live_socket_keeps_the_state_file(relay_factory):
    relay, state = with_state_file(relay_factory)
    s0 = await publish_and_stop(relay, "ls", 3)
    kept = state.read_bytes()

    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # a live relay of the same user
    try:
        holder.bind(relay.socket_path)
        holder.listen()
        give_to_relay_user(relay.socket_path)
        cp = await asyncio.to_thread(relay.run_to_exit)
    finally:
        holder.close()   # leaves a stale socket file of the relay's user
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    lines = error_lines(cp.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"progress-relay: --socket {relay.socket_path}:"), \
        lines
    assert state.exists(), "a start refused for a live socket removed the state file"
    assert state.read_bytes() == kept

    relay.start()   # the stale socket file is replaced
    await assert_recovered(relay, "ls", s0["epoch"], 3)


# ---------------------------------------------------------------------------------------------
# the directory must take the file: checked at start

def _read_only_directory(d: Path) -> Path:
    d.mkdir()
    give_to_relay_user(d)
    d.chmod(0o555)   # its owner, the relay's user, may not write there
    return d / "state.json"


def _path_is_a_directory(d: Path) -> Path:
    d.mkdir()
    give_to_relay_user(d)
    return d


STATE_PATHS = {
    "read-only-directory": lambda base: _read_only_directory(base / "ro"),
    "missing-directory": lambda base: base / "missing" / "state.json",
    "path-is-a-directory": lambda base: _path_is_a_directory(base / "isdir"),
}


@pytest.mark.parametrize("make", list(STATE_PATHS.values()), ids=list(STATE_PATHS))
def test_unwritable_state_file_is_refused_at_start_with_status_2(relay_factory, make):
    relay = relay_factory(start=False)
    path = make(relay.dir)
    relay.extra_args += ["--state-file", str(path)]
    cp = relay.run_to_exit(timeout=8)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    lines = error_lines(cp.stderr)
    assert len(lines) == 1, f"expected one error line, got {lines}"
    assert lines[0].startswith(f"progress-relay: --state-file {path}:"), lines
    assert not os.path.exists(relay.socket_path), "the socket was bound before the check"
    assert not os.path.exists(f"{path}.tmp"), "the probe file was left behind"


# ---------------------------------------------------------------------------------------------
# a file that cannot be consumed is not restored

@async_test(timeout=90)
async def test_state_file_that_cannot_be_removed_is_not_restored(relay_factory):
    if not drops_privileges():
        pytest.skip("needs a file of another user: run the tests as root")
    relay, state = with_state_file(relay_factory)
    s0 = await publish_and_stop(relay, "nr", 3)

    # A directory like /tmp (root's, sticky, writable by all): the relay may create and remove
    # its own files there (the .tmp probe passes) but not remove another user's state file.
    shared = relay.dir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    foreign = shared / "state.json"
    os.rename(state, foreign)
    other_uid = _unused_id(RELAY_UID + 1)
    os.chown(foreign, other_uid, other_uid)
    foreign.chmod(0o644)   # readable by the relay's user
    kept = foreign.read_bytes()
    relay.extra_args = ["--state-file", str(foreign)]

    epochs = {s0["epoch"]}
    for start in range(2):   # restored on no start, not only on the first
        relay.start()
        log = this_start_log(relay)
        assert "state file not restored, starting with new epochs" in log, log[-3000:]
        assert "cannot remove it" in log
        ws = await ws_connect(relay)
        f = await subscribe(ws, "nr", epoch=s0["epoch"], since=1)
        assert f["recovered"] is False, f"a state file that could not be removed was restored: {f}"
        assert f["epoch"] not in epochs and f["seq"] == 0, f
        epochs.add(f["epoch"])
        await expect_nothing(ws, 0.2)
        await ws.close()
        assert foreign.read_bytes() == kept
        # the write at shutdown cannot replace the other user's file either: an error
        assert relay.stop() == 1
        assert "could not write the state file" in this_start_log(relay)


# ---------------------------------------------------------------------------------------------
# a failed write at shutdown is an error

def test_failed_state_write_at_shutdown_exits_1(relay_factory):
    relay = relay_factory(start=False)
    d = relay.dir / "state"
    d.mkdir()
    give_to_relay_user(d)
    relay.extra_args += ["--state-file", str(d / "state.json")]
    relay.start()
    assert relay.emit_lines([ev("wf", i) for i in range(1, 4)]) == []
    d.chmod(0o555)   # the directory turns read-only while the relay runs
    rc = relay.stop()
    assert rc == 1, f"exit status {rc} after the state could not be written"
    log = this_start_log(relay)
    assert "could not write the state file" in log, log[-3000:]
    assert not os.path.exists(d / "state.json")


# ---------------------------------------------------------------------------------------------
# SIGHUP

@async_test(timeout=60)
async def test_sighup_is_logged_and_the_relay_keeps_serving(relay_factory):
    relay, state = with_state_file(relay_factory)
    relay.start()
    ws = await ws_connect(relay, topics=["hup"])
    s0 = await recv_json(ws)
    assert await relay.aemit([ev("hup", 1)]) == []
    assert [e["i"] for e in await recv_events(ws, 1)] == [1]

    relay.send_signal(signal.SIGHUP)
    await asyncio.to_thread(wait_until, lambda: "SIGHUP received" in relay.log_text()
                            or not relay.running, 5, what="the SIGHUP notice")
    assert relay.running, f"the relay died on SIGHUP (status {relay.proc.poll()})"
    log_line = [l for l in relay.log_text().splitlines() if "SIGHUP received" in l]
    assert log_line and " notice " in log_line[0], log_line

    # the subscriber is still connected and events still flow
    await ping_pong(ws)
    assert await relay.aemit([ev("hup", 2)]) == []
    assert [e["i"] for e in await recv_events(ws, 1)] == [2]
    status, _ = relay.http("/healthz")
    assert status == 200

    relay.send_signal(signal.SIGTERM)
    frames, code = await expect_close(ws, timeout=5)
    assert code == 1001
    assert await asyncio.to_thread(relay.wait, 6) == 0
    assert state.exists(), "no state written at the SIGTERM after a SIGHUP"
    relay.start()
    await assert_recovered(relay, "hup", s0["epoch"], 2)
