"""Publishers identified by the kernel (issue 14): `--publish-grant WHO=PATTERN` decides, from the
SO_PEERCRED uid/gid and SO_PEERGROUPS groups of whoever connected, which topics an emitter
connection may publish to; a line to any other topic is answered `forbidden_topic` and dropped.
And the ingest socket's path: a symbolic link or a regular file there is never followed, replaced
or chmod-ed.

The emitters run under other uids and groups (setpriv), so most of these tests need root (as CI
runs them); the ids are unused ones, as relaylib picks them, so no user need exist."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from relaylib import (
    RELAY_UID, _unused_id, async_test, drops_privileges, expect_nothing, recv_events, recv_json,
    subscribe, ws_connect,
)

needs_root = pytest.mark.skipif(not drops_privileges(),
                                reason="emitters under other uids and groups need root (setpriv)")

# Unused ids (no passwd or group entry), apart from the relay's own.
UID_A = _unused_id(1234, 1999)
UID_B = _unused_id(62000, 62999)
GID_GRANTED = _unused_id(63000, 63999)
GID_OTHER = _unused_id(GID_GRANTED + 1, 63999)

PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable

# An emitter: connect, send stdin, half-close, print the relay's answers; as whoever runs it.
EMITTER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.stdin.buffer.read())
s.shutdown(socket.SHUT_WR)
out = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    out += chunk
sys.stdout.buffer.write(out)
"""


def emit_as(relay, lines, *, uid: int, gid: int, groups: list[int] | None = None) -> list[dict]:
    """Send `lines` (dicts) from a process running as uid:gid with exactly `groups` as its
    supplementary groups (none when empty or None); the relay's answers, parsed."""
    group_arg = ["--groups=" + ",".join(map(str, groups))] if groups else ["--clear-groups"]
    data = b"".join(json.dumps(l).encode() + b"\n" for l in lines)
    cp = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", *group_arg, "--", PYTHON, "-c", EMITTER,
         relay.socket_path],
        input=data, capture_output=True, timeout=20)
    assert cp.returncode == 0, cp.stderr.decode(errors="replace")
    return [json.loads(l) for l in cp.stdout.splitlines() if l.strip()]


def open_to_everyone(relay) -> None:
    """Let other uids reach the socket: its directory searchable (the socket itself is made
    with --socket-mode 0666)."""
    os.chmod(relay.dir, 0o711)


