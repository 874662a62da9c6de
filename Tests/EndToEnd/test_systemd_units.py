"""The shipped systemd units (issue 12, sections 4 and 6).

They verify, they are hardened, and systemd's own `systemd-socket-activate` starts a relay that
serves. Then the relay runs the way the units declare and the README's "Install under systemd"
section sets up, both read at test time, so that a change to either changes this test:

- systemd/progress-relay.service: User, Group, SupplementaryGroups, CapabilityBoundingSet,
  AmbientCapabilities, UMask, NoNewPrivileges, StateDirectory(Mode), EnvironmentFile, ExecStart
  (with ${STATE_DIRECTORY}), WatchdogSec, Type=notify;
- systemd/progress-relay.socket: ListenStream, SocketUser, SocketGroup, SocketMode, Backlog;
- README.md: the groupadd/useradd/usermod/install/tee/chgrp/chown/chmod lines of its sh blocks
  in "Install under systemd", run against a temporary directory standing for the machine's /etc,
  /var/lib and /run, every user and group an unused numeric id (no user is created on the host).

The test process plays systemd (it must be root to give files and processes other owners): it
creates the state directory and the listening socket with the declared owners and modes, passes
the socket as fd 3 (LISTEN_FDS, LISTEN_PID), reads sd_notify datagrams (with the sender's
credentials) and starts the binary through `setpriv` with the declared user, groups, capabilities
and no_new_privs, under the declared umask. Not modelled: the namespaces and filters (ProtectSystem,
PrivateUsers, SystemCallFilter, IPAddressDeny, ...): `systemd-analyze security` covers those.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import grp
import hashlib
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import websockets

import relaylib
from relaylib import (free_port, give_to_relay_user, mint_jwt, relay_bin, require_bin, short_tmpdir,
                      unprivileged_prefix, write_secret)

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
README = REPO / "README.md"
SERVICE = UNITS / "progress-relay.service"
SOCKET = UNITS / "progress-relay.socket"


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


# ============================================================================================
# The unit files, read as systemd reads them (the subset the units use)

def parse_unit(path: Path) -> dict[str, list[str]]:
    """Every assignment of a unit file, by key, in file order: {"User": ["progress-relay"], ...}.
    Keys are unique across the sections of our units; continuation lines are joined."""
    out: dict[str, list[str]] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("["):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {raw!r}"
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def last(unit: dict[str, list[str]], key: str, default: str | None = None) -> str | None:
    values = unit.get(key)
    return values[-1] if values else default


def words(unit: dict[str, list[str]], key: str) -> list[str]:
    """A list setting: assignments add words, an empty assignment resets the list."""
    out: list[str] = []
    for v in unit.get(key, []):
        out = [] if v == "" else out + v.split()
    return out


def capability_set(unit: dict[str, list[str]], key: str) -> tuple[str, frozenset[str]] | None:
    """CapabilityBoundingSet= / AmbientCapabilities=: None when never set (no change), else
    ("only", names) or ("all-but", names), names lower case without CAP_. Lines OR together, a
    "~" line removes (the first one from every capability), an empty assignment resets to the
    empty set (systemd.exec(5))."""
    if key not in unit:
        return None
    kind, caps = "only", set()
    for i, v in enumerate(unit[key]):
        names = {n.lower().removeprefix("cap_") for n in v.lstrip("~").split()}
        if v == "":
            kind, caps = "only", set()
        elif v.startswith("~"):
            if i == 0:
                kind, caps = "all-but", names
            elif kind == "only":
                caps -= names
            else:
                caps |= names
        else:
            caps = caps | names if kind == "only" else caps - names
    return kind, frozenset(caps)


NO_CAPABILITY = ("only", frozenset())


# ============================================================================================
# The machine the README sets up, in a temporary directory

@dataclasses.dataclass
class User:
    name: str
    uid: int
    gid: int                      # primary group
    groups: set[int]              # supplementary groups (the group database's, as initgroups)
    home: str
    shell: str


@dataclasses.dataclass
class Meta:
    uid: int
    gid: int
    mode: int


class Host:
    """/etc, /var/lib, /run and /home of a machine, under `root`; its users and groups, each an
    id no user or group of the real machine has. Files get their owners only as root (the
    ownership is recorded in `meta` either way, for the checks that need no root)."""

    MAPPED = ("/etc/", "/var/lib/", "/run/", "/home/")
    FIRST_ID = 62000   # relaylib's relay user takes the first free id from 61000 on

    def __init__(self, root: Path):
        self.root = root
        self.root.chmod(0o755)
        self.as_root = os.geteuid() == 0
        self.groups: dict[str, int] = {"root": 0}
        self.users: dict[str, User] = {"root": User("root", 0, 0, set(), "/root", "/bin/sh")}
        self.meta: dict[str, Meta] = {}
        self._taken: set[int] = set()
        for d in ("/etc", "/var/lib", "/run", "/home"):
            self.mkdir(d, 0o755, 0, 0)

    # -- ids ---------------------------------------------------------------------------------

    def _unused_id(self) -> int:
        n = self.FIRST_ID
        while True:
            if n not in self._taken:
                try:
                    pwd.getpwuid(n)
                except KeyError:
                    try:
                        grp.getgrgid(n)
                    except KeyError:
                        self._taken.add(n)
                        return n
            n += 1
            assert n < self.FIRST_ID + 5000, "no unused id for the README's users and groups"

    def group(self, name: str) -> int:
        if name not in self.groups:
            self.groups[name] = self._unused_id()
        return self.groups[name]

    def user(self, name: str, *, gid: int | None = None, home: str | None = None,
             shell: str = "/bin/sh") -> User:
        """The user `name`; made (with a group of its own name unless `gid`) when unknown, so
        that a user the README only mentions (the workers', the web application's) exists."""
        if name not in self.users:
            uid = self._unused_id()
            self.users[name] = User(name, uid, gid if gid is not None else self.group(name), set(),
                                    home or f"/home/{name}", shell)
        return self.users[name]

    def uid_gid(self, owner: str | None, group: str | None) -> tuple[int, int]:
        uid = self.user(owner).uid if owner else 0
        gid = self.group(group) if group else (self.user(owner).gid if owner else 0)
        return uid, gid

    def name_of_gid(self, gid: int) -> str:
        return next(n for n, g in self.groups.items() if g == gid)

    # -- files -------------------------------------------------------------------------------

    def mapped(self, path: str) -> bool:
        return any(path.startswith(m) or path + "/" == m for m in self.MAPPED)

    def path(self, path: str) -> Path:
        assert self.mapped(path), f"{path} is outside what the test maps ({', '.join(self.MAPPED)})"
        return self.root / path.lstrip("/")

    def _set(self, path: str, uid: int, gid: int, mode: int) -> None:
        p = self.path(path)
        if self.as_root:
            os.chown(p, uid, gid)
        os.chmod(p, mode)
        self.meta[path.rstrip("/")] = Meta(uid, gid, mode)

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        self.path(path).mkdir(parents=True, exist_ok=True)
        self._set(path, uid, gid, mode)

    def write(self, path: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0,
              truncate_existing: bool = False) -> None:
        """Write a file; with truncate_existing (as tee and shell redirections do) an existing
        file keeps its owner and mode, a new one gets root's and 0666 & ~022."""
        p = self.path(path)
        if truncate_existing and p.exists():
            p.write_bytes(data)
            return
        p.write_bytes(data)
        self._set(path, uid, gid, mode)

    def chown(self, path: str, uid: int | None, gid: int | None) -> None:
        m = self.meta[path]
        self._set(path, m.uid if uid is None else uid, m.gid if gid is None else gid, m.mode)

    def chmod(self, path: str, mode: int) -> None:
        m = self.meta[path]
        self._set(path, m.uid, m.gid, mode)


