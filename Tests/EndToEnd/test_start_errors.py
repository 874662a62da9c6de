"""Errors users read (issue 12, section 5): a start refused for an address or a key file is exit
status 2 with one line naming the flag and saying why; argument errors are one line too, and
name the environment variable a bad value came from."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from relaylib import free_port, give_to_relay_user, run_cli, short_tmpdir, write_secret


def nonempty_lines(b: bytes) -> list[str]:
    return [l for l in b.decode("utf-8", "replace").splitlines() if l.strip()]


def one_line(cp) -> str:
    lines = nonempty_lines(cp.stderr)
    assert len(lines) == 1, f"expected a one-line error, got: {lines}"
    assert lines[0].startswith("progress-relay: "), lines
    return lines[0]


@pytest.fixture
def tmp():
    d = short_tmpdir("prerr-")
    give_to_relay_user(d)   # the relay (and run_cli) run as the relay's user when we are root
    yield d
    shutil.rmtree(d, ignore_errors=True)


def secret_file(tmp: Path) -> str:
    return write_secret(tmp / "secret", "s3cret-for-errors-0123456789abcdef-01\n")


def serve(tmp: Path, *extra, socket_path=None, listen=None) -> list[str]:
    return ["serve", "--socket", str(socket_path or tmp / "p.sock"),
            "--listen", listen or f"127.0.0.1:{free_port()}", *extra]


# ---------------------------------------------------------------------------------------------
# addresses

def test_socket_in_a_missing_directory_is_status_2(tmp):
    path = tmp / "no-such-dir" / "p.sock"
    cp = run_cli(serve(tmp, "--jwt-secret-file", secret_file(tmp), socket_path=path), timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    line = one_line(cp)
    assert line.startswith(f"progress-relay: --socket {path}: the directory {tmp / 'no-such-dir'} "
                           "does not exist"), line


def test_port_in_use_is_status_2_in_plain_words(tmp):
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        cp = run_cli(serve(tmp, "--jwt-secret-file", secret_file(tmp), listen=f"127.0.0.1:{port}"),
                     timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    line = one_line(cp)
    assert line.startswith(f"progress-relay: --listen 127.0.0.1:{port}: cannot listen: "
                           "Address already in use"), line
    assert "in use)" not in line and "errno" not in line, f"NIO's wording leaks: {line}"
    assert line.count("(") == line.count(")"), f"unbalanced parentheses: {line}"
    assert not os.path.exists(tmp / "p.sock"), "the socket file is left"


def test_privileged_port_is_status_2_saying_why(tmp):
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        first_unprivileged = int(f.read())
    if first_unprivileged <= 1:
        pytest.skip("every port is unprivileged here (net.ipv4.ip_unprivileged_port_start)")
    port = min(first_unprivileged, 1024) - 1   # the relay runs without CAP_NET_BIND_SERVICE
    cp = run_cli(serve(tmp, "--jwt-secret-file", secret_file(tmp), listen=f"127.0.0.1:{port}"),
                 timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    line = one_line(cp)
    assert line.startswith(f"progress-relay: --listen 127.0.0.1:{port}: cannot listen: "
                           "Permission denied (ports below 1024"), line


# ---------------------------------------------------------------------------------------------
# key files

def _missing(tmp: Path) -> Path:
    return tmp / "nope"


def _no_permission(tmp: Path) -> Path:
    p = tmp / "locked"
    p.write_text("key\n")
    p.chmod(0o000)   # as root: root's file, 0000; the relay's user cannot read it
    return p


def _directory(tmp: Path) -> Path:
    p = tmp / "keys"
    p.mkdir()
    give_to_relay_user(p)
    return p


KEY_FILES = {
    "missing": (_missing, "cannot read the file: no such file"),
    "permission": (_no_permission, "permission denied"),
    "directory": (_directory, "is a directory"),
}


@pytest.mark.parametrize("command, flag", [("serve", "--jwt-secret-file"),
                                           ("serve", "--jwt-public-key-file"),
                                           ("token", "--jwt-secret-file")])
@pytest.mark.parametrize("kind", list(KEY_FILES))
def test_unreadable_key_file_says_why(tmp, kind, command, flag):
    make, why = KEY_FILES[kind]
    path = make(tmp)
    if command == "serve":
        args = serve(tmp, flag, str(path))
    else:
        args = ["token", flag, str(path), "--sub", "u"]
    cp = run_cli(args, timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    line = one_line(cp)
    assert line.startswith(f"progress-relay: {flag} {path}: "), line
    assert why in line, line


# ---------------------------------------------------------------------------------------------
# argument errors

@pytest.mark.parametrize("args, words", [
    (["serve", "--bogus"], ["--bogus"]),
    (["serve", "--history", "abc"], ["--history", "abc"]),
    (["emit", "--bogus"], ["--bogus"]),
    (["token", "--jwt-secret-file", "/nonexistent", "--sub", "u", "--bogus"], ["--bogus"]),
    (["bogus"], ["bogus"]),
], ids=["serve-unknown-flag", "serve-history-not-a-number", "emit-unknown-flag",
        "token-unknown-flag", "unknown-command"])
def test_argument_errors_are_one_line(args, words):
    cp = run_cli(args, timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    line = one_line(cp)
    for w in words:
        assert w in line, line
    assert cp.stdout == b""


def test_negative_history_says_what_is_wrong(tmp):
    cp = run_cli(serve(tmp, "--jwt-secret-file", secret_file(tmp), "--history", "-1"), timeout=10)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    line = one_line(cp)
    assert "--history -1: must be at least 0" in line, line
    assert "Missing value" not in line


def test_bad_value_from_the_environment_names_the_variable(tmp):
    cp = run_cli(serve(tmp, "--jwt-secret-file", secret_file(tmp)), timeout=10,
                 env={"PROGRESS_RELAY_HISTORY": "-1"})
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    line = one_line(cp)
    assert "PROGRESS_RELAY_HISTORY" in line, line
    assert "must be at least 0" in line, line
