"""progress_relay.Emitter against a real relay process and real WebSocket subscribers."""

from __future__ import annotations

import datetime
import decimal
import logging
import os
import signal
import threading
import time

import pytest
from prhelpers import Subscriber, assert_seq_contiguous, short_tmpdir, wait_until

import progress_relay


def body(event: dict) -> dict:
    """The event without its seq."""
    return {k: v for k, v in event.items() if k != "seq"}


def test_events_arrive_in_order_with_their_fields(relay):
    sub = Subscriber(relay, ["job:order"])
    em = progress_relay.Emitter(relay.socket_path)
    n = 1000
    try:
        for i in range(n):
            assert em.emit("job:order", "step", n=i, text="é ✓ \"quoted\" \\ \n") is True
        assert em.flush(10)
        events = sub.wait_count("job:order", n)
        assert [e["n"] for e in events] == list(range(n))
        assert_seq_contiguous(events)
        assert events[0]["seq"] == 1
        assert body(events[0]) == {"topic": "job:order", "type": "step", "n": 0,
                                   "text": "é ✓ \"quoted\" \\ \n"}
        assert list(events[0])[:3] == ["seq", "topic", "type"]
        st = em.stats()
        assert st["sent"] == n and st["queued"] == 0 and st["dropped"] == 0
        assert st["connections"] == 1 and st["connected"]
    finally:
        em.close()
        sub.close()


def test_type_and_topic_as_keywords_and_no_type(relay):
    sub = Subscriber(relay, ["kw"])
    with progress_relay.Emitter(relay.socket_path) as em:
        assert em.emit(topic="kw", type="a", x=1)
        assert em.emit("kw", x=2)
        assert em.emit("kw", self=3, path="p")    # names the method uses are fine as fields
        assert em.flush(5)
        events = sub.wait_count("kw", 3)
    sub.close()
    assert [body(e) for e in events] == [
        {"topic": "kw", "type": "a", "x": 1},
        {"topic": "kw", "x": 2},
        {"topic": "kw", "self": 3, "path": "p"},
    ]


def test_helpers_write_the_contract_fields(relay):
    t = "task:helpers"
    sub = Subscriber(relay, [t])
    with progress_relay.Emitter(relay.socket_path) as em:
        em.progress(t, 3, 5, message="three of five")
        em.progress(t, 1, 3)
        em.progress(t, 7, 0)
        em.progress(t, 12, 10, status="RUNNING", eta=4)
        em.complete(t, result={"rows": 2})
        em.error(t, ValueError("boom"))
        em.error(t, "disk full", details={"free": 0})
        assert em.flush(5)
        events = [body(e) for e in sub.wait_count(t, 7)]
    sub.close()
    assert events == [
        {"topic": t, "type": "progress", "progress": 60, "current": 3, "total": 5,
         "message": "three of five", "status": "PROGRESS"},
        {"topic": t, "type": "progress", "progress": 33.3, "current": 1, "total": 3,
         "message": "1/3", "status": "PROGRESS"},
        {"topic": t, "type": "progress", "progress": 0, "current": 7, "total": 0,
         "message": "7/0", "status": "PROGRESS"},
        {"topic": t, "type": "progress", "progress": 100, "current": 12, "total": 10,
         "message": "12/10", "status": "RUNNING", "eta": 4},
        {"topic": t, "type": "complete", "success": True, "message": "done",
         "result": {"rows": 2}},
        {"topic": t, "type": "error", "error": "ValueError: boom",
         "details": {"type": "ValueError"}},
        {"topic": t, "type": "error", "error": "disk full", "details": {"free": 0}},
    ]


def test_module_emit_uses_the_environment(relay, monkeypatch):
    monkeypatch.setenv("PROGRESS_RELAY_SOCKET", relay.socket_path)
    monkeypatch.setattr(progress_relay, "_default", None)
    assert progress_relay.default_socket_path() == relay.socket_path
    assert progress_relay.Emitter().path == relay.socket_path
    monkeypatch.setenv("PROGRESS_RELAY_SOCKET", "")
    assert progress_relay.default_socket_path() == "/run/progress.sock"
    monkeypatch.setenv("PROGRESS_RELAY_SOCKET", relay.socket_path)
    sub = Subscriber(relay, ["env"])
    try:
        assert progress_relay.emit("env", "hello", n=1)
        assert progress_relay.get_emitter() is progress_relay.get_emitter()
        assert progress_relay.flush(5)
        assert body(sub.wait_count("env", 1)[0]) == {"topic": "env", "type": "hello", "n": 1}
    finally:
        progress_relay.get_emitter().close(1)
        sub.close()