class ReadmeError(AssertionError):
    pass


def readme_install_commands() -> list[str]:
    """The command lines of the sh blocks in README.md's "Install under systemd" section, with
    continuation lines joined."""
    text = README.read_text()
    start = text.index("## Install under systemd")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        lines += [l.strip() for l in block.replace("\\\n", " ").splitlines() if l.strip()]
    assert lines, "README.md's 'Install under systemd' has no sh block"
    return lines


def _mode(s: str) -> int:
    if not re.fullmatch(r"[0-7]{3,4}", s):
        raise ReadmeError(f"mode {s!r}: the test models octal modes only")
    return int(s, 8)


def _options(args: list[str], with_value: set[str], flags: set[str], cmd: str):
    """(options, positional) of a command's arguments: --opt value, --opt=value, -o value."""
    opts: dict[str, list[str]] = {}
    pos: list[str] = []
    expanded = []
    for a in args:   # -aG: -a -G
        if re.fullmatch(r"-[A-Za-z]{2,}", a):
            expanded += ["-" + c for c in a[1:]]
        else:
            expanded.append(a)
    it = iter(expanded)
    for a in it:
        if a.startswith("-") and a != "-":
            name, eq, value = a.partition("=")
            if name in with_value:
                opts.setdefault(name, []).append(value if eq else next(it))
            elif name in flags:
                opts.setdefault(name, []).append("")
            else:
                raise ReadmeError(f"`{cmd}`: option {a} is not modelled by this test")
        else:
            pos.append(a)
    return opts, pos


def run_readme_install(host: Host) -> list[str]:
    """Apply the README's install commands to `host`. Returns the commands it left out on
    purpose (building, copying the units, systemctl: the test reads the units and starts the
    relay itself). A command it does not know fails the test: teach it, rather than let the
    README and this test drift apart."""
    skipped = []
    for line in readme_install_commands():
        for part in re.split(r"\s&&\s", line):
            tokens = shlex.split(part, comments=True)
            if not tokens:
                continue
            tokens = [t for t in tokens if t not in (">/dev/null", "2>/dev/null")]
            pipeline = [[]]
            for t in tokens:
                if t == "|":
                    pipeline.append([])
                else:
                    pipeline[-1].append(t)
            pipeline = [c[1:] if c and c[0] == "sudo" else c for c in pipeline]
            try:
                if _apply(host, pipeline):
                    skipped.append(part)
            except ReadmeError as e:
                raise ReadmeError(f"README.md, 'Install under systemd': {part!r}: {e}") from None
    return skipped


