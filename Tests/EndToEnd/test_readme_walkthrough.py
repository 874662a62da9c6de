"""README.md's "A five-minute walk-through", run word for word as an unprivileged user.

The shell blocks of that section are read from README.md when the test runs, so a change to the
README changes the test. They run, in order, in one bash, as a new user types them; the
long-running ones (the serve of step 1, the `watch` of step 3, the `curl -N` of step 5) run in
the background, with their output in files (`watch`'s standard input a pipe the script writes
to, as a terminal's would be; `curl` is ended with SIGTERM, a person's Ctrl-C, once it printed
what step 5 promises). Every other command must exit 0 (`watch` too, which ends by itself at
`complete`), and every frame the section quotes is checked against what the subscribers printed.

One departure: step 1's `swift build -c release` (minutes, and it needs a writable checkout) is
replaced by a working directory whose `.build/release/progress-relay` is the binary under test
($PROGRESS_RELAY_BIN, else .build/debug/progress-relay). Every other command runs as written.
The README's epoch (`k3x9qa2m-1`) is an example, as the README says: step 5 runs the README's
`curl` with the epoch the relay announced in step 3 in its place.

Isolation. The walk-through uses fixed names (/tmp/relay-secret, /tmp/progress.sock and the
default 127.0.0.1:8765), so it runs in its own mount, network and pid namespaces: a private tmpfs
on /tmp, a loopback of its own (another relay on this machine cannot collide, and nothing is left
behind: when the walk-through's shell ends, the kernel ends every process it started). Inside:
- as root (CI): the commands run as an unused uid and gid, without supplementary groups or
  capabilities (`setpriv --reuid --regid --clear-groups --inh-caps=-all --bounding-set=-all
  --no-new-privs`), HOME a directory of their own;
- as any other user: an unprivileged user namespace (`unshare -r -m -n`) sets that up, and the
  commands run as that same user, without capabilities, in a nested user namespace. When user
  namespaces are not available, the test is skipped and says why.
Nothing beyond the binary, bash, coreutils and Debian's `curl` and `socat` is on the walk-through's
PATH: a new user has installed nothing else (the readiness check uses `curl` too). KEEP_WALK=1
keeps the script and its output (/var/tmp/readme-walk-*).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.parse
from pathlib import Path

import pytest

import relaylib
from relaylib import require_bin

REPO = Path(__file__).resolve().parent.parent.parent
README = REPO / "README.md"
SECTION = "A five-minute walk-through"
BUILD_LINE = "swift build -c release"   # step 1: the one line this test does not run
RELEASE_BIN = ".build/release/progress-relay"
TIMEOUT = 30                           # the whole walk-through; it takes about 2 s


# ---------------------------------------------------------------------------------------------
# reading the README

def walkthrough_section(text: str) -> str:
    m = re.search(rf"^## {re.escape(SECTION)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f'README.md has no "## {SECTION}" section'
    return m.group(1)


def steps(section: str) -> dict[int, str]:
    """The numbered items of the section ("1. **Start** ..."), by number."""
    parts = re.split(r"^(\d+)\. ", section, flags=re.M)
    return {int(parts[i]): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def shell_blocks(step_text: str) -> list[str]:
    """The ```sh blocks of one step, dedented (they are indented under the list item)."""
    blocks = re.findall(r"^([ \t]*)```sh\n(.*?)^\1```[ \t]*$", step_text, re.M | re.S)
    return [textwrap.dedent(body) for _, body in blocks]


def commands(block: str) -> list[str]:
    """The logical commands of a block: lines joined where one ends in a backslash, each kept
    exactly as written (its lines and backslashes included)."""
    out, cur = [], []
    for line in block.splitlines():
        if not cur and not line.strip():
            continue
        cur.append(line)
        if not line.endswith("\\"):
            out.append("\n".join(cur))
            cur = []
    assert not cur, f"a block ends in a line continuation: {block!r}"
    return out


def quoted_json(text: str) -> list[str]:
    """Every `{...}` quoted in backticks in `text`, in order, as written."""
    return re.findall(r"`(\{[^`]*\})`", text)


def quoted_sse_data(text: str) -> list[str]:
    """Every `data: {...}` (a server-sent event's data line) quoted in backticks, its JSON."""
    return re.findall(r"`data: (\{[^`]*\})`", text)


class Walkthrough:
    """What the section says: its commands by step, and the frames it quotes."""

    def __init__(self, readme_text: str):
        sec = walkthrough_section(readme_text)
        st = steps(sec)
        assert sorted(st) == [1, 2, 3, 4, 5], (
            f"the walk-through's steps are now {sorted(st)}, not 1 to 5: update this test")
        self.blocks = {n: shell_blocks(st[n]) for n in st}
        shape = {n: len(b) for n, b in self.blocks.items()}
        assert shape == {1: 1, 2: 1, 3: 1, 4: 2, 5: 1}, (
            f"the walk-through's shell blocks per step are now {shape}: update this test")

        # step 1: the secret, `swift build -c release` (replaced), then serve (long-running)
        self.step1 = commands(self.blocks[1][0])
        assert BUILD_LINE in self.step1, (
            f"step 1 no longer has the line `{BUILD_LINE}` verbatim, which this test replaces "
            f"with a checkout already built: {self.step1}")
        self.serve = self.step1[-1]
        assert self.serve.startswith(f"{RELEASE_BIN} serve "), (
            f"step 1 no longer ends with `{RELEASE_BIN} serve ...`: {self.serve!r}")
        serve_words = shlex.split(self.serve)
        self.socket_path = serve_words[serve_words.index("--socket") + 1]
        self.secret_path = serve_words[serve_words.index("--jwt-secret-file") + 1]

        # step 2: one command that sets TOKEN
        self.step2 = commands(self.blocks[2][0])
        assert any(c.startswith("TOKEN=") for c in self.step2), self.step2

        # step 3: the subscriber, `progress-relay watch --json` (long-running until `complete`)
        (self.subscribe,) = commands(self.blocks[3][0])
        assert re.search(rf"(^|\s){re.escape(RELEASE_BIN)} watch .*--json", self.subscribe), self.subscribe
        m = re.search(r"--url http://([0-9.]+):(\d+)", self.subscribe)
        assert m, self.subscribe
        self.host, self.port = m.group(1), int(m.group(2))
        (self.subscribed,) = [f for f in quoted_json(st[3]) if '"op":"subscribed"' in f]

        # step 4: socat, then the relay's own client
        self.step4 = [c for b in self.blocks[4] for c in commands(b)]
        assert len(self.step4) == 2, self.step4
        self.events = [f for f in quoted_json(st[4]) if f.startswith('{"seq":')]
        assert len(self.events) == 2, (
            f"step 4 should quote the two events the subscriber receives: {self.events}")

        # step 5: `curl -N` on /sse from step 3's epoch and a seq (long-running), and what it prints
        (self.reconnect,) = commands(self.blocks[5][0])
        assert self.reconnect.startswith("curl -N "), self.reconnect
        self.example_epoch = json.loads(self.subscribed)["epoch"]
        m = re.search(r'"(http://[^"]*/sse\?[^"]*)"', self.reconnect)
        assert m, f"step 5's curl should ask for a double-quoted /sse URL: {self.reconnect!r}"
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(m.group(1)).query)
        assert query.get("epoch") == [self.example_epoch], (
            "step 5 should resume the epoch step 3 shows", self.reconnect, self.subscribed)
        self.resume_since = int(query["since"][0])
        self.resume_data = quoted_sse_data(st[5])
        assert len(self.resume_data) == 2 and '"op":"subscribed"' in self.resume_data[0], (
            f"step 5 should quote the `data:` of its subscribed event and of the replayed event: "
            f"{self.resume_data}")
        self.resume_ids = re.findall(r"`id: ([^`]*)`", st[5])


# ---------------------------------------------------------------------------------------------
# the script that runs it

def _q(s: str) -> str:
    return shlex.quote(str(s))


def build_script(w: Walkthrough, out: Path, checkout: Path) -> str:
    """One bash script: the README's commands as written, and between them the waits a person
    does with their eyes (the relay is up, the subscriber printed a frame). Every README command
    that runs in the foreground records its exit status in $OUT/status and stops the walk-through
    when it fails; long-running ones run in the background with their output in $OUT."""
    # the README's curl with the relay's epoch in place of the example's (inside its "...": $EPOCH
    # expands there)
    prefix, found, suffix = w.reconnect.partition(w.example_epoch)
    assert found, (w.reconnect, w.example_epoch)
    reconnect = prefix + "$EPOCH" + suffix
    health = f"http://{w.host}:{w.port}/healthz"
    lines = [
        "#!/bin/bash",
        f"OUT={_q(out)}",
        "note() { printf '%s\\n' \"$*\" >>\"$OUT/notes\"; }",
        "fail() { note \"FAIL: $*\"; exit 1; }",
        # the README's commands, one by one: each records its status, a failure stops the walk
        "ran() { local rc=$1; shift; printf '%s\\t%s\\0' \"$rc\" \"$*\" >>\"$OUT/status\";"
        " [ \"$rc\" -eq 0 ] || fail \"exit status $rc: $*\"; }",
        # wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
        "wait_for() { local n=$(( $1 * 20 )) what=$2; shift 2;"
        " while ! \"$@\" 2>/dev/null; do n=$((n-1)); [ $n -gt 0 ] || fail \"timed out: $what\";"
        " sleep 0.05; done; }",
        "alive() { kill -0 \"$1\" 2>/dev/null || fail \"$2 exited early\"; }",
        # the number of lines of FILE that contain STRING is at least N
        "has() { [ \"$(grep -cF -- \"$2\" \"$1\")\" -ge \"$3\" ]; }",
        f"healthy() {{ alive \"$RELAY\" 'serve'; [ -S {_q(w.socket_path)} ] && curl -sf -o /dev/null "
        f"--max-time 1 {_q(health)}; }}",
        # FILE (of subscriber PID) has N lines with STRING; a subscriber that has exited (watch
        # does at `complete`) is judged on what it printed, which is then final
        "frames() { if kill -0 \"$1\" 2>/dev/null; then has \"$2\" \"$3\" \"$4\"; "
        "else has \"$2\" \"$3\" \"$4\" || fail \"the subscriber ($2) exited early\"; fi; }",
        "",
        "id >\"$OUT/id\"; grep '^Cap' /proc/self/status >>\"$OUT/id\"",
        f"cd {_q(checkout)}",
        f"[ -x {RELEASE_BIN} ] || fail 'the binary under test is not executable as this user'",
        "",
        "# ---- 1. Start",
    ]
    for cmd in w.step1[:-1]:
        if cmd == BUILD_LINE:
            lines.append(f": {_q(BUILD_LINE)} replaced by the test: {RELEASE_BIN} is the binary "
                         "under test")
            continue
        lines += [cmd, f"ran $? {_q(cmd)}"]
    lines += [
        f'{w.serve} >"$OUT/serve.log" 2>&1 &',
        "RELAY=$!",
        "wait_for 15 'the relay: socket file and GET /healthz' healthy",
        "",
        "# ---- 2. Mint a token",
    ]
    for cmd in w.step2:
        lines += [cmd, f"ran $? {_q(cmd)}"]
    lines += [
        "",
        "# ---- 3. Subscribe (stdin: a pipe kept open, as a terminal would be)",
        'mkfifo "$OUT/sub1.in"',
        f'{w.subscribe} <"$OUT/sub1.in" >"$OUT/sub1.out" 2>&1 &',
        "SUB1=$!",
        'exec 7>"$OUT/sub1.in"',  # the pipe's one writer: closing it is the ^D of step 5
        "wait_for 10 'the first frame of the subscriber' frames $SUB1 \"$OUT/sub1.out\" "
        "'\"op\":\"subscribed\"' 1",
        "",
        "# ---- 4. Emit",
    ]
    for cmd in w.step4:
        lines += [cmd, f"ran $? {_q(cmd)}"]
    lines += [
        "wait_for 10 'the two events at the subscriber' frames $SUB1 \"$OUT/sub1.out\" "
        "'{\"seq\":' 2",
        "",
        "# ---- 5. Resume: watch ended by itself at `complete`; curl from its epoch, then Ctrl-C",
        "exec 7>&-",
        "wait $SUB1; echo $? >\"$OUT/sub1.rc\"   # watch ended at `complete`, by itself",
        "EPOCH=$(grep -o '\"epoch\":\"[^\"]*\"' \"$OUT/sub1.out\" | head -1 | cut -d'\"' -f4)",
        "[ -n \"$EPOCH\" ] || fail 'no epoch in the subscribed frame of step 3'",
        f'{reconnect} >"$OUT/sub2.out" 2>"$OUT/sub2.err" &',
        "SUB2=$!",
        "wait_for 10 'the resumed events' frames $SUB2 \"$OUT/sub2.out\" 'data: {\"seq\":' "
        f"{sum(json.loads(e)['seq'] > w.resume_since for e in w.events)}",
        "sleep 0.3   # and anything that would come after them",
        "kill -TERM $SUB2; wait $SUB2; echo $? >\"$OUT/sub2.rc\"   # Ctrl-C",
        "",
        "# ---- the end: SIGTERM, as ^C in the relay's terminal would stop it",
        "kill -TERM $RELAY; wait $RELAY; echo $? >\"$OUT/serve.rc\"",
        f"stat -c %a {_q(w.secret_path)} >\"$OUT/secret.mode\"",
        "note done",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the sandbox

# Runs as root in the new namespaces: a private /tmp, loopback up, then exec argv[1:].
# The loopback comes up through an ioctl rather than `ip`, which a fresh Debian may not have;
# in a new network namespace the kernel gives lo 127.0.0.1/8 once it is up.
_SETUP = r"""
import fcntl, os, socket, struct, subprocess, sys
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", "/tmp"],
               check=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ifr = fcntl.ioctl(s, 0x8913, struct.pack("16sh22x", b"lo", 0))           # SIOCGIFFLAGS
flags = struct.unpack("16sh22x", ifr)[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sh22x", b"lo", flags | 0x1))        # SIOCSIFFLAGS, IFF_UP
os.execvp(sys.argv[1], sys.argv[1:])
"""


def _unused_id() -> int:
    return relaylib.RELAY_UID


def sandbox(inner: list[str]) -> tuple[list[str], str, int | None]:
    """The command that runs `inner` isolated and unprivileged, a description of who runs it,
    and the uid that must own its directories (None: ourselves). Skips the test when that is
    impossible (not root, and no unprivileged user namespaces)."""
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` (util-linux) is missing: the walk-through runs isolated")
    ns = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    setup = [sys.executable, "-c", _SETUP]
    if os.geteuid() == 0:
        uid = gid = _unused_id()
        drop = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        return ([*ns, "--", *setup, *drop, *inner], f"uid {uid}, gid {gid}, no capabilities",
                uid)
    uid, gid = os.getuid(), os.getgid()
    outer = [*ns[:1], "--user", "--map-root-user", *ns[1:]]
    # the setup runs as root of a user namespace of our own; the commands as ourselves again,
    # in a nested one, without capabilities
    drop = ["unshare", "--user", f"--map-user={uid}", f"--map-group={gid}", "--",
            "setpriv", "--inh-caps=-all", "--no-new-privs", "--"]
    probe = subprocess.run([*outer, "--", *setup, *drop, "true"], capture_output=True,
                           timeout=20)
    if probe.returncode != 0:
        pytest.skip("not root, and no unprivileged user namespace to run the walk-through in "
                    "(`unshare --user --map-root-user --mount --net ...` failed: "
                    f"{probe.stderr.decode(errors='replace').strip()[-300:]})")
    return ([*outer, "--", *setup, *drop, *inner], f"uid {uid} (ourselves), no capabilities",
            None)


# ---------------------------------------------------------------------------------------------
# reading what the subscriber printed

_ESCAPES = re.compile(r"\x1b(?:\[[0-9;]*[A-Za-z]|[78])|\r")


def sse_events(path: Path) -> list[dict[str, str]]:
    """The server-sent events `curl -N` printed: each event's fields (`event`, `id`, `data`),
    blank-line separated; `retry:` and `: ping` alone make no event."""
    events, cur = [], {}
    for line in path.read_text(errors="replace").split("\n"):
        if line == "":
            if "data" in cur:
                events.append(cur)
            cur = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            cur[name] = value[1:] if value.startswith(" ") else value
    return events


def watched_frames(path: Path) -> list[str]:
    """The frames `progress-relay watch --json` printed: one JSON object per line, as received."""
    return [l for l in path.read_text(errors="replace").splitlines() if l.startswith("{")]


def same_frame(readme: str, got: str, epoch: str) -> None:
    """`got` is the README's frame with the relay's epoch for the README's example: the same
    fields, values and order."""
    want = json.loads(readme)
    have = json.loads(got)
    want_fields = list(want)
    if "epoch" in want:
        assert isinstance(have.get("epoch"), str) and have["epoch"], got
        want["epoch"] = epoch
    assert (list(have), have) == (want_fields, want), (
        f"the README quotes {readme}; the relay sent {got}")


# ---------------------------------------------------------------------------------------------

def test_readme_walkthrough_word_for_word_as_an_unprivileged_user():
    binary = os.path.abspath(require_bin())
    w = Walkthrough(README.read_text())
    for tool in ("curl", "socat"):
        assert shutil.which(tool), f"the walk-through uses `{tool}`: apt-get install {tool}"

    # Not below /tmp: the walk-through gets a /tmp of its own, and this must stay visible.
    work = Path(tempfile.mkdtemp(prefix="readme-walk-", dir="/var/tmp"))
    try:
        os.chmod(work, 0o755)
        checkout, home, out = work / "checkout", work / "home", work / "out"
        for d in (checkout / ".build" / "release", home, out):
            d.mkdir(parents=True)
        # step 1's `swift build -c release`, done: a copy of the binary under test (a link would
        # point into the checkout, which may be under the /tmp the walk-through cannot see)
        shutil.copy2(binary, checkout / RELEASE_BIN)
        os.chmod(checkout / RELEASE_BIN, 0o755)
        script = work / "walkthrough.sh"
        script.write_text(build_script(w, out, checkout))
        script.chmod(0o644)

        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(home), "LANG": "C.UTF-8", "SHELL": "/bin/bash",
        }
        inner = ["env", "-i", *(f"{k}={v}" for k, v in env.items()),
                 "/bin/bash", "--noprofile", "--norc", str(script)]
        cmd, who, owner = sandbox(inner)
        if owner is not None:
            for p in (checkout, checkout / ".build", checkout / ".build" / "release", home, out):
                os.chown(p, owner, owner)

        old_umask = os.umask(0o022)    # Debian's default for a user
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=TIMEOUT, cwd="/")
        except subprocess.TimeoutExpired as e:
            # unshare was killed, and with it (--kill-child) everything the walk-through started
            proc = subprocess.CompletedProcess(cmd, f"killed after {TIMEOUT} s",
                                               e.stdout or b"", e.stderr or b"")
        finally:
            os.umask(old_umask)

        def read(name: str) -> str:
            p = out / name
            return (_ESCAPES.sub("", p.read_text(errors="replace")) if p.exists()
                    else f"({name}: none)")

        report = "\n".join([
            f"--- the walk-through ({read('notes').strip()}), as {who}: exit status "
            f"{proc.returncode}; script {script}",
            f"--- stdout\n{proc.stdout.decode(errors='replace')}",
            f"--- stderr\n{proc.stderr.decode(errors='replace')}",
            f"--- id\n{read('id')}",
            f"--- status of the README's commands\n{read('status').replace(chr(0), chr(10))}",
            f"--- serve's output (step 1)\n{read('serve.log')}",
            f"--- subscriber of step 3\n{read('sub1.out')}",
            f"--- subscriber of step 5\n{read('sub2.out')}",
        ])
        assert proc.returncode == 0 and "done" in read("notes"), report

        # it ran as the user it was meant to, without capabilities
        ident = read("id")
        assert not re.search(r"\buid=0\(", ident), report
        assert re.search(r"^CapEff:\s*0+$", ident, re.M), report
        assert re.search(r"^CapBnd:\s*0+$", ident, re.M) or os.geteuid() != 0, report

        # every README command ran, and exited 0 (the emit of step 4 included)
        ran = [r.split("\t", 1) for r in read("status").split("\0")[:-1]]
        expected = [c for c in (*w.step1[:-1], *w.step2, *w.step4) if c != BUILD_LINE]
        assert [c for _, c in ran] == expected, report
        assert all(rc == "0" for rc, _ in ran), report

        # 3. "The first frame answers the subscription", seq 0, then 4. the two events, exactly
        first = watched_frames(out / "sub1.out")
        assert len(first) == 3, report
        epoch = json.loads(first[0]).get("epoch", "")
        same_frame(w.subscribed, first[0], epoch)
        assert json.loads(first[0])["seq"] == 0, report
        assert first[1:] == w.events, (
            f"the README says the subscriber receives {w.events}; it printed {first[1:]}\n"
            f"{report}")

        # 3. "It ends by itself, with exit status 0, once the topic sends `complete`"
        assert read("sub1.rc").strip() == "0", report

        # 5. the README's curl, with our epoch: an `event: subscribed` with recovered:true, then
        # every event after `since`, exactly as step 4 quotes them, with the ids step 5 quotes;
        # nothing else
        sent = f"epoch {epoch}, since {w.resume_since}"
        second = sse_events(out / "sub2.out")
        replay = [f for f in w.events if json.loads(f)["seq"] > w.resume_since]
        assert len(second) == 1 + len(replay), (
            f"after {sent} the README promises a subscribed event and {replay}; the relay sent "
            f"{second}\n{report}")
        assert second[0].get("event") == "subscribed" and "id" not in second[0], (second[0], report)
        ack = json.loads(second[0]["data"])
        want = {**json.loads(w.subscribed), "epoch": epoch, "recovered": True,
                "seq": json.loads(w.events[-1])["seq"]}
        assert (list(ack), ack) == (list(want), want), (
            f"after {sent}: {second[0]}, not {json.dumps(want)}\n{report}")
        same_frame(w.resume_data[0], second[0]["data"], epoch)
        assert [e["data"] for e in second[1:]] == replay == w.resume_data[1:], (
            f"after {sent} the README promises every event after seq {w.resume_since}: "
            f"{replay} (and quotes {w.resume_data[1:]}); the relay sent {second[1:]}\n{report}")
        assert [e.get("id") for e in second[1:]] == [
            i.replace(w.example_epoch, epoch) for i in w.resume_ids], (w.resume_ids, second, report)
        assert all("event" not in e for e in second[1:]), (second, report)

        # 1. "a secret of your own, readable by you only"
        mode = read("secret.mode").strip()
        assert mode == "600", f"step 1's secret has mode {mode}, not 600\n{report}"

        # the relay stopped cleanly, and logged nothing that went wrong on the way
        assert read("serve.rc").strip() == "0", report
        bad = [l for l in read("serve.log").splitlines()
               if re.search(r"\b(error|critical|could not)\b", l, re.I)]
        assert not bad, f"the relay logged {bad}\n{report}"
    finally:
        if not os.environ.get("KEEP_WALK"):
            shutil.rmtree(work, ignore_errors=True)