def test_relay_absent_at_first_then_started(relay_factory):
    d = short_tmpdir()
    path = str(d / "p.sock")
    em = progress_relay.Emitter(path, max_backoff=0.2)
    try:
        t0 = time.monotonic()
        for i in range(50):
            assert em.emit("late", n=i)
        assert time.monotonic() - t0 < 0.5, "emit blocked without a relay"
        assert em.flush(0.3) is False
        st = em.stats()
        assert st["queued"] == 50 and not st["connected"] and st["sent"] == 0
        relay = relay_factory(socket_path=path, directory=d)
        assert em.flush(10), em.stats()
        sub = Subscriber(relay, ["late"], from_start=True)
        events = sub.wait_count("late", 50)
        sub.close()
        assert [e["n"] for e in events] == list(range(50))
        assert_seq_contiguous(events)
    finally:
        em.close(1)


def test_relay_restarted_mid_stream_loses_nothing(relay_factory):
    """Emitting continuously while the relay is stopped (SIGTERM) and started again with its
    state file: every event arrives once, in order (written lines are published by the old
    relay; the unfinished one and the rest are written again to the new one)."""
    relay = relay_factory("--history", "100000", "--state-file", "STATE")
    sub = Subscriber(relay, ["restart"])
    em = progress_relay.Emitter(relay.socket_path, max_backoff=0.1)
    n = 1500
    done = threading.Event()

    def produce():
        for i in range(n):
            em.emit("restart", "step", n=i, pad="x" * 200)
            if i % 10 == 0:
                time.sleep(0.005)
        done.set()

    th = threading.Thread(target=produce)
    th.start()
    try:
        sub.wait_count("restart", 200)
        assert relay.stop() == 0
        time.sleep(0.2)
        relay.start()
        sub.wait_count("restart", 400)
        th.join(30)
        assert done.is_set()
        assert em.flush(15), em.stats()
        events = sub.wait_count("restart", n, timeout=20)
        time.sleep(0.2)
        events = sub.events["restart"]
        assert [e["n"] for e in events] == list(range(n))
        assert_seq_contiguous(events)
        assert em.stats()["connections"] >= 2
        assert sub.connections >= 2
    finally:
        em.close(1)
        sub.close()


def test_full_queue_drops_the_oldest_and_counts(relay_factory, caplog):
    d = short_tmpdir()
    path = str(d / "p.sock")
    em = progress_relay.Emitter(path, max_queue=10, max_backoff=0.1)
    try:
        with caplog.at_level(logging.WARNING, logger="progress_relay"):
            for i in range(25):
                assert em.emit("overflow", n=i)
            st = em.stats()
            assert st["dropped"] == 15 and st["queued"] == 10
            assert em.dropped == 15
            wait_until(lambda: any("dropped" in r.getMessage() for r in caplog.records), 5,
                       what="a warning about dropped events")
        relay = relay_factory(socket_path=path, directory=d)
        assert em.flush(10)
        sub = Subscriber(relay, ["overflow"], from_start=True)
        events = sub.wait_count("overflow", 10)
        sub.close()
        assert [e["n"] for e in events] == list(range(15, 25))
    finally:
        em.close(1)


class _Unprintable:
    def __str__(self):
        raise RuntimeError("no str for you")


class _Thing:
    def __str__(self):
        return "a thing"


def test_emit_never_raises_and_bad_events_go_to_the_log(relay, caplog):
    t = "bad"
    sub = Subscriber(relay, [t])
    em = progress_relay.Emitter(relay.socket_path)
    circular: list = []
    circular.append(circular)
    try:
        with caplog.at_level(logging.DEBUG, logger="progress_relay"):
            refused = [
                em.emit(None),
                em.emit(""),
                em.emit("a b"),
                em.emit("t" * 257),
                em.emit("ingé"),
                em.emit(42),
                em.emit(t, 5),
                em.emit(t, "y" * 65),
                em.emit(t, seq=1),
                em.emit(t, op="x"),
                em.emit(t, topic="other"),
                em.emit(t, "a", type="b"),
                em.emit(t, v=circular),
                em.emit(t, v=_Unprintable()),
                em.progress(t, object(), None, message=_Unprintable()),
            ]
            assert refused == [False] * len(refused)
            assert em.stats()["invalid"] == len(refused)
            assert em.emit(t, "converted",
                           when=datetime.datetime(2024, 1, 2, 3, 4, 5),
                           amount=decimal.Decimal("1.50"),
                           nan=float("nan"), inf=[float("-inf")],
                           raw=b"ab", thing=_Thing(), keys={1: "a", None: "b", (1, 2): "c"},
                           tup=(1, 2), surrogate="x\udcff")
            assert em.emit(t, "end")
            assert em.flush(5)
        events = [body(e) for e in sub.wait_count(t, 2)]
        assert events == [
            {"topic": t, "type": "converted", "when": "2024-01-02 03:04:05", "amount": "1.50",
             "nan": None, "inf": [None], "raw": "b'ab'", "thing": "a thing",
             "keys": {"1": "a", "null": "b", "(1, 2)": "c"}, "tup": [1, 2], "surrogate": "x?"},
            {"topic": t, "type": "end"},
        ]
        messages = "\n".join(r.getMessage() for r in caplog.records)
        assert "reserved" in messages and "topic" in messages and "circular" in messages
        assert relay.rejected_count() == 0
        assert em.stats()["rejected"] == 0
    finally:
        em.close()
        sub.close()