PRODUCERS = {"head", "base64", "printf", "echo", "openssl", "tr"}


def _apply(host: Host, pipeline: list[list[str]]) -> bool:
    """One pipeline of README commands; True when left out on purpose."""
    if len(pipeline) > 1:
        *producers, sink = pipeline
        if sink[:1] != ["tee"] or len(sink) != 2:
            raise ReadmeError("a pipeline must end in `tee FILE`")
        data = b""
        for i, cmd in enumerate(producers):
            if cmd[0] not in PRODUCERS:
                raise ReadmeError(f"{cmd[0]} in a pipeline is not modelled")
            data = subprocess.run(cmd, input=data if i else None, capture_output=True,
                                  check=True, timeout=10).stdout
        host.write(sink[1], data, truncate_existing=True)
        return False
    cmd, *args = pipeline[0]
    if cmd in ("swift", "systemctl"):
        return True
    if cmd == "cp":
        if all(a.startswith("systemd/progress-relay.") for a in args[:-1]):
            return True   # the units: the test reads them from systemd/
        raise ReadmeError("cp of something else than the units")
    if cmd == "groupadd":
        _, (name,) = _options(args, set(), {"--system", "-r"}, cmd)
        host.group(name)
    elif cmd == "useradd":
        o, (name,) = _options(args, {"--gid", "-g", "--groups", "-G", "--shell", "-s", "--home-dir",
                                     "-d", "--comment", "-c"},
                              {"--system", "-r", "--no-create-home", "-M", "--user-group", "-U",
                               "--create-home", "-m", "--no-user-group", "-N"}, cmd)
        gid_name = (o.get("--gid") or o.get("-g") or [None])[-1]
        if gid_name is None and ("--no-user-group" in o or "-N" in o):
            raise ReadmeError("useradd without a group: the test cannot tell which it gets")
        shell = (o.get("--shell") or o.get("-s") or ["/bin/sh"])[-1]
        home = (o.get("--home-dir") or o.get("-d") or [None])[-1]
        if name in host.users:
            raise ReadmeError(f"user {name} made twice")
        u = host.user(name, gid=host.group(gid_name or name), home=home, shell=shell)
        for g in (o.get("--groups") or o.get("-G") or [""])[-1].split(","):
            if g:
                u.groups.add(host.group(g))
    elif cmd == "usermod":
        o, (name,) = _options(args, {"-G", "--groups"}, {"-a", "--append"}, cmd)
        gs = (o.get("-G") or o.get("--groups"))
        if not gs or not ("-a" in o or "--append" in o):
            raise ReadmeError("usermod models -aG GROUPS USER only")
        u = host.user(name)
        for g in gs[-1].split(","):
            u.groups.add(host.group(g))
    elif cmd == "install":
        o, pos = _options(args, {"-m", "--mode", "-o", "--owner", "-g", "--group"},
                          {"-d", "--directory"}, cmd)
        mode = _mode((o.get("-m") or o.get("--mode") or ["0755"])[-1])
        uid, gid = host.uid_gid((o.get("-o") or o.get("--owner") or [None])[-1],
                                (o.get("-g") or o.get("--group") or [None])[-1])
        if pos and all(p.startswith("/usr/local/share/doc/progress-relay") for p in pos[-1:]):
            return True   # the documentation the units' Documentation= names: nothing to model
        if "-d" in o or "--directory" in o:
            for d in pos:
                host.mkdir(d, mode, uid, gid)
            return False
        *sources, dest = pos
        if not host.mapped(dest):
            if dest.startswith("/usr/local/bin") and \
                    all(s.endswith("/progress-relay") for s in sources):
                return True   # the binary: the test runs $PROGRESS_RELAY_BIN
            raise ReadmeError(f"install into {dest}, which the test does not map")
        for src in sources:
            data = b"" if src == "/dev/null" else host.path(src).read_bytes()
            into_dir = dest.endswith("/") or host.path(dest).is_dir()
            target = dest.rstrip("/") + "/" + src.rsplit("/", 1)[-1] if into_dir else dest
            host.write(target, data, mode=mode, uid=uid, gid=gid)
    elif cmd == "chgrp":
        group, *files = args
        for f in files:
            host.chown(f, None, host.group(group))
    elif cmd == "chown":
        owner, *files = args
        u, _, g = owner.partition(":")
        for f in files:
            host.chown(f, host.user(u).uid if u else None, host.group(g) if g else None)
    elif cmd == "chmod":
        mode, *files = args
        for f in files:
            host.chmod(f, _mode(mode))
    else:
        raise ReadmeError(f"the command {cmd} is not modelled by this test")
    return False


def read_environment_file(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        k, sep, v = line.partition("=")
        assert sep, f"not KEY=VALUE in the environment file: {line!r}"
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1]
        env[k.strip()] = v
    return env


