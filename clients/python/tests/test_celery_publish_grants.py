"""progress_relay.celery against a relay with `--publish-grant` (issue 14): real Celery workers
(prefork) running as unprivileged uids, a real broker (tests/test_celery.py's `broker`: Redis from
`redis-server`, or the filesystem transport). A worker in the granted group publishes its tasks'
events; one outside it is refused: the relay drops its events, the client logs the refusal once,
and the task itself succeeds.

The workers run under other uids and groups through setpriv, so these tests need root (as CI runs
them); the ids are unused ones (no passwd or group entry), as the end-to-end suite picks them."""

from __future__ import annotations

import gc
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prhelpers import Relay, Subscriber, short_tmpdir, wait_until
from relaylib import _unused_id, drops_privileges

celery = pytest.importorskip("celery")

pytestmark = pytest.mark.skipif(not drops_privileges(),
                                reason="workers under other uids and groups need root (setpriv)")

HERE = Path(__file__).resolve().parent

GID_CELERY = _unused_id(63100, 63999)            # the workers' group, granted task:*
UID_IN = _unused_id(62100, 62999)                # a worker in that group
UID_OUT = _unused_id(UID_IN + 1, 62999)          # a worker outside it


def forbidden_count(relay) -> float:
    m = re.search(r'^progress_relay_events_rejected_total\{reason="forbidden_topic"\} (\S+)$',
                  relay.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def grelay():
    r = Relay("--socket-mode", "0666", "--publish-grant", f"gid:{GID_CELERY}=task:*")
    os.chmod(r.dir, 0o711)      # the workers' uids reach the socket through the relay's directory
    r.start()
    yield r
    r.cleanup()


def start_worker(broker_env: dict, relay, uid: int, groups: list[int], name: str):
    """A Celery worker as uid:uid with exactly `groups` as supplementary groups, on a queue of
    its own; returns (process, log path, queue)."""
    home = short_tmpdir(f"prc-{name}-")
    os.chown(home, uid, uid)
    log = home / "worker.log"
    queue = f"prgrant-{name}-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESS_RELAY_")}
    env.update(broker_env)
    env.update(HOME=str(home), PRTEST_QUEUE=queue, PROGRESS_RELAY_SOCKET=relay.socket_path,
               PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
               .rstrip(os.pathsep))
    group_arg = ["--groups=" + ",".join(map(str, groups))] if groups else ["--clear-groups"]
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", *group_arg, "--",
           sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool=prefork",
           "--concurrency=1", "--loglevel=INFO", "--without-heartbeat", "--without-mingle",
           "--without-gossip", "-Q", queue, "-n", f"prgrant-{name}-{uuid.uuid4().hex[:6]}@%h"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 40
    while b" ready." not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the Celery worker ({name}) did not start:\n"
                                 + log.read_text(errors="replace")[-5000:])
        time.sleep(0.1)
    return proc, log, queue, home


def stop_worker(proc, home) -> None:
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
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def workers(broker, grelay):
    inside = start_worker(broker, grelay, UID_IN, [GID_CELERY], "in")
    try:
        outside = start_worker(broker, grelay, UID_OUT, [], "out")
    except BaseException:
        stop_worker(inside[0], inside[3])
        raise
    yield {"in": inside, "out": outside}
    for proc, _, _, home in (inside, outside):
        stop_worker(proc, home)


@pytest.fixture(scope="module")
def client(broker):
    old = {k: os.environ.get(k) for k in broker}
    os.environ.update(broker)
    try:
        sys.path.insert(0, str(HERE))
        from celery_app import make_app
        app = make_app("prgrant-client")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield app
    gc.collect()
    app.close()


def _dump_logs(workers) -> str:
    return "\n".join(f"----- worker {name} -----\n" + w[1].read_text(errors="replace")[-6000:]
                     for name, w in workers.items())


def test_worker_in_the_granted_group_publishes(grelay, workers, client):
    _, log, queue, _ = workers["in"]
    task_id = str(uuid.uuid4())
    topic = f"task:{task_id}"
    sub = Subscriber(grelay, [topic])
    try:
        result = client.send_task("prtest.count", args=[3], task_id=task_id, queue=queue)
        value = result.get(timeout=30)
        assert value["steps"] == 3
        sub.wait_type(topic, "complete", timeout=15)
        assert [e["type"] for e in sub.events[topic]] == ["progress"] * 3 + ["complete"], \
            _dump_logs(workers)
    finally:
        sub.close()
    assert "forbidden_topic" not in log.read_text(errors="replace")


def test_worker_outside_the_group_is_refused_once_and_its_task_succeeds(grelay, workers, client):
    _, log, queue, _ = workers["out"]
    before = forbidden_count(grelay)
    ids = [str(uuid.uuid4()) for _ in range(2)]
    topics = [f"task:{i}" for i in ids]
    sub = Subscriber(grelay, topics)
    try:
        for task_id in ids:
            result = client.send_task("prtest.count", args=[3], task_id=task_id, queue=queue)
            value = result.get(timeout=30)
            assert value["steps"] == 3 and result.successful()
        # 3 progress + complete, twice: all refused
        wait_until(lambda: forbidden_count(grelay) - before >= 8, 15,
                   what="the relay refusing the outside worker's events")
        time.sleep(0.3)
        assert all(sub.events[t] == [] for t in topics), dict(sub.events)
    finally:
        sub.close()
    text = log.read_text(errors="replace")
    assert text.count("the relay refuses topic") == 1, _dump_logs(workers)
    assert "forbidden_topic" in text
    assert "Traceback" not in text, text[-5000:]
    # the relay logged it with the worker's uid
    assert f"uid={UID_OUT}" in grelay.log_text()
