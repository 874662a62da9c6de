"""`progress-relay watch`: a subscriber for people (bars on a terminal) and scripts (plain lines,
JSON lines), with its exit statuses, and its resume across a relay restart.

The bars are checked as a person sees them: `watch` runs in a detached tmux session of a fixed
size, and the test reads the screen with `tmux capture-pane -p`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from relaylib import require_bin, wait_until

PLAIN = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<topic>\S+) (?P<seq>\d+) (?P<type>\S+) "
    r"(?P<percent>\S+)(?: (?P<message>.*))?$")


class Watch:
    """One `progress-relay watch` with its standard output and error collected as they come."""

    def __init__(self, relay, *args, token: str | None = None, topics=("task:1",), env=None):
        token = token if token is not None else relay.token(topics=["task:*"])
        token_file = relay.dir / f"watch-token-{uuid.uuid4().hex[:8]}"
        token_file.write_text(token + "\n")
        self.cmd = [require_bin(), "watch", "--url", relay.http_base, "--token-file", str(token_file),
                    *args, *topics]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESS_RELAY_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=full_env)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, l), daemon=True)
                         for s, l in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, into):
        for line in iter(stream.readline, b""):
            into.append(line.decode("utf-8", "replace").rstrip("\n"))

    def wait(self, timeout: float = 15) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"watch still running after {timeout}s\n{self.report()}")
        for t in self._threads:
            t.join(5)
        return rc

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def report(self) -> str:
        return f"$ {' '.join(self.cmd)}\n--- stdout\n" + "\n".join(self.out) + \
            "\n--- stderr\n" + "\n".join(self.err)


@pytest.fixture
def watches():
    made: list[Watch] = []

    def make(*args, **kwargs) -> Watch:
        w = Watch(*args, **kwargs)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def wait_subscribed(relay, n: int, timeout: float = 10):
    wait_until(lambda: relay.stats().get("subscriptions", 0) >= n, timeout,
               what=f"{n} subscription(s) at the relay")


def emit(relay, *events: dict):
    assert relay.emit_lines(events) == []


# ---------------------------------------------------------------------------------------------

def test_plain_lines_when_piped_and_exit_0_after_complete(relay, watches):
    w = watches(relay, topics=("task:1",))
    wait_subscribed(relay, 1)
    emit(relay,
         {"topic": "task:1", "type": "progress", "progress": 20, "current": 1, "total": 5, "message": "1/5"},
         {"topic": "task:1", "type": "progress", "progress": 60, "current": 3, "total": 5, "message": "3/5"},
         {"topic": "task:2", "type": "progress", "progress": 10},   # not watched
         {"topic": "task:1", "type": "complete", "success": True, "message": "done"})
    assert w.wait() == 0, w.report()
    parsed = [PLAIN.match(l) for l in w.out]
    assert all(parsed), w.report()
    assert [(m["topic"], m["seq"], m["type"], m["percent"], m["message"]) for m in parsed] == [
        ("task:1", "1", "progress", "20%", "1/5"),
        ("task:1", "2", "progress", "60%", "3/5"),
        ("task:1", "3", "complete", "-", "done"),
    ], w.report()
    assert w.err == [], w.report()


def test_json_prints_each_frame_as_received(relay, watches):
    w = watches(relay, "--json", topics=("task:1",))
    wait_subscribed(relay, 1)
    lines = [
        '{"topic":"task:1","type":"progress","progress":50,"message":"half","extra":{"a":[1,2]}}',
        '{"topic":"task:1","type":"complete","success":true}',
    ]
    emit(relay, *lines)
    assert w.wait() == 0, w.report()
    frames = [json.loads(l) for l in w.out]
    assert frames[0]["op"] == "subscribed" and frames[0]["topic"] == "task:1", w.report()
    assert w.out[1:] == [
        '{"seq":1,"topic":"task:1","type":"progress","progress":50,"message":"half","extra":{"a":[1,2]}}',
        '{"seq":2,"topic":"task:1","type":"complete","success":true}',
    ], w.report()


def test_exit_1_once_every_topic_ended_and_one_failed(relay, watches):
    w = watches(relay, topics=("task:1", "task:2"))
    wait_subscribed(relay, 2)
    emit(relay, {"topic": "task:1", "type": "error", "error": "ValueError: bad row 7"})
    time.sleep(0.5)
    assert w.proc.poll() is None, "watch ended while task:2 still runs\n" + w.report()
    emit(relay, {"topic": "task:2", "type": "complete", "message": "done"})
    assert w.wait() == 1, w.report()
    assert any("task:1 1 error - ValueError: bad row 7" in l for l in w.out), w.report()
    assert any("task:1" in l and "error" in l for l in w.err), w.report()


def test_a_task_already_complete_ends_the_watch_at_once(relay, watches):
    emit(relay, {"topic": "task:9", "type": "complete", "message": "long done"})
    w = watches(relay, topics=("task:9",))
    assert w.wait() == 0, w.report()
    assert len(w.out) == 1 and w.out[0].endswith("task:9 1 complete - long done"), w.report()


@pytest.mark.parametrize("case", ["bad signature", "expired", "topic not granted"])
def test_exit_2_on_a_refused_token(relay, watches, case):
    token = {
        "bad signature": relay.token(topics=["task:*"], secret="another-secret-0123456789abcdefghij"),
        "expired": relay.token(topics=["task:*"], exp_in=-60),
        "topic not granted": relay.token(topics=["other:*"]),
    }[case]
    w = watches(relay, token=token, topics=("task:1",))
    assert w.wait(10) == 2, w.report()
    assert w.out == [], w.report()
    want = "does not grant task:1" if case == "topic not granted" else "refused the token (close 4401"
    assert len(w.err) == 1 and w.err[0].startswith("progress-relay: ") and want in w.err[0], w.report()


def test_exit_2_on_http_403_at_the_handshake(relay):
    # The relay refuses a handshake with 403 only for a browser's Origin, which watch never
    # sends; a stand-in answers 403 the way a proxy in front of the relay might.
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def answer():
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        conn.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    token = relay.token(topics=["task:*"])
    cp = subprocess.run([require_bin(), "watch", "--url", f"http://127.0.0.1:{port}", "--token", token,
                         "task:1"], capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
    srv.close()
    assert cp.returncode == 2, cp
    assert b"HTTP 403" in cp.stderr, cp


def test_token_from_the_environment(relay, watches):
    token = relay.token(topics=["task:*"])
    cp_env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESS_RELAY_")}
    cp_env["PROGRESS_RELAY_TOKEN"] = token
    emit(relay, {"topic": "task:5", "type": "complete"})
    cp = subprocess.run([require_bin(), "watch", "--url", relay.http_base, "task:5"], env=cp_env,
                        capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp
    assert b"task:5 1 complete" in cp.stdout, cp
    del cp_env["PROGRESS_RELAY_TOKEN"]
    cp = subprocess.run([require_bin(), "watch", "--url", relay.http_base, "task:5"], env=cp_env,
                        capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
    assert cp.returncode == 2 and b"no token" in cp.stderr, cp


def test_resume_across_a_relay_restart_with_its_state_file(relay_factory, watches):
    relay = relay_factory("--state-file", "state.json")
    w = watches(relay, topics=("task:1",))
    wait_subscribed(relay, 1)
    emit(relay, *({"topic": "task:1", "type": "progress", "progress": n * 10} for n in range(1, 4)))
    wait_until(lambda: len(w.out) >= 3, 10, what="three lines")
    relay.restart()
    # events the watch was not connected for: the resume replays them
    emit(relay, *({"topic": "task:1", "type": "progress", "progress": n * 10} for n in range(4, 7)))
    wait_subscribed(relay, 1)
    emit(relay, {"topic": "task:1", "type": "progress", "progress": 70},
         {"topic": "task:1", "type": "complete"})
    assert w.wait() == 0, w.report()
    seqs = [int(PLAIN.match(l)["seq"]) for l in w.out]
    assert seqs == list(range(1, 9)), w.report()
    assert any("reconnecting" in l for l in w.err), w.report()


# ---------------------------------------------------------------------------------------------
# as a person sees it

def tmux_or_skip() -> str:
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is missing (apt-get install -y tmux): the bars are checked on a tmux "
                    "screen")
    return tmux


class Tmux:
    def __init__(self, tmux: str, directory: Path):
        self.tmux = tmux
        self.socket = str(directory / "tmux.sock")

    def __call__(self, *args: str, check: bool = True) -> str:
        cp = subprocess.run([self.tmux, "-S", self.socket, *args], capture_output=True, timeout=10,
                            env={**os.environ, "LANG": "C.UTF-8", "TERM": "xterm-256color"})
        if check:
            assert cp.returncode == 0, cp
        return cp.stdout.decode("utf-8", "replace")

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "w")

    def wait_screen(self, pred, what: str, timeout: float = 10) -> str:
        last = [""]

        def check():
            last[0] = self.screen()
            return pred(last[0])
        try:
            wait_until(check, timeout, interval=0.1, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}; the screen:\n{last[0]}") from None
        return last[0]

    def kill(self):
        self("kill-server", check=False)


@pytest.fixture
def tmux(relay):
    t = Tmux(tmux_or_skip(), relay.dir)
    yield t
    t.kill()


def start_in_tmux(tmux: Tmux, relay, topics: list[str]) -> None:
    token_file = relay.dir / "tmux-token"
    token_file.write_text(relay.token(topics=["task:*"]))
    watch = " ".join([require_bin(), "watch", "--url", relay.http_base, "--token-file",
                      str(token_file), *topics])
    # the status after watch ends stays on screen, as it would in a person's terminal
    tmux("new-session", "-d", "-s", "w", "-x", "100", "-y", "12",
         f"{watch}; echo \"exit status $?\"; sleep 60")


def test_bars_on_a_terminal(relay, tmux):
    start_in_tmux(tmux, relay, ["task:1", "task:2"])
    wait_subscribed(relay, 2)
    emit(relay,
         {"topic": "task:1", "type": "progress", "progress": 60, "message": "3/5 rows"},
         {"topic": "task:2", "type": "progress", "current": 1, "total": 4, "message": "fetching"})
    screen = tmux.wait_screen(lambda s: "3/5 rows" in s and "fetching" in s, "both bars")
    print(screen)
    lines = screen.splitlines()
    bar1 = next(l for l in lines if l.startswith("task:1"))
    bar2 = next(l for l in lines if l.startswith("task:2"))
    assert re.search(r"\[#{14}-{10}\]\s+60%\s+3/5 rows\s+\S+/s\s+\d+s ago$", bar1), screen
    assert re.search(r"\[#{6}-{18}\]\s+25%\s+fetching", bar2), screen
    assert any(l.startswith("connected to 127.0.0.1:") for l in lines), screen
    assert len(lines[0]) <= 99, screen   # never the last column: no wrap
    emit(relay, {"topic": "task:1", "type": "complete", "message": "imported"},
         {"topic": "task:2", "type": "error", "error": "timeout"})
    screen = tmux.wait_screen(lambda s: "exit status" in s, "watch to end")
    print(screen)
    assert re.search(r"^task:1\s+\[#{24}\]\s+100%\s+imported", screen, re.M), screen
    assert re.search(r"^task:2\s+\[#{6}-{18}\]\s+25%\s+ERROR timeout", screen, re.M), screen
    assert "exit status 1" in screen, screen
    assert tmux("display", "-p", "-t", "w", "#{cursor_flag}").strip() == "1", "cursor left hidden"


def test_pattern_bars_appear_and_ctrl_c_exits_130(relay, tmux):
    start_in_tmux(tmux, relay, ["task:*"])
    wait_subscribed(relay, 1)
    tmux.wait_screen(lambda s: "waiting for task:*" in s, "the waiting status")
    emit(relay, {"topic": "task:a", "type": "progress", "progress": 40, "message": "first"})
    tmux.wait_screen(lambda s: "first" in s, "the first topic's bar")
    emit(relay, {"topic": "task:b", "type": "progress", "progress": 90, "message": "second"},
         {"topic": "task:a", "type": "complete"})
    screen = tmux.wait_screen(lambda s: "second" in s and "100%" in s, "both topics")
    print(screen)
    assert re.search(r"^task:a\s+\[#+\]\s+100%\s+done", screen, re.M), screen
    assert re.search(r"^task:b\s+\[#+-+\]\s+90%\s+second", screen, re.M), screen
    tmux("send-keys", "-t", "w", "C-c")
    screen = tmux.wait_screen(lambda s: "exit status" in s, "watch to end")
    assert "exit status 130" in screen, screen
    assert tmux("display", "-p", "-t", "w", "#{cursor_flag}").strip() == "1", "cursor left hidden"