@dataclasses.dataclass
class Installed:
    """What the README and the units make of a machine."""
    host: Host
    service: dict[str, list[str]]
    sock: dict[str, list[str]]
    env_file: str | None              # the EnvironmentFile the unit names, mapped
    env: dict[str, str]               # its variables (paths still the machine's)
    secret_path: str                  # PROGRESS_RELAY_JWT_SECRET_FILE, the machine's path
    service_user: User
    service_gid: int
    service_groups: set[int]          # supplementary: the user's (initgroups) and the unit's
    socket_uid: int
    socket_gid: int
    socket_mode: int
    workers: list[User]               # users the README puts in the socket's group


def install(root: Path) -> Installed:
    host = Host(root)
    run_readme_install(host)
    service, sock = parse_unit(SERVICE), parse_unit(SOCKET)
    user_name = last(service, "User")
    assert user_name and user_name != "root", "the service runs as its own user (User=)"
    user = host.user(user_name)
    group_name = last(service, "Group")
    gid = host.group(group_name) if group_name else user.gid
    groups = set(user.groups) | {host.group(g) for g in words(service, "SupplementaryGroups")}
    groups.discard(gid)

    env_file, env = None, {}
    for spec in service.get("EnvironmentFile", []):
        optional = spec.startswith("-")
        path = spec.lstrip("-")
        if host.path(path).exists():
            env_file = path
            env.update(read_environment_file(host.path(path).read_text()))
        else:
            assert optional, f"EnvironmentFile={spec}: the README does not make it"
    secret_path = env.get("PROGRESS_RELAY_JWT_SECRET_FILE")
    assert secret_path, ("the README's environment file sets no PROGRESS_RELAY_JWT_SECRET_FILE: "
                         "how does the relay find its secret?")
    sock_group = last(sock, "SocketGroup")
    assert sock_group, "the socket unit names no SocketGroup: workers could not be let in"
    socket_gid = host.group(sock_group)
    workers = [u for u in host.users.values() if socket_gid in u.groups and u.name != user_name]
    return Installed(host, service, sock, env_file, env, secret_path, user, gid, groups,
                     host.user(last(sock, "SocketUser", "root")).uid, socket_gid,
                     _mode(last(sock, "SocketMode", "0666")), workers)


# ============================================================================================
# Running as the unit says

# Runs as root, as systemd's child does before it execs: umask, fd 3, LISTEN_*, WATCHDOG_PID;
# then execs setpriv (which drops to the unit's user and execs the relay: one pid throughout).
WRAPPER = r"""
import os, sys
os.umask(int(os.environ.pop("E2E_UMASK"), 8))
src = [int(x) for x in os.environ.pop("E2E_FDS").split(",") if x]
for i, fd in enumerate(src):
    os.dup2(fd, 3 + i, inheritable=True)
for fd in src:
    if fd >= 3 + len(src):
        os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(src))
if "WATCHDOG_USEC" in os.environ:
    os.environ["WATCHDOG_PID"] = str(os.getpid())
os.execv(sys.argv[1], sys.argv[1:])
"""


def setpriv_for(uid: int, gid: int, groups: set[int], *,
                bounding: tuple[str, frozenset[str]] | None = NO_CAPABILITY,
                ambient: tuple[str, frozenset[str]] | None = NO_CAPABILITY,
                no_new_privs: bool = True) -> list[str]:
    """setpriv arguments for a process as uid:gid with exactly `groups`, the capability bounding
    set `bounding` (None: unchanged) and the ambient capabilities `ambient` (capability_set's
    values)."""
    args = [need("setpriv"), f"--reuid={uid}", f"--regid={gid}"]
    args.append(f"--groups={','.join(map(str, sorted(groups)))}" if groups else "--clear-groups")
    if ambient and ambient[1]:
        assert ambient[0] == "only", f"AmbientCapabilities=~... is not modelled: {ambient}"
        caps = ",".join("+" + c for c in sorted(ambient[1]))
        args += [f"--inh-caps=-all,{caps}", f"--ambient-caps={caps}"]
    else:
        args.append("--inh-caps=-all")
    if bounding is not None:
        kind, caps = bounding
        sign = "+" if kind == "only" else "-"
        args.append(("--bounding-set=-all" if kind == "only" else "--bounding-set=+all")
                    + "".join(f",{sign}{c}" for c in sorted(caps)))
    if no_new_privs:
        args.append("--no-new-privs")
    return args + ["--"]


def expand_exec(line: str, env: dict[str, str], binary: str) -> list[str]:
    """ExecStart= as systemd expands it: ${VAR} within a word, $VAR alone splits into words."""
    line = line.lstrip("-@:")
    assert not line.startswith(("+", "!")), f"ExecStart prefix {line[0]} is not modelled: {line}"
    out = []
    for w in shlex.split(line):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", w)
        if m:
            out += env.get(m.group(1), "").split()
            continue
        out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), w))
    if out[0].rsplit("/", 1)[-1] == "progress-relay":
        out[0] = binary
    return out


