"""clients/shell/progress-socat.sh and progress-emit.sh against a real relay."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from prhelpers import Subscriber, assert_seq_contiguous, relay_bin

SHELL = Path(__file__).resolve().parents[1]
SOCAT_SCRIPT = SHELL / "progress-socat.sh"
EMIT_SCRIPT = SHELL / "progress-emit.sh"


def run(script, *args, env=None, timeout=60):
    e = {k: v for k, v in os.environ.items()
         if k not in ("PROGRESS_RELAY_SOCKET", "PROGRESS_TOPIC")}
    e.update(env or {})
    return subprocess.run(["bash", str(script), *map(str, args)], env=e, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def check_job_events(events, topic, steps):
    assert len(events) == steps + 1, [e.get("type") for e in events]
    assert_seq_contiguous(events)
    for i, e in enumerate(events[:steps], 1):
        assert {k: v for k, v in e.items() if k != "seq"} == {
            "topic": topic, "type": "progress", "progress": i * 100 // steps, "current": i,
            "total": steps, "message": f"step {i} of {steps}", "status": "PROGRESS"}
    assert {k: v for k, v in events[-1].items() if k != "seq"} == {
        "topic": topic, "type": "complete", "success": True, "message": "done",
        "result": {"steps": steps}}


needs_socat = pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")


@needs_socat
def test_socat_loop(relay):
    topic = "job:socat-1"
    sub = Subscriber(relay, [topic])
    try:
        p = run(SOCAT_SCRIPT, "-s", relay.socket_path, "-n", 25, "-d", 0.01, topic)
        assert p.returncode == 0, p.stderr
        assert p.stderr == ""
        sub.wait_type(topic, "complete", 10)
        time.sleep(0.1)
        check_job_events(sub.events[topic], topic, 25)
    finally:
        sub.close()


@needs_socat
def test_socat_loop_from_the_environment(relay):
    topic = "job:socat-env"
    sub = Subscriber(relay, [topic])
    try:
        p = run(SOCAT_SCRIPT, "-n", 3, "-d", 0,
                env={"PROGRESS_RELAY_SOCKET": relay.socket_path, "PROGRESS_TOPIC": topic})
        assert p.returncode == 0, p.stderr
        sub.wait_type(topic, "complete", 10)
        check_job_events(sub.events[topic], topic, 3)
    finally:
        sub.close()


def test_progress_relay_emit_loop(relay):
    topic = "job:emit-1"
    sub = Subscriber(relay, [topic])
    try:
        p = run(EMIT_SCRIPT, "-s", relay.socket_path, "-n", 20, "-d", 0, "-b", relay_bin(),
                topic)
        assert p.returncode == 0, p.stderr
        assert p.stderr == ""
        sub.wait_type(topic, "complete", 10)
        time.sleep(0.1)
        check_job_events(sub.events[topic], topic, 20)
    finally:
        sub.close()


def test_progress_relay_emit_loop_from_the_environment(relay):
    topic = "job:emit-env"
    sub = Subscriber(relay, [topic])
    try:
        p = run(EMIT_SCRIPT, "-n", 2, "-d", 0,
                env={"PROGRESS_RELAY_SOCKET": relay.socket_path, "PROGRESS_TOPIC": topic,
                     "PROGRESS_RELAY_BIN": relay_bin()})
        assert p.returncode == 0, p.stderr
        sub.wait_type(topic, "complete", 10)
        check_job_events(sub.events[topic], topic, 2)
    finally:
        sub.close()


@needs_socat
def test_jobs_finish_when_the_relay_is_down(tmp_path):
    missing = str(tmp_path / "none.sock")
    p = run(SOCAT_SCRIPT, "-s", missing, "-n", 3, "-d", 0, "job:x")
    assert p.returncode == 0, p.stderr
    assert "cannot reach the relay" in p.stderr
    p = run(EMIT_SCRIPT, "-s", missing, "-n", 3, "-d", 0, "-b", relay_bin(), "job:x")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("event not sent") == 4


def test_bad_arguments(tmp_path):
    p = run(SOCAT_SCRIPT, "-s", str(tmp_path / "s"), "bad topic")
    assert p.returncode == 2 and "TOPIC" in p.stderr
    p = run(SOCAT_SCRIPT, "-n", "x", "job:1")
    assert p.returncode == 2
    p = run(EMIT_SCRIPT, "-b", relay_bin())
    assert p.returncode == 2 and "TOPIC" in p.stderr


# -- numbers: read as decimal, sent as JSON numbers, refused in one line -----------------------

SCRIPTS = [pytest.param(SOCAT_SCRIPT, marks=needs_socat, id="socat"),
           pytest.param(EMIT_SCRIPT, id="emit")]


def relay_args(script):
    """The arguments that make `script` use the relay binary under test."""
    return ["-b", relay_bin()] if script == EMIT_SCRIPT else []


@pytest.mark.parametrize("given, steps", [("08", 8), ("010", 10), ("0001", 1)])
@pytest.mark.parametrize("script", SCRIPTS)
def test_steps_are_read_as_decimal(relay, script, given, steps):
    """-n 010 is 10 steps and -n 08 is 8, sent as the JSON numbers 10 and 8 (bash's arithmetic
    reads 010 as octal 8 and fails on 08; 010 is not JSON, and emit sent it as a string)."""
    topic = f"job:decimal-{given}"
    sub = Subscriber(relay, [topic])
    try:
        p = run(script, "-s", relay.socket_path, "-n", given, "-d", "00.0", *relay_args(script),
                topic)
        assert p.returncode == 0, p.stderr
        assert p.stderr == ""
        sub.wait_type(topic, "complete", 10)
        time.sleep(0.1)
        check_job_events(sub.events[topic], topic, steps)
    finally:
        sub.close()
    assert relay.stats()["events_rejected"] == 0


BAD_NUMBERS = [
    ("-n", "0"), ("-n", "000"), ("-n", ""), ("-n", "abc"), ("-n", "-3"), ("-n", "+5"),
    ("-n", " 5"), ("-n", "1.5"), ("-n", "1e3"), ("-n", "0x10"),
    ("-n", "9007199254740992"),        # 2^53: past what JSON readers (JavaScript) hold exactly
    ("-n", "99999999999999999999"),    # past 64 bits, where bash's arithmetic wraps around
    ("-d", ""), ("-d", "abc"), ("-d", "-1"), ("-d", "."), ("-d", "1.2.3"), ("-d", "1,5"),
    ("-d", "1e-3"), ("-d", "0x0"),
]


@pytest.mark.parametrize("flag, value", BAD_NUMBERS)
@pytest.mark.parametrize("script", [SOCAT_SCRIPT, EMIT_SCRIPT], ids=["socat", "emit"])
def test_bad_numbers_are_refused_in_one_line(relay, script, flag, value):
    """A bad -n or -d exits 2 before the job starts, with one line that names the flag and
    repeats the value given, and sends nothing."""
    p = run(script, "-s", relay.socket_path, "-d", 0, flag, value, *relay_args(script),
            "job:bad", timeout=15)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    assert p.stderr.startswith(f"{script.stem}: {flag} ") and p.stderr.count("\n") == 1, p.stderr
    assert f"not '{value}'" in p.stderr
    stats = relay.stats()
    assert stats["events_received"] == stats["events_rejected"] == 0, stats


@pytest.mark.parametrize("script", SCRIPTS)
def test_topic_that_starts_with_a_dash(relay, script):
    """A valid topic such as `-job:1` is the topic, not a flag of `progress-relay emit`."""
    topic = "-job:dash"
    sub = Subscriber(relay, [topic])
    try:
        p = run(script, "-s", relay.socket_path, "-n", 2, "-d", 0, *relay_args(script), "--",
                topic)
        assert p.returncode == 0, p.stderr
        assert p.stderr == ""
        sub.wait_type(topic, "complete", 10)
        time.sleep(0.1)
        check_job_events(sub.events[topic], topic, 2)
    finally:
        sub.close()