def test_emit_never_raises_and_never_blocks_without_relay(caplog):
    ems = [progress_relay.Emitter("/nonexistent-dir/p.sock", max_queue=100),
           progress_relay.Emitter("/tmp/" + "x" * 200 + ".sock", max_queue=100)]
    with caplog.at_level(logging.WARNING, logger="progress_relay"):
        t0 = time.monotonic()
        for em in ems:
            for i in range(2000):
                assert em.emit("nobody", n=i, v=object())
            em.progress("nobody", 1, 2)
        assert time.monotonic() - t0 < 2.0
        for em in ems:
            assert em.flush(0.2) is False
            assert em.stats()["dropped"] > 0
            assert em.close(0.1) is False
            assert em.emit("nobody", n=1) is False    # after close: dropped, logged
        wait_until(lambda: any("cannot connect" in r.getMessage() for r in caplog.records), 5,
                   what="a warning about the missing relay")


def test_rejected_lines_are_read_and_logged_and_later_lines_delivered(relay_factory, caplog):
    relay = relay_factory("--max-event-bytes", "1024")
    t = "rej"
    sub = Subscriber(relay, [t])
    em = progress_relay.Emitter(relay.socket_path)
    try:
        with caplog.at_level(logging.ERROR, logger="progress_relay"):
            assert em.emit(t, n=1)
            assert em.emit(t, big="x" * 2000)       # longer than the relay takes
            assert em.emit(t, n=2)
            assert em.flush(5)
            events = [body(e) for e in sub.wait_count(t, 2)]
            assert events == [{"topic": t, "n": 1}, {"topic": t, "n": 2}]
            rec = wait_until(lambda: [r for r in caplog.records if "rejected" in r.getMessage()],
                             5, what="the relay's answer in the log")
        msg = rec[0].getMessage()
        assert "line_too_long" in msg and "'rej'" in msg and "line 2" in msg, msg
        assert em.stats()["rejected"] == 1
        # the connection is still good
        assert em.emit(t, n=3) and em.flush(5)
        assert sub.wait_count(t, 3)[-1]["n"] == 3
        assert em.stats()["connections"] == 1
    finally:
        em.close()
        sub.close()


def test_many_answers_never_block_the_emitter(relay):
    """Thousands of rejected lines in a burst: the emitter reads answers as they come (the
    relay drops those a sender does not read in time) and nothing stalls."""
    t = "answers"
    sub = Subscriber(relay, [t])
    em = progress_relay.Emitter(relay.socket_path)
    logging.getLogger("progress_relay").disabled = True
    try:
        em.emit(t, n=0)
        # lines emit() would refuse, put straight into the queue: the relay rejects each one
        for _ in range(5000):
            em._enqueue(b'{"topic":"answers","seq":1}\n', t)
        em.emit(t, n=1)
        assert em.flush(20), em.stats()
        assert [e["n"] for e in sub.wait_count(t, 2)] == [0, 1]
        wait_until(lambda: em.stats()["rejected"] >= 100, 5, what="answers read")
        time.sleep(0.5)     # the rest of the burst's answers, or none
        # a few more, at a pace the relay's answers keep up with: every one is read
        before = em.stats()["rejected"]
        for i in range(20):
            em._enqueue(b'{"topic":"answers","op":"x"}\n', t)
            em.emit(t, n=2 + i)
            assert em.flush(5)
            time.sleep(0.005)
        wait_until(lambda: em.stats()["rejected"] == before + 20, 5, what="20 more answers read")
        assert [e["n"] for e in sub.wait_count(t, 22)] == list(range(22))
        assert em.stats()["connections"] == 1
    finally:
        logging.getLogger("progress_relay").disabled = False
        em.close()
        sub.close()