class NotifySocket:
    """$NOTIFY_SOCKET: datagrams with their sender's credentials (pid, uid, gid)."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o777)   # as systemd's /run/systemd/notify
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[int, int, int, list[str]]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except socket.timeout:
                continue
            except OSError:
                return
            pid = uid = gid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, uid, gid = struct.unpack("iII", payload[:12])
            self.messages.append((pid, uid, gid, data.decode("utf-8", "replace").split("\n")))

    def find(self, key: str, pid: int):
        return next((m for m in self.messages if m[0] == pid and key in m[3]), None)

    def close(self):
        self._stop.set()
        self._t.join(2)
        self.sock.close()


class UnitRelay:
    """The relay as progress-relay.service runs it, with progress-relay.socket's socket."""

    name = "unit-relay"

    def __init__(self, inst: Installed):
        self.inst = inst
        host, service, sock = inst.host, inst.service, inst.sock
        self.port = free_port()

        # progress-relay.socket: systemd binds the path and sets its owner and mode.
        listen = last(sock, "ListenStream")
        assert listen and listen.startswith("/"), f"ListenStream={listen}: a path is modelled"
        self.socket_path = str(host.path(listen))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket_path)
        os.chown(self.socket_path, inst.socket_uid, inst.socket_gid)
        os.chmod(self.socket_path, inst.socket_mode)
        self.listener.listen(int(last(sock, "Backlog", "128")))
        self.fd = fcntl.fcntl(self.listener.fileno(), fcntl.F_DUPFD, 60)

        # StateDirectory=: /var/lib/NAME, made with StateDirectoryMode, owned by User:Group.
        user = inst.service_user
        state_dirs = []
        for name in words(service, "StateDirectory"):
            d = f"/var/lib/{name}"
            host.mkdir(d, _mode(last(service, "StateDirectoryMode", "0755")), user.uid,
                       inst.service_gid)
            state_dirs.append(str(host.path(d)))
        self.state_dirs = state_dirs

        self.notify_path = host.path("/run/notify")
        self.notify = NotifySocket(self.notify_path)

        # The environment systemd gives a service: its own variables, then EnvironmentFile's.
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8", "USER": user.name, "LOGNAME": user.name,
            "HOME": str(host.path(user.home)) if host.mapped(user.home) else user.home,
            "SHELL": user.shell, "INVOCATION_ID": secrets.token_hex(16),
            "NOTIFY_SOCKET": str(self.notify_path),
            "LISTEN_FDNAMES": last(sock, "FileDescriptorName", SOCKET.name),
        }
        if state_dirs:
            env["STATE_DIRECTORY"] = ":".join(state_dirs)
        watchdog = last(service, "WatchdogSec")
        if watchdog:
            env["WATCHDOG_USEC"] = str(int(float(watchdog.rstrip("s")) * 1_000_000))
        for k, v in inst.env.items():
            env[k] = str(host.path(v)) if v.startswith("/") and host.mapped(v) else v
        # Not the unit's: the default port may be taken on a machine that runs tests.
        env.setdefault("PROGRESS_RELAY_LISTEN", f"127.0.0.1:{self.port}")
        self.port = int(env["PROGRESS_RELAY_LISTEN"].rsplit(":", 1)[1])
        self.env = env

        execs = service.get("ExecStart", [])
        assert len(execs) == 1, f"one ExecStart= is modelled: {execs}"
        self.argv = expand_exec(execs[0], env, require_bin())
        self.umask = last(service, "UMask", "0022")
        self.bounding = capability_set(service, "CapabilityBoundingSet")
        self.ambient = capability_set(service, "AmbientCapabilities") or NO_CAPABILITY
        self.no_new_privs = last(service, "NoNewPrivileges", "no") in ("yes", "true", "1", "on")
        self.setpriv = setpriv_for(user.uid, inst.service_gid, inst.service_groups,
                                   bounding=self.bounding, ambient=self.ambient,
                                   no_new_privs=self.no_new_privs)
        self.log_path = host.root / "relay-stderr.log"
        self.stdout_path = host.root / "relay-stdout.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 20.0) -> None:
        self.starts += 1
        cmd = [sys.executable, "-I", "-c", WRAPPER, *self.setpriv, *self.argv]
        with open(self.log_path, "ab") as log, open(self.stdout_path, "ab") as out:
            log.write(f"===== start #{self.starts}: {shlex.join(cmd[4:])}\n".encode())
            log.flush()
            env = dict(self.env, E2E_UMASK=self.umask, E2E_FDS=str(self.fd))
            self.proc = relaylib._retry_busy(lambda: subprocess.Popen(
                cmd, env=env, pass_fds=(self.fd,), stdin=subprocess.DEVNULL, stdout=out,
                stderr=log, cwd="/"))
        deadline = time.monotonic() + timeout
        while self.notify.find("READY=1", self.proc.pid) is None:
            rc = self.proc.poll()
            assert rc is None, f"the relay exited with {rc} before READY=1\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"no READY=1 within {timeout}s\n{self.log_tail()}"
            time.sleep(0.02)

    def stop(self, sig=signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(float(last(self.inst.service, "TimeoutStopSec", "10")))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"the relay did not stop within TimeoutStopSec\n{self.log_tail()}")

    def close(self):
        self.stop()
        self.notify.close()
        os.close(self.fd)
        self.listener.close()

    def log_tail(self, max_chars: int = 20000) -> str:
        try:
            t = self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            t = ""
        return f"----- {self.name} stderr ({self.log_path}) -----\n{t[-max_chars:]}"


