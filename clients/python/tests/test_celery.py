"""progress_relay.celery with a real Celery worker (prefork pool, 2 processes), a real broker
(Redis from `redis-server`, or Celery's filesystem transport when Redis is not installed) and a
real relay, observed by a WebSocket subscriber."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prhelpers import Relay, Subscriber, assert_seq_contiguous

celery = pytest.importorskip("celery")

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def mrelay():
    r = Relay()
    r.start()
    yield r
    r.cleanup()


@pytest.fixture(scope="module")
def worker(broker, mrelay):
    log = mrelay.dir / "worker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESS_RELAY_")}
    env.update(broker)
    env["PROGRESS_RELAY_SOCKET"] = mrelay.socket_path
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool=prefork",
           "--concurrency=2", "--loglevel=INFO", "--without-heartbeat", "--without-mingle",
           "--without-gossip", "-Q", broker["PRTEST_QUEUE"],
           "-n", f"prtest-{uuid.uuid4().hex[:6]}@%h"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 40
    while b" ready." not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the Celery worker did not start:\n"
                                 + log.read_text(errors="replace")[-5000:])
        time.sleep(0.1)
    yield proc, log
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)


@pytest.fixture(scope="module")
def client(broker):
    old = {k: os.environ.get(k) for k in broker}
    os.environ.update(broker)
    try:
        sys.path.insert(0, str(HERE))
        from celery_app import make_app
        app = make_app("prtest-client")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield app
    # AsyncResult.__del__ talks to the result backend: collect them while Redis still runs,
    # or a later garbage collection (in another test) retries against a dead server for seconds.
    gc.collect()
    app.close()


@pytest.fixture(autouse=True)
def _worker_log_on_failure(request, worker):
    yield
    gc.collect()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("----- celery worker log -----")
        print(worker[1].read_text(errors="replace")[-15000:])


def test_two_tasks_report_100_steps_in_order_then_complete(mrelay, worker, client):
    ids = [str(uuid.uuid4()) for _ in range(2)]
    topics = [f"task:{i}" for i in ids]
    sub = Subscriber(mrelay, topics)
    try:
        results = [client.send_task("prtest.count", args=[100, 0.01], task_id=i) for i in ids]
        values = [r.get(timeout=30) for r in results]
        for topic, value in zip(topics, values):
            sub.wait_type(topic, "complete", timeout=15)
            events = sub.events[topic]
            assert len(events) == 101, [e.get("type") for e in events]
            assert_seq_contiguous(events)
            assert events[0]["seq"] == 1
            for i, e in enumerate(events[:100], 1):
                assert {k: v for k, v in e.items() if k != "seq"} == {
                    "topic": topic, "type": "progress", "progress": i, "current": i,
                    "total": 100, "message": f"step {i} of 100", "status": "PROGRESS"}
            done = events[100]
            assert {k: v for k, v in done.items() if k != "seq"} == {
                "topic": topic, "type": "complete", "success": True, "message": "done",
                "result": value}
            assert value["steps"] == 100
        # prefork pool of two: the two tasks ran at once, in the two pool processes
        assert values[0]["pid"] != values[1]["pid"]
        assert worker[0].pid not in (values[0]["pid"], values[1]["pid"])
    finally:
        sub.close()


def test_failing_task_publishes_error(mrelay, worker, client):
    task_id = str(uuid.uuid4())
    topic = f"task:{task_id}"
    sub = Subscriber(mrelay, [topic])
    try:
        r = client.send_task("prtest.fail", task_id=task_id)
        with pytest.raises(Exception) as exc:
            r.get(timeout=30)
        assert "boom" in str(exc.value)
        err = sub.wait_type(topic, "error", timeout=15)
        events = sub.events[topic]
        assert [e["type"] for e in events] == ["progress", "error"]
        assert {k: v for k, v in err.items() if k != "seq"} == {
            "topic": topic, "type": "error", "error": "ValueError: boom",
            "details": {"type": "ValueError"}}
    finally:
        sub.close()


def test_relay_down_does_not_fail_the_task(mrelay, worker, client):
    """Runs last in this module: stops the shared relay, then starts it again."""
    assert mrelay.stop() == 0
    try:
        task_id = str(uuid.uuid4())
        t0 = time.monotonic()
        r = client.send_task("prtest.count", args=[5], task_id=task_id)
        value = r.get(timeout=30)
        assert value["steps"] == 5
        assert r.successful()
        assert time.monotonic() - t0 < 10
    finally:
        mrelay.start()
    # what the pool process queued meanwhile reaches the relay once it is back
    topic = f"task:{task_id}"
    sub = Subscriber(mrelay, [topic], from_start=True)
    try:
        sub.wait_type(topic, "complete", timeout=15)
        events = sub.events[topic]
        assert [e["type"] for e in events] == ["progress"] * 5 + ["complete"]
        assert [e["current"] for e in events[:5]] == [1, 2, 3, 4, 5]
    finally:
        sub.close()