def forbidden_count(relay) -> float:
    m = re.search(r'^progress_relay_events_rejected_total\{reason="forbidden_topic"\} (\S+)$',
                  relay.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def granted_relay(relay_factory, *grants: str, env=None):
    args = ["--socket-mode", "0666"]
    for g in grants:
        args += ["--publish-grant", g]
    relay = relay_factory(*args, env=env, start=False)
    open_to_everyone(relay)
    relay.start()
    return relay


async def newest_seq(relay, topic: str) -> int:
    ws = await ws_connect(relay)
    try:
        return (await subscribe(ws, topic)).get("seq", 0)
    finally:
        await ws.close()


# ---------------------------------------------------------------------------------------------
# grants by uid, group and {user}

@needs_root
@async_test
async def test_uid_grant_delivers_its_topics_and_refuses_the_others(relay_factory):
    relay = granted_relay(relay_factory, f"uid:{UID_A}=app1:*")
    ws = await ws_connect(relay, topics=["*"])
    assert (await recv_json(ws))["op"] == "subscribed"
    answers = emit_as(relay, [{"topic": "app1:x", "n": 1}, {"topic": "app2:x", "n": 2},
                              {"topic": "app1:x", "n": 3}], uid=UID_A, gid=UID_A)
    assert answers == [{"error": "forbidden_topic", "line": 2}]
    events = await recv_events(ws, 2)
    assert [(e["topic"], e["n"], e["seq"]) for e in events] == [("app1:x", 1, 1), ("app1:x", 3, 2)]
    await expect_nothing(ws)
    assert await newest_seq(relay, "app2:x") == 0, "a forbidden line was published"
    assert forbidden_count(relay) == 1
    # logged with the sender's pid and uid (and the topic)
    log = relay.log_text()
    assert re.search(rf"rejected ingest line.*reason=forbidden_topic.*uid={UID_A}", log) or \
        re.search(rf"rejected ingest line.*uid={UID_A}.*reason=forbidden_topic", log) or \
        ("forbidden_topic" in log and f"uid={UID_A}" in log), log[-3000:]

    # Another uid, and root itself (the test process), are granted nothing: default deny.
    assert emit_as(relay, [{"topic": "app1:x"}], uid=UID_B, gid=UID_B) == \
        [{"error": "forbidden_topic", "line": 1}]
    assert relay.emit_lines([{"topic": "app1:y"}]) == [{"error": "forbidden_topic", "line": 1}]
    await expect_nothing(ws)
    await ws.close()


@needs_root
@async_test
async def test_supplementary_group_grant_and_clear_groups(relay_factory):
    relay = granted_relay(relay_factory, f"gid:{GID_GRANTED}=grp:*")
    ok = emit_as(relay, [{"topic": "grp:1"}], uid=UID_B, gid=UID_B, groups=[GID_OTHER, GID_GRANTED])
    assert ok == []
    assert await newest_seq(relay, "grp:1") == 1
    # the same uid without its supplementary groups
    refused = emit_as(relay, [{"topic": "grp:1"}], uid=UID_B, gid=UID_B, groups=None)
    assert refused == [{"error": "forbidden_topic", "line": 1}]
    # another group only
    refused = emit_as(relay, [{"topic": "grp:1"}], uid=UID_B, gid=UID_B, groups=[GID_OTHER])
    assert refused == [{"error": "forbidden_topic", "line": 1}]
    # the granted gid as the primary group
    assert emit_as(relay, [{"topic": "grp:2"}], uid=UID_B, gid=GID_GRANTED) == []
    assert await newest_seq(relay, "grp:1") == 1
    assert await newest_seq(relay, "grp:2") == 1


@needs_root
@async_test
async def test_user_template_needs_a_passwd_entry(relay_factory):
    try:
        daemon = pwd.getpwnam("daemon")
    except KeyError:
        pytest.skip("no user named daemon here")
    relay = granted_relay(relay_factory, "*=user:{user}:*", "*=uid:{uid}")
    # a uid without a passwd entry: {user} grants nothing ({uid} still does)
    answers = emit_as(relay, [{"topic": f"user:{UID_B}:x"}, {"topic": "user::x"},
                              {"topic": f"uid:{UID_B}"}], uid=UID_B, gid=UID_B)
    assert answers == [{"error": "forbidden_topic", "line": 1}, {"error": "forbidden_topic", "line": 2}]
    # daemon: its own name, nobody else's
    answers = emit_as(relay, [{"topic": "user:daemon:jobs"}, {"topic": "user:root:jobs"}],
                      uid=daemon.pw_uid, gid=daemon.pw_gid)
    assert answers == [{"error": "forbidden_topic", "line": 2}]
    assert await newest_seq(relay, "user:daemon:jobs") == 1
    assert await newest_seq(relay, "user:root:jobs") == 0
    assert await newest_seq(relay, f"uid:{UID_B}") == 1


@needs_root
@async_test
async def test_grants_from_the_environment_newline_separated(relay_factory):
    relay = granted_relay(
        relay_factory, env={"PROGRESS_RELAY_PUBLISH_GRANT": f"uid:{UID_A}=a:*\nuid:{UID_A}=b:*,uid:{UID_A}=c"})
    answers = emit_as(relay, [{"topic": "a:1"}, {"topic": "b:1"}, {"topic": "c"}, {"topic": "d"}],
                      uid=UID_A, gid=UID_A)
    assert answers == [{"error": "forbidden_topic", "line": 4}]


@async_test
async def test_without_publish_grants_every_topic_is_taken(relay):
    assert relay.emit_lines([{"topic": "app2:x"}, {"topic": "anything"}]) == []
    assert forbidden_count(relay) == 0
    assert await newest_seq(relay, "anything") == 1


# ---------------------------------------------------------------------------------------------
# start errors

@pytest.mark.parametrize("grant, words", [
    ("user:nosuchuser=x", 'no user named "nosuchuser"'),
    ("group:nosuchgroup-pr=x", 'no group named "nosuchgroup-pr"'),
    ("app1:*", "expected WHO=PATTERN"),
    ("uid:12x=app1:*", "uid:N needs a number"),
    ("someone:1=x", "unknown WHO"),
    ("uid:1=a*b", "is not a topic or a prefix pattern"),
])
def test_bad_publish_grant_exits_2_naming_the_flag(relay_factory, grant, words):
    relay = relay_factory("--publish-grant", grant, start=False)
    cp = relay.run_to_exit(timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    lines = [l for l in cp.stderr.decode(errors="replace").splitlines() if l.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"progress-relay: --publish-grant {grant}: "), lines
    assert words in lines[0], lines
    assert not os.path.exists(relay.socket_path)


def test_bad_publish_grant_from_the_environment_names_the_variable(relay_factory):
    relay = relay_factory(env={"PROGRESS_RELAY_PUBLISH_GRANT": "user:nosuchuser=x"}, start=False)
    cp = relay.run_to_exit(timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    err = cp.stderr.decode(errors="replace")
    assert "--publish-grant user:nosuchuser=x" in err and "PROGRESS_RELAY_PUBLISH_GRANT" in err, err


# ---------------------------------------------------------------------------------------------
# the socket path: never through a link, never over a file

def _precious(path, mode=0o640) -> None:
    with open(path, "w") as f:
        f.write("precious\n")
    os.chmod(path, mode)
    if drops_privileges():
        # the relay's own file: were it followed, chmod and unlink would succeed
        os.chown(path, RELAY_UID, RELAY_UID)


def _assert_untouched(path, mode=0o640) -> None:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode), stat.filemode(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode, oct(st.st_mode)
    with open(path) as f:
        assert f.read() == "precious\n"


@pytest.mark.parametrize("kind", ["symlink-to-file", "regular-file", "dangling-symlink",
                                  "symlink-to-stale-socket"])
def test_socket_path_that_is_not_a_socket_is_refused_and_left_alone(relay_factory, kind):
    relay = relay_factory("--socket-mode", "0666", start=False)
    target = relay.dir / "target"
    if kind == "symlink-to-file":
        _precious(target)
        os.symlink(target, relay.socket_path)
    elif kind == "regular-file":
        _precious(relay.socket_path)
    elif kind == "dangling-symlink":
        os.symlink(relay.dir / "nowhere", relay.socket_path)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(target))
        s.close()     # a stale socket: nobody listens
        os.chmod(target, 0o600)
        if drops_privileges():
            os.chown(target, RELAY_UID, RELAY_UID)
        os.symlink(target, relay.socket_path)
    cp = relay.run_to_exit(timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    lines = [l for l in cp.stderr.decode(errors="replace").splitlines()
             if l.startswith("progress-relay:")]
    assert lines == [f"progress-relay: --socket {relay.socket_path}: exists and is not a socket; "
                     "refusing to replace it"], lines
    if kind == "regular-file":
        _assert_untouched(relay.socket_path)
        return
    assert os.path.islink(relay.socket_path), "the link was removed"
    if kind == "symlink-to-file":
        _assert_untouched(target)
    elif kind == "symlink-to-stale-socket":
        st = os.lstat(target)
        assert stat.S_ISSOCK(st.st_mode), "the link's target was replaced"
        assert stat.S_IMODE(st.st_mode) == 0o600, "the link's target was chmod-ed"
    else:
        assert not os.path.exists(relay.dir / "nowhere"), "something was made at the link's target"


def test_socket_mode_is_set_on_the_bound_socket(relay_factory):
    relay = relay_factory("--socket-mode", "0604")
    st = os.lstat(relay.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o604