# What a worker (or the web application, or the relay's user) runs: stdlib only, one JSON line.
CONNECT_AND_PUBLISH = r"""
import errno, json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": errno.errorcode.get(e.errno, str(e.errno))}))
    sys.exit(0)
s.sendall(sys.argv[2].encode() + b"\n")
s.shutdown(socket.SHUT_WR)
data = b""
while chunk := s.recv(65536):
    data += chunk
print(json.dumps({"connect": "ok", "answers": data.decode()}))
"""

READ_FILE = r"""
import errno, hashlib, json, sys
try:
    with open(sys.argv[1], "rb") as f:
        data = f.read()
except OSError as e:
    print(json.dumps({"open": errno.errorcode.get(e.errno, str(e.errno))}))
    sys.exit(0)
print(json.dumps({"open": "ok", "sha256": hashlib.sha256(data).hexdigest()}))
"""


def run_as(user: User, script: str, *args: str, groups: set[int] | None = None,
           gid: int | None = None) -> dict:
    """A Python snippet as `user` (its groups from the README's group database unless given),
    without capabilities; its one line of JSON output."""
    python = os.path.realpath(sys.executable)   # not the venv's path: other users cannot reach it
    cmd = [*setpriv_for(user.uid, user.gid if gid is None else gid,
                        user.groups if groups is None else groups),
           python, "-I", "-c", script, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd="/",
                       env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert r.returncode == 0 and r.stdout.strip(), (user, r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


# ============================================================================================
# Fixtures

_RUNNING: list[UnitRelay] = []


@pytest.fixture(autouse=True)
def _report_unit_relay():
    # conftest.py attaches the stderr of relaylib._STARTED to a failed test's report; it empties
    # that list before each test, so put the module's relay back in.
    started = getattr(relaylib, "_STARTED", None)
    if started is not None:
        started.extend(r for r in _RUNNING if r not in started)
    yield


@pytest.fixture(scope="module")
def unit():
    """The machine after the README's install section, and the relay running as the units say.
    Needs root: only root can give files and processes the unit's users and groups (CI runs as
    root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test plays systemd, giving the socket, the state directory "
                    "and the relay process the unit's users and groups (CI runs as root)")
    need("setpriv")
    require_bin()
    root = short_tmpdir("unit-")
    relay = None
    try:
        relay = UnitRelay(install(root))
        _RUNNING.append(relay)
        relay.start()
        yield relay
    finally:
        if relay is not None:
            _RUNNING.remove(relay)
            relay.close()
        shutil.rmtree(root, ignore_errors=True)


def the_secret(inst: Installed) -> bytes:
    data = inst.host.path(inst.secret_path).read_bytes()
    return data[:-1] if data.endswith(b"\n") else data   # the relay strips one trailing newline


async def subscribe(relay: UnitRelay, topic: str, secret: bytes, sub: str = "alice"):
    """A browser-side client: a token for `topic` minted with the secret, as the web application
    mints it; returns the open connection and the `subscribed` frame."""
    token = mint_jwt(secret, {"sub": sub, "topics": [topic], "iat": int(time.time()),
                              "exp": int(time.time()) + 300})
    ws = await websockets.connect(f"ws://127.0.0.1:{relay.port}/ws?token={token}",
                                  open_timeout=5, close_timeout=2, ping_interval=None,
                                  **({"proxy": None} if relaylib._SUPPORTS_PROXY else {}))
    await ws.send(json.dumps({"op": "subscribe", "topic": topic}))
    frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert frame.get("op") == "subscribed" and frame.get("topic") == topic, frame
    return ws, frame


async def next_json(ws, timeout: float = 5) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def publish(relay: UnitRelay, worker: User, line: str, **kw) -> dict:
    return run_as(worker, CONNECT_AND_PUBLISH, relay.socket_path, line, **kw)


def outsider(inst: Installed) -> User:
    """A user the README puts in no group: a user of the machine who is no worker."""
    return inst.host.user("outsider-" + secrets.token_hex(3))


# ============================================================================================
# The units as files

def test_units_verify():
    tool = need("systemd-analyze")
    tmp = installable_units(short_tmpdir("units-"))
    result = subprocess.run([tool, "verify", "--man=no", "progress-relay.socket", "progress-relay.service"],
                            cwd=tmp, capture_output=True, text=True, timeout=60)
    shutil.rmtree(tmp, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_service_is_hardened():
    tool = need("systemd-analyze")
    tmp = installable_units(short_tmpdir("units-"))
    result = subprocess.run([tool, "security", "--offline=yes", "--no-pager", "progress-relay.service"],
                            cwd=tmp, capture_output=True, text=True, timeout=60)
    shutil.rmtree(tmp, ignore_errors=True)
    match = re.search(r"Overall exposure level for progress-relay.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    # 'OK' starts below 2.0 on systemd's scale (0 safest, 10 unprotected).
    assert float(match.group(1)) < 2.0, result.stdout[-3000:]


def test_units_say_what_the_contract_and_issue_ask():
    service = SERVICE.read_text()
    sock = SOCKET.read_text()
    assert "ListenStream=/run/progress.sock" in sock
    assert "SocketMode=0660" in sock and "SocketGroup=progress" in sock
    for line in ["Type=notify", "StateDirectory=", "EnvironmentFile=", "LimitNOFILE=", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SystemCallFilter=@system-service",
                 "WatchdogSec="]:
        assert line in service, line


def test_readme_and_units_keep_the_secret_from_the_socket_group():
    """Issue 12, 4: the README put the secret in the socket's group, so every worker could mint a
    token for any topic. As the README's commands leave the machine (ownership as recorded, no
    root needed): the secret is not in the socket's group, not readable by others, and no user the
    README lets write to the socket is its owner or in its group. The kernel's say is in
    test_unit_worker_cannot_read_the_secret_the_service_user_can."""
    root = short_tmpdir("readme-")
    try:
        inst = install(root)
        m = inst.host.meta[inst.secret_path]
        group = inst.host.name_of_gid(m.gid)
        sock_group = last(inst.sock, "SocketGroup")
        assert m.gid != inst.socket_gid, (
            f"{inst.secret_path} is in group {group}, the socket's group: workers can read it")
        assert m.mode & 0o007 == 0, f"{inst.secret_path} is readable by others: {oct(m.mode)}"
        assert inst.workers, f"the README puts no worker in {sock_group}, the socket's group"
        for w in inst.workers:
            assert w.uid != m.uid and m.gid not in w.groups | {w.gid}, (
                f"worker {w.name} can read {inst.secret_path} ({group}, {oct(m.mode)})")
        # The relay's user can (its group or its own), whatever else it is in.
        u = inst.service_user
        assert m.uid == u.uid and m.mode & 0o400 or \
            m.gid in inst.service_groups | {inst.service_gid} and m.mode & 0o040, (
                f"the service user {u.name} cannot read {inst.secret_path}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_systemd_socket_activate_starts_a_relay_that_serves():
    tool = need("systemd-socket-activate")
    require_bin()
    tmp = short_tmpdir("ssa-")
    # The relay runs unprivileged when the tests run as root (relaylib): its directory and secret.
    give_to_relay_user(tmp)
    secret = b"systemd-socket-activate-secret-0123456789"
    write_secret(tmp / "secret", secret)
    sock_path = str(tmp / "p.sock")
    port = free_port()
    log = open(tmp / "relay-stderr.log", "wb")
    # systemd-socket-activate binds as the test's user, then execs the privilege drop (when root),
    # which execs the relay: one pid, so LISTEN_PID names the relay.
    proc = subprocess.Popen([tool, "-l", sock_path, "--fdname=ingest", *unprivileged_prefix(),
                             relay_bin(), "serve", "--listen", f"127.0.0.1:{port}",
                             "--jwt-secret-file", str(tmp / "secret")],
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
        shutil.rmtree(tmp, ignore_errors=True)


# ============================================================================================
# The relay as the units run it, on the machine the README sets up (root: see `unit`)

def test_unit_relay_runs_with_the_declared_credentials(unit: UnitRelay):
    """The process is what the unit declares (so the checks below test the units, not a relay
    with more rights): uid and gid, supplementary groups, capabilities, no_new_privs, umask; and
    it told "systemd" READY=1 itself, as that user (Type=notify, NotifyAccess=main)."""
    inst = unit.inst
    status = dict(l.split(":\t", 1) for l in
                  Path(f"/proc/{unit.proc.pid}/status").read_text().splitlines() if ":\t" in l)
    uid = inst.service_user.uid
    assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(inst.service_gid)] * 4, status["Gid"]
    assert set(map(int, status["Groups"].split())) == inst.service_groups, status["Groups"]
    assert int(status["Umask"], 8) == int(unit.umask, 8), status["Umask"]
    assert status["NoNewPrivs"].strip() == ("1" if unit.no_new_privs else "0")
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16)
    if unit.bounding == NO_CAPABILITY:
        assert int(status["CapBnd"], 16) == 0, status["CapBnd"]
    if unit.ambient == NO_CAPABILITY:
        for k in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
            assert int(status[k], 16) == 0, (k, status[k])
    ready = unit.notify.find("READY=1", unit.proc.pid)
    assert ready[1:3] == (uid, inst.service_gid), f"READY=1 from uid/gid {ready[1:3]}"


def test_unit_worker_in_the_socket_group_publishes(unit: UnitRelay):
    """(a) The README's worker (the user it adds to the socket unit's SocketGroup, with no other
    right) connects to the socket systemd made and publishes; a subscriber gets the event."""
    inst = unit.inst
    worker = inst.workers[0]
    line = json.dumps({"topic": "user:alice:import", "type": "progress", "progress": 41},
                      separators=(",", ":"))
    assert publish(unit, worker, line) == {"connect": "ok", "answers": ""}

    async def newest():
        ws, subscribed = await subscribe(unit, "user:alice:import", the_secret(inst))
        async with ws:
            return subscribed, await next_json(ws)

    subscribed, event = asyncio.run(newest())
    assert subscribed["seq"] == 1, subscribed
    assert event == {"seq": 1, **json.loads(line)}, event


def test_unit_user_outside_the_socket_group_is_refused(unit: UnitRelay):
    """(b) A user of the machine the README lets into no group: the kernel refuses the connect
    (EACCES: the socket's mode gives others nothing), so no line reaches the relay. The same user
    put in SocketGroup, and nothing else, gets in: the group is what decides."""
    inst = unit.inst
    someone = outsider(inst)
    line = '{"topic":"user:alice:import","type":"progress","progress":99}'
    assert publish(unit, someone, line) == {"connect": "EACCES"}
    assert publish(unit, someone, '{"topic":"user:bob:x"}',
                   groups={inst.socket_gid}) == {"connect": "ok", "answers": ""}


def test_unit_browser_client_receives_what_a_worker_publishes(unit: UnitRelay):
    """(c) A WebSocket client with a token minted with the README's secret (as the web
    application mints it) subscribes over HTTP, which the relay serves as the unit's user with no
    capability, and receives, live, the event a worker publishes."""
    inst = unit.inst
    worker = inst.workers[0]
    topic = "user:alice:report"
    line = json.dumps({"topic": topic, "type": "progress", "progress": 7}, separators=(",", ":"))

    async def live():
        ws, subscribed = await subscribe(unit, topic, the_secret(inst))
        async with ws:
            assert subscribed["seq"] == 0, subscribed
            answer = await asyncio.to_thread(publish, unit, worker, line)
            assert answer == {"connect": "ok", "answers": ""}, answer
            return await next_json(ws)

    assert asyncio.run(live()) == {"seq": 1, **json.loads(line)}


def test_unit_worker_cannot_read_the_secret_the_service_user_can(unit: UnitRelay):
    """(d) Issue 12, 4: the socket's group gives no way to the secret. The README's worker cannot
    open the secret file (nor any copy the README makes, such as the web application's), so it
    cannot mint itself a token; the service user, with exactly the unit's groups, opens it (and
    the relay did, or it would not serve); each copy's owner (the web application) opens its own."""
    inst = unit.inst
    host = inst.host
    secret_bytes = host.path(inst.secret_path).read_bytes()
    digest = hashlib.sha256(secret_bytes).hexdigest()
    copies = [p for p in host.meta if p != inst.secret_path and host.path(p).is_file()
              and host.path(p).read_bytes() == secret_bytes]
    for worker in inst.workers:
        for path in [inst.secret_path, *copies]:
            got = run_as(worker, READ_FILE, str(host.path(path)))
            assert got == {"open": "EACCES"}, f"worker {worker.name} opens {path}: {got}"
    user = inst.service_user
    assert run_as(user, READ_FILE, str(host.path(inst.secret_path)), gid=inst.service_gid,
                  groups=inst.service_groups) == {"open": "ok", "sha256": digest}
    for path in copies:
        owner = next(u for u in host.users.values() if u.uid == host.meta[path].uid)
        if owner.uid != 0:
            assert run_as(owner, READ_FILE, str(host.path(path))) == \
                {"open": "ok", "sha256": digest}, f"{owner.name} cannot read its copy {path}"


