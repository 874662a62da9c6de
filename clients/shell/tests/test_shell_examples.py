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