def test_threads_emit_concurrently(relay):
    t = "threads"
    sub = Subscriber(relay, [t])
    em = progress_relay.Emitter(relay.socket_path)
    per_thread, nthreads = 300, 8

    def work(k):
        for i in range(per_thread):
            em.emit(t, k=k, n=i)

    ths = [threading.Thread(target=work, args=(k,)) for k in range(nthreads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    try:
        assert em.flush(10)
        events = sub.wait_count(t, per_thread * nthreads)
        for k in range(nthreads):
            assert [e["n"] for e in events if e["k"] == k] == list(range(per_thread))
    finally:
        em.close()
        sub.close()


def _wait_child(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish within {timeout}s (deadlocked?)")


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_child_uses_its_own_connection(relay):
    """Parent and child emit at once, long lines: each line arrives whole (the relay rejects
    none), each side's events in order, and what the parent had queued at the fork is sent
    once, by the parent only."""
    t = "fork"
    sub = Subscriber(relay, [t])
    em = progress_relay.Emitter(relay.socket_path)
    pad = "p" * 8000
    for i in range(100):
        em.emit(t, who="parent", n=i, pad=pad)
    pid = os.fork()
    if pid == 0:   # the child
        code = 1
        try:
            ok = all(em.emit(t, who="child", n=i, pad=pad) for i in range(300))
            flushed = em.flush(10)
            st = em.stats()
            code = 0 if (ok and flushed and st["sent"] == 300 and st["connections"] == 1) else 3
        finally:
            os._exit(code)
    try:
        for i in range(100, 300):
            em.emit(t, who="parent", n=i, pad=pad)
        assert _wait_child(pid, 20) == 0
        assert em.flush(10)
        events = sub.wait_count(t, 600)
        time.sleep(0.2)
        events = sub.events[t]
        assert len(events) == 600
        for who in ("parent", "child"):
            assert [e["n"] for e in events if e["who"] == who] == list(range(300)), who
        assert all(e["pad"] == pad for e in events)
        assert relay.rejected_count() == 0
        assert em.stats()["connections"] == 1
    finally:
        em.close()
        sub.close()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_while_another_thread_holds_the_emitter_lock(relay):
    t = "forklock"
    sub = Subscriber(relay, [t])
    em = progress_relay.Emitter(relay.socket_path)
    em.emit(t, who="parent", n=0)
    assert em.flush(5)
    held = threading.Event()
    release = threading.Event()

    def hold():
        with em._lock:
            held.set()
            release.wait(5)

    th = threading.Thread(target=hold)
    th.start()
    held.wait(5)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if (em.emit(t, who="child", n=0) and em.flush(5)) else 2
        finally:
            os._exit(code)
    try:
        release.set()
        th.join()
        assert _wait_child(pid, 10) == 0
        em.emit(t, who="parent", n=1)
        assert em.flush(5)
        events = sub.wait_count(t, 3)
        assert sorted((e["who"], e["n"]) for e in events) == [
            ("child", 0), ("parent", 0), ("parent", 1)]
    finally:
        em.close()
        sub.close()


def test_flush_at_interpreter_exit(relay, tmp_path):
    """A script that emits and exits at once: the atexit flush writes its events."""
    t = "atexit"
    sub = Subscriber(relay, [t])
    script = tmp_path / "s.py"
    script.write_text(
        "import progress_relay\n"
        "for i in range(200):\n"
        "    progress_relay.emit('atexit', n=i)\n")
    import subprocess
    import sys
    env = dict(os.environ, PROGRESS_RELAY_SOCKET=relay.socket_path)
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=20)
    try:
        assert [e["n"] for e in sub.wait_count(t, 200)] == list(range(200))
    finally:
        sub.close()


def test_emit_is_fast():
    em = progress_relay.Emitter("/nonexistent-dir/p.sock", max_queue=100000)
    try:
        n = 20000
        t0 = time.perf_counter()
        for i in range(n):
            em.emit("fast", "progress", progress=i, message="working")
        per_call = (time.perf_counter() - t0) / n
        assert per_call < 100e-6, f"{per_call * 1e6:.1f} µs per emit"
    finally:
        em.close(0)


def test_flush_writes_inline_when_no_thread_can_start(relay):
    """As at interpreter shutdown on Python 3.12+, where threads can no longer be started:
    flush() writes on the caller's thread."""
    t = "inline"
    sub = Subscriber(relay, [t])
    em = progress_relay.Emitter(relay.socket_path)
    em._start_thread_locked = lambda: False
    try:
        for i in range(100):
            assert em.emit(t, n=i)
        assert em.stats()["queued"] == 100
        assert em.flush(5)
        assert em.emit(t, n=100)
        assert em.flush(None)
        assert [e["n"] for e in sub.wait_count(t, 101)] == list(range(101))
        assert em._thread is None
    finally:
        em.close(1)
        sub.close()