def test_unit_state_is_written_in_the_state_directory_and_restored(unit: UnitRelay):
    """(e) SIGTERM: the relay exits 0 after STOPPING=1 and writes its state file under
    ${STATE_DIRECTORY} as the unit's user (UMask: no rights for others); systemd's socket stays.
    The next start (same socket, same ExecStart) restores it: same epoch, same seq, same newest
    event. Runs last: it restarts the module's relay."""
    inst = unit.inst
    topic = "user:alice:import"

    async def newest():
        ws, subscribed = await subscribe(unit, topic, the_secret(inst))
        async with ws:
            return subscribed, (await next_json(ws) if subscribed["seq"] else None)

    before, event_before = asyncio.run(newest())
    assert before["seq"] >= 1, before
    pid = unit.proc.pid
    assert unit.stop(signal.SIGTERM) == 0, unit.log_tail()
    assert unit.notify.find("STOPPING=1", pid), unit.notify.messages
    state_arg = next(a for a in unit.argv if a.startswith(tuple(unit.state_dirs)))
    st = os.stat(state_arg)
    umask = int(unit.umask, 8)
    assert (st.st_uid, st.st_gid) == (inst.service_user.uid, inst.service_gid), st
    assert stat.S_IMODE(st.st_mode) & umask == 0, \
        f"state file mode {oct(st.st_mode)}, UMask {unit.umask}"
    assert os.path.exists(unit.socket_path), "the relay removed the socket systemd owns"

    unit.start()
    after, event_after = asyncio.run(newest())
    assert (after["epoch"], after["seq"]) == (before["epoch"], before["seq"]), (before, after)
    assert event_after == event_before
    assert publish(unit, inst.workers[0], '{"topic":"user:alice:import","progress":100}') == \
        {"connect": "ok", "answers": ""}
