"""Issue 12, 1: the socket options of the connections the relay accepts, read from outside it.

The relay set `.socketOption(.tcp_nodelay)` on every accepted HTTP/WebSocket connection: level
SOL_SOCKET, where option 1 (TCP_NODELAY's number) is SO_DEBUG, which needs CAP_NET_ADMIN. As
any user but root every connection failed; as root each one got SO_DEBUG, and TCP_NODELAY too,
which NIO's ClientBootstrap sets at IPPROTO_TCP by default (so a root relay shows the defect as
SO_DEBUG 1, not as TCP_NODELAY 0). These tests take the relay's own accepted socket with
pidfd_open + pidfd_getfd (a duplicate of the relay's descriptor, so getsockopt reads the very
socket the relay writes to) and read its options: TCP_NODELAY on, SO_DEBUG off.

pidfd_getfd needs ptrace rights over the relay (root, or the same user under Yama's
ptrace_scope 0 or 1 for a child): without them, or on a kernel before 5.6, the tests skip.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket

import pytest

from relaylib import RawWS, drops_privileges

# Syscalls added since Linux 5.1 have one number on every architecture but alpha.
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
_GENERIC_NUMBERS = {"x86_64", "aarch64", "arm64", "armv7l", "i686", "i386", "ppc64le", "s390x", "riscv64"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: int) -> int:
    result = _libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _skip_unless_possible(pid: int) -> None:
    if platform.system() != "Linux" or platform.machine() not in _GENERIC_NUMBERS:
        pytest.skip(f"pidfd_open/pidfd_getfd numbers are known here for Linux on "
                    f"{sorted(_GENERIC_NUMBERS)}, not {platform.system()} {platform.machine()}")
    try:
        os.listdir(f"/proc/{pid}/fd")
    except PermissionError:
        pytest.skip(f"cannot list /proc/{pid}/fd: taking the relay's socket needs root or "
                    "ptrace rights over the relay")


def accepted_socket(pid: int, client: socket.socket) -> socket.socket:
    """A duplicate of the socket in process `pid` that is the other end of `client`: its local
    address is the client's peer, and its peer the client's local address. Only getsockopt may be
    used on it (shutdown would act on the relay's connection too); closing it closes the duplicate
    only."""
    want = (client.getpeername(), client.getsockname())
    _skip_unless_possible(pid)
    try:
        pidfd = _syscall(SYS_PIDFD_OPEN, pid, 0)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            pytest.skip("pidfd_open is not available (Linux 5.3 or later)")
        raise
    seen = []
    try:
        for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:  # closed meanwhile
                continue
            try:
                fd = _syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            except OSError as e:
                if e.errno == errno.ENOSYS:
                    pytest.skip("pidfd_getfd is not available (Linux 5.6 or later)")
                if e.errno == errno.EPERM:
                    pytest.skip(f"pidfd_getfd on process {pid} was refused: taking the relay's "
                                "socket needs root or ptrace rights over the relay")
                if e.errno == errno.EBADF:  # closed meanwhile
                    continue
                raise
            dup = socket.socket(fileno=fd)
            if dup.family in (socket.AF_INET, socket.AF_INET6) and dup.type == socket.SOCK_STREAM:
                try:
                    pair = (dup.getsockname(), dup.getpeername())
                except OSError:  # a listening socket has no peer
                    pair = None
                seen.append(pair)
                if pair == want:
                    return dup
            dup.close()
    finally:
        os.close(pidfd)
    raise AssertionError(f"no socket of process {pid} is the other end of {want}; TCP sockets "
                         f"seen (local, peer): {seen}")


def open_connection(relay, kind: str) -> socket.socket | RawWS:
    """A connection the relay has accepted and serves, left open: a WebSocket after its 101, or
    an HTTP/1.1 keep-alive connection after a complete answer to GET /healthz."""
    if kind == "websocket":
        ws = RawWS.for_relay(relay)
        assert ws.status == 101, (ws.status, ws.headers)
        return ws
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    s.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"the relay closed the connection before answering: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", head
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "the relay closed the connection in the middle of its answer"
        body += chunk
    return s


def check_options(relay, kind: str) -> None:
    conn = open_connection(relay, kind)
    client = conn.sock if isinstance(conn, RawWS) else conn
    try:
        server_side = accepted_socket(relay.proc.pid, client)
        try:
            got = {
                "TCP_NODELAY": bool(server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)),
                "SO_DEBUG": server_side.getsockopt(socket.SOL_SOCKET, socket.SO_DEBUG),
            }
        finally:
            server_side.close()
        assert got == {"TCP_NODELAY": True, "SO_DEBUG": 0}, (
            f"options of the relay's accepted {kind} connection: {got}\n{relay.log_tail(4000)}")
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["http", "websocket"])
def test_accepted_connection_has_tcp_nodelay_and_no_so_debug(relay, kind):
    """As users run it (unprivileged when the tests run as root): the connection is served, and
    the relay's socket has TCP_NODELAY and not SO_DEBUG."""
    check_options(relay, kind)


@pytest.mark.parametrize("kind", ["http", "websocket"])
def test_accepted_connection_of_a_root_relay(relay_factory, kind):
    """The same for a relay running as root, where setting SO_DEBUG succeeded: only a root relay
    shows that the option was set on each connection rather than refused."""
    if not drops_privileges():
        pytest.skip("the tests do not run as root: the relay runs as this user, as in the test above")
    relay = relay_factory(start=False)
    # needs root: as root the SOL_SOCKET option 1 (SO_DEBUG) was set instead of refused, which
    # only a relay running as root can show
    relay.unprivileged = False
    relay.start()
    check_options(relay, kind)
