"""Cluster mode (issue 13): several relays share topics through one Redis.

Three relays A, B and C (each its own ingest socket and HTTP port, the same --jwt-secret-file
content, the same --redis) around one redis-server of the test's own (redislib.RedisServer: a
Unix socket in a fresh temporary directory, persistence off unless a test says otherwise). The
issue asks for the HTTP ports 127.0.0.1:8765/8766/8767: they are used when all three are free,
otherwise (another relay, or another run of this suite, holds one) each relay gets a free port;
nothing in the tests depends on the port numbers.

What is checked is the contract of docs/protocol.md plus the issue's cluster promises: one seq per
topic across relays, resume on any relay, every line delivered in order exactly once through Redis
blips, hangs and restarts, and every loss (a Redis that lost or may have rolled back a topic)
announced by a repeated `subscribed` with a new epoch, never silent. `audit()` below is the one
judge of a subscriber's stream: a seq that does not follow the previous one is a failure unless a
`subscribed` frame came in between.

Sizes: every count and wait is bounded. The bounds test runs 1,000 topics x 100 events by default
and the issue's 10,000 x 100 with PROGRESS_RELAY_LONG=1 (also the wandering test's full 10,000
events are the default; it is fast enough).

Self-check: with PROGRESS_RELAY_CLUSTER_SELFCHECK=no-redis the relays are started WITHOUT --redis
(and its companion flags), i.e. as independent relays; the cross-relay tests must then fail
(B and C receive nothing of what A was sent). This is only there to prove the tests can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import time

import pytest

import redislib
from redislib import RedisServer, have_redis, text
from relaylib import (
    ConnectionClosed, async_test, async_wait_until, event_text, free_port, recv_json,
    send_json, ws_connect, RelayStartError,
)

pytestmark = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")

LONG = os.environ.get("PROGRESS_RELAY_LONG") == "1"
SELFCHECK_NO_REDIS = os.environ.get("PROGRESS_RELAY_CLUSTER_SELFCHECK") == "no-redis"
ISSUE_PORTS = (8765, 8766, 8767)
PREFIX = "progress-relay"           # the default --redis-prefix
NAMES = "ABC"


# --------------------------------------------------------------------------------------------
# Redis keys of the issue's data model

def meta_key(topic: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:m:{{{topic}}}"


def hist_key(topic: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:h:{{{topic}}}"


def topics_key(prefix: str = PREFIX) -> str:
    return f"{prefix}:topics"


def redis_meta(redis: RedisServer, topic: str) -> dict:
    raw = redis.cli("HGETALL", meta_key(topic))
    return {text(raw[i]): text(raw[i + 1]) for i in range(0, len(raw), 2)}


# --------------------------------------------------------------------------------------------
# fixtures

def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture
def redis_factory():
    """make(*options, tcp=False, password=None, start=True) -> RedisServer; all are killed and
    their directories removed at teardown."""
    redislib._STARTED.clear()
    made: list[RedisServer] = []

    def make(*options, tcp=False, password=None, start=True, name=None) -> RedisServer:
        s = RedisServer(options, tcp=tcp, password=password,
                        name=name or f"redis{len(made) + 1 if made else ''}")
        made.append(s)
        if start:
            s.start()
        return s

    yield make
    for s in made:
        s.cleanup()


class Cluster:
    def __init__(self, redis: RedisServer | None, relays: list):
        self.redis = redis
        self.relays = relays

    def __getitem__(self, i):
        return self.relays[i]

    @property
    def A(self):
        return self.relays[0]

    @property
    def B(self):
        return self.relays[1]

    @property
    def C(self):
        return self.relays[2]


def _strip_cluster_flags(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a.startswith("--redis") or a == "--node-name":
            skip = "=" not in a
            continue
        out.append(a)
    return out


@pytest.fixture
def cluster_factory(redis_factory, relay_factory):
    """make(n=3, relay_args=(), redis_options=(), redis=None, tcp=False, url=None) -> Cluster.

    Requests redis_factory before relay_factory, so that at teardown the relays stop first,
    while their Redis still runs."""

    def make(n: int = 3, relay_args=(), redis_options=(), redis: RedisServer | None = None,
             tcp: bool = False, url: str | None = None, wait_ready: bool = True) -> Cluster:
        if redis is None:
            redis = redis_factory(*redis_options, tcp=tcp)
        secret = secrets.token_hex(32)
        issue_ports = n <= 3 and all(_port_free(p) for p in ISSUE_PORTS[:n])
        relays = []
        for i in range(n):
            args = ["--redis", url or redis.url(), "--node-name", NAMES[i], *relay_args]
            if SELFCHECK_NO_REDIS:
                args = _strip_cluster_flags(args)
            r = relay_factory(*args, start=False, name=f"relay{NAMES[i]}", secret=secret)
            if issue_ports:
                r.port = ISSUE_PORTS[i]
            try:
                r.start()
            except RelayStartError:
                if not issue_ports:
                    raise
                # the issue's port was taken in the meantime: any free one will do
                r.port = free_port()
                r.start()
            relays.append(r)
        if wait_ready and not SELFCHECK_NO_REDIS:
            for r in relays:
                wait_readyz(r, 200, timeout=15)
        return Cluster(redis, relays)

    return make


# --------------------------------------------------------------------------------------------
# HTTP

def readyz(relay, timeout: float = 2.0) -> tuple[int, str]:
    return relay.http("/readyz", timeout=timeout)


def wait_readyz(relay, status: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = readyz(relay)
            if last[0] == status:
                return last[1]
        except OSError as e:
            last = repr(e)
        if time.monotonic() > deadline:
            raise AssertionError(f"{relay.name}: GET /readyz did not answer {status} within "
                                 f"{timeout}s; last answer: {last}")
        time.sleep(0.05)


async def await_readyz(relay, status: int, timeout: float = 10.0) -> str:
    return await asyncio.to_thread(wait_readyz, relay, status, timeout)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------------------------
# emitting

def line(topic: str, i: int, pad: int = 0, **kw) -> bytes:
    d = {"topic": topic, "i": i, **kw}
    if pad:
        d["pad"] = ""
        base = len(json.dumps(d, separators=(",", ":")))
        d["pad"] = "x" * max(0, pad - base)
    return json.dumps(d, separators=(",", ":")).encode() + b"\n"


class Emitter:
    """One ingest connection kept open (asyncio). `sent` counts the bytes the kernel took."""

    def __init__(self, relay, reader, writer):
        self.relay = relay
        self.reader = reader
        self.writer = writer
        self.sent = 0
        self.batches = 0

    @classmethod
    async def open(cls, relay) -> "Emitter":
        reader, writer = await asyncio.open_unix_connection(relay.socket_path, limit=2 ** 20)
        return cls(relay, reader, writer)

    async def send(self, data: bytes | list[bytes]) -> None:
        if isinstance(data, list):
            data = b"".join(data)
        self.writer.write(data)
        await self.writer.drain()
        self.sent += len(data)
        self.batches += 1

    async def finish(self, timeout: float = 30.0) -> list[dict]:
        """Half-close, read the relay's answers to EOF: the list of rejected lines."""
        self.writer.write_eof()
        try:
            raw = await asyncio.wait_for(self.reader.read(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.relay.name} did not close the ingest connection within "
                                 f"{timeout}s of the emitter's EOF")
        self.writer.close()
        return [json.loads(l) for l in raw.splitlines() if l.strip()]


async def emit(relay, lines: list[bytes], batch: int = 200, pause: float = 0.0,
               on_batch=None) -> None:
    """Send `lines` on one connection, `batch` at a time with `pause` s between batches;
    on_batch(lines sent so far) after each (it may be async). Fails on any rejected line."""
    em = await Emitter.open(relay)
    for k in range(0, len(lines), batch):
        await em.send(lines[k:k + batch])
        if on_batch is not None:
            r = on_batch(min(k + batch, len(lines)))
            if asyncio.iscoroutine(r):
                await r
        if pause:
            await asyncio.sleep(pause)
    answers = await em.finish()
    assert answers == [], f"{relay.name} rejected lines: {answers[:5]}"


# --------------------------------------------------------------------------------------------
# subscribing

class Sub:
    """A WebSocket subscriber that reads every frame in the background into `frames` (parsed)
    and `texts` (as received), and remembers how the connection ended."""

    def __init__(self, ws, name: str):
        self.ws = ws
        self.name = name
        self.frames: list[dict] = []
        self.texts: list[str] = []
        self.closed: ConnectionClosed | None = None
        self.done = False
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, relay, topics=(), name: str | None = None) -> "Sub":
        ws = await ws_connect(relay, topics=topics, open_timeout=10)
        return cls(ws, name or relay.name)

    async def _read(self):
        try:
            async for msg in self.ws:
                self.texts.append(msg)
                self.frames.append(json.loads(msg))
        except ConnectionClosed as e:
            self.closed = e
        finally:
            self.done = True

    def events(self, topic: str | None = None) -> list[dict]:
        return [f for f in self.frames
                if "op" not in f and (topic is None or f.get("topic") == topic)]

    def event_texts(self, topic: str | None = None) -> list[str]:
        return [t for t, f in zip(self.texts, self.frames)
                if "op" not in f and (topic is None or f.get("topic") == topic)]

    def subscribed(self, topic: str | None = None) -> list[dict]:
        return [f for f in self.frames if f.get("op") == "subscribed"
                and (topic is None or f.get("topic") == topic)]

    def errors(self) -> list[dict]:
        return [f for f in self.frames if f.get("op") == "error"]

    def assert_open(self):
        assert not self.done, (f"subscriber {self.name} was closed: {self.closed!r} "
                               f"after {len(self.frames)} frames")

    async def wait(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not pred():
            if self.done:
                raise AssertionError(f"subscriber {self.name} closed ({self.closed!r}) while "
                                     f"waiting for {what}; {len(self.frames)} frames, last: "
                                     f"{self.frames[-3:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"subscriber {self.name}: timed out after {timeout}s waiting "
                                     f"for {what}; {len(self.events())} events, last frames: "
                                     f"{self.frames[-3:]}")
            await asyncio.sleep(0.02)

    async def wait_events(self, n: int, topic: str | None = None, timeout: float = 30.0):
        await self.wait(lambda: len(self.events(topic)) >= n, timeout,
                        f"{n} events" + (f" of {topic}" if topic else ""))
        return self.events(topic)

    async def wait_for_i(self, i: int, topic: str, timeout: float = 30.0):
        """Until an event of `topic` carrying payload i == `i` arrived."""
        await self.wait(lambda: any(e.get("i") == i for e in reversed(self.events(topic))),
                        timeout, f"event i={i} of {topic}")

    async def subscribe(self, topic: str, epoch: str | None = None, since: int | None = None,
                        timeout: float = 10.0) -> dict:
        start = len(self.frames)
        msg = {"op": "subscribe", "topic": topic}
        if epoch is not None:
            msg["epoch"] = epoch
        if since is not None:
            msg["since"] = since
        await send_json(self.ws, msg)

        def found():
            return next((f for f in self.frames[start:]
                         if f.get("op") in ("subscribed", "error") and f.get("topic") == topic),
                        None)

        await self.wait(lambda: found() is not None, timeout, f"subscribed {topic}")
        f = found()
        assert f.get("op") == "subscribed", f"subscribe {topic} on {self.name}: {f}"
        return f

    async def close(self):
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 5)


async def sub_to(relay, topic: str, name: str | None = None, **kw) -> tuple[Sub, dict]:
    s = await Sub.open(relay, name=name)
    f = await s.subscribe(topic, **kw)
    return s, f


def audit(frames: list[dict], topic: str, since: int | None = None) -> tuple[list, list]:
    """The judge of one subscriber's stream of `topic` (one connection, from its first
    `subscribed` of the topic on). Fails on a silent loss or a duplicate: each event must be the
    next seq of the current epoch; only a `subscribed` frame (recovered:false) may restart the
    numbering, and then the first event must be the newest it announced.

    `since`: the since of the first subscribe, when it was a resume. Returns
    (events as (epoch, seq, frame), the repeated `subscribed` frames)."""
    epoch = None
    expect = None
    started = False
    events = []
    resets = []
    for idx, f in enumerate(frames):
        if f.get("topic") != topic:
            continue
        if f.get("op") == "subscribed":
            assert f.get("recovered") in (True, False), f
            if not started:
                started = True
                epoch = f["epoch"]
                if f["recovered"]:
                    assert since is not None, f"recovered:true without a since: {f}"
                    expect = since + 1
                else:
                    expect = f["seq"] if f["seq"] > 0 else 1
            else:
                resets.append(f)
                assert f["recovered"] is False, (
                    f"a repeated subscribed must announce a loss (recovered:false): frame {idx}: {f}")
                epoch = f["epoch"]
                expect = f["seq"] if f["seq"] > 0 else 1
            continue
        if f.get("op") is not None:
            continue
        assert started, f"event before subscribed: frame {idx}: {f}"
        assert f["seq"] == expect, (
            f"silent loss or duplicate: frame {idx} is seq {f['seq']} of {topic}, expected "
            f"{expect} (epoch {epoch}); frames around it: {frames[max(0, idx - 3):idx + 2]}")
        events.append((epoch, f["seq"], f))
        expect += 1
    return events, resets


def ids(events) -> list:
    return [e[2]["i"] if isinstance(e, tuple) else e["i"] for e in events]


# --------------------------------------------------------------------------------------------
# single relay, configuration, /readyz

@async_test(timeout=60)
async def test_single_relay_with_redis_behaves_like_today(cluster_factory):
    c = cluster_factory(n=1)
    r = c.A
    s, f = await sub_to(r, "task:42")
    assert set(f) == {"op", "topic", "epoch", "seq", "recovered", "ping_interval"}, f
    assert (f["seq"], f["recovered"]) == (0, False)
    lines = [b'{"topic":"task:42","type":"progress","progress":%d,"message":"%d/5"}' % (20 * i, i)
             for i in range(1, 6)]
    assert await r.aemit(lines) == []
    await s.wait_events(5, timeout=10)
    assert s.event_texts() == [event_text(i + 1, l) for i, l in enumerate(lines)]
    await s.close()

    # resume, newest-only: as today
    s2, f2 = await sub_to(r, "task:42", epoch=f["epoch"], since=2)
    assert f2 == {"op": "subscribed", "topic": "task:42", "epoch": f["epoch"], "seq": 5,
                  "recovered": True, "ping_interval": 25}
    await s2.wait_events(3)
    assert [e["seq"] for e in s2.events()] == [3, 4, 5]
    s3, f3 = await sub_to(r, "task:42")
    assert (f3["seq"], f3["recovered"]) == (5, False)
    await s3.wait_events(1)
    await asyncio.sleep(0.3)
    assert [e["seq"] for e in s3.events()] == [5]
    # bad lines are still answered on the ingest connection
    answers = await r.aemit([b'{"topic":"x","seq":1}', b'not json'])
    assert [a["line"] for a in answers] == [1, 2], answers
    # and Redis holds the topic as the issue describes it
    if not SELFCHECK_NO_REDIS:
        assert "progress_relay_redis_up 1" in r.metrics()
        m = redis_meta(c.redis, "task:42")
        assert m.get("e") == f["epoch"] and m.get("s") == "5", m
        assert c.redis.cli("XLEN", hist_key("task:42")) == 5


def test_readyz_is_200_without_redis(relay):
    status, body = readyz(relay)
    assert status == 200, (status, body)
    assert relay.http("/healthz") == (200, "ok")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:6379",           # not a Redis scheme
    "redis://127.0.0.1:notaport",
    "redis://127.0.0.1:99999",
    "redis://127.0.0.1:6379/notadb",
    "unix://",                         # no path
    "",
])
def test_bad_redis_url_exits_2_naming_the_flag(relay_factory, url):
    r = relay_factory("--redis", url, start=False)
    p = r.run_to_exit(timeout=10)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2, (p.returncode, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line on stderr: {err!r}"
    assert "--redis" in lines[0], lines[0]


def test_bad_redis_url_from_the_environment_names_the_variable(relay_factory):
    r = relay_factory(env={"PROGRESS_RELAY_REDIS": "http://nowhere"}, start=False)
    p = r.run_to_exit(timeout=10)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2, (p.returncode, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "PROGRESS_RELAY_REDIS" in lines[0], err


@async_test(timeout=60)
async def test_readyz_follows_redis_reachability(redis_factory, relay_factory):
    """A relay whose Redis is not there yet serves (/healthz 200) but is not ready (/readyz 503
    with a reason); it becomes ready once Redis answers, without a restart."""
    redis = redis_factory(start=False)
    r = relay_factory("--redis", redis.url(), "--node-name", "A")
    assert r.http("/healthz") == (200, "ok")
    status, body = readyz(r)
    assert status == 503 and body.strip(), (status, body)
    redis.start()
    await await_readyz(r, 200, timeout=10)
    # and it works
    s, _ = await sub_to(r, "t")
    assert await r.aemit([line("t", 1)]) == []
    await s.wait_events(1, timeout=10)


@async_test(timeout=60)
async def test_tcp_redis_with_password_and_db(redis_factory, cluster_factory):
    redis = redis_factory(tcp=True, password="s3cret-pw")
    c = cluster_factory(n=2, redis=redis, url=redis.url(db=3, user="default",
                                                        password="s3cret-pw"))
    sb, fb = await sub_to(c.B, "tcp")
    lines = [line("tcp", i) for i in range(500)]
    await emit(c.A, lines)
    await sb.wait_events(500, timeout=20)
    events, resets = audit(sb.frames, "tcp")
    assert ids(events) == list(range(500)) and resets == []
    if not SELFCHECK_NO_REDIS:
        # the keys are in database 3, not 0
        assert redis.cli("EXISTS", meta_key("tcp")) == 0
        with redis.connect() as conn:
            assert conn.call("SELECT", 3) == b"OK"
            assert text(conn.call("HGET", meta_key("tcp"), "s")) == "500"
            assert text(conn.call("HGET", meta_key("tcp"), "e")) == fb["epoch"]


@async_test(timeout=60)
async def test_prefix_separates_clusters_on_one_redis(redis_factory, relay_factory):
    redis = redis_factory()
    secret = secrets.token_hex(32)
    one = relay_factory("--redis", redis.url(), "--redis-prefix", "one", name="relay-one",
                        secret=secret)
    two = relay_factory("--redis", redis.url(), "--redis-prefix", "two", name="relay-two",
                        secret=secret)
    for r in (one, two):
        await await_readyz(r, 200)
    s1, _ = await sub_to(one, "x")
    s2, _ = await sub_to(two, "x")
    await emit(one, [line("x", i) for i in range(3)])
    await s1.wait_events(3, timeout=10)
    await asyncio.sleep(0.5)
    assert s2.events() == [], "a relay with another prefix received the events"
    if not SELFCHECK_NO_REDIS:
        assert text(redis.cli("HGET", meta_key("x", "one"), "s")) == "3"
        # relay-two's subscriber made its own topic "x" (read, seq 0), untouched by relay-one
        assert text(redis.cli("HGET", meta_key("x", "two"), "s")) == "0"
        assert not redis.scan(f"{PREFIX}:*"), "a key under the default prefix"


@async_test(timeout=60)
async def test_state_file_is_ignored_in_cluster_mode(redis_factory, relay_factory):
    redis = redis_factory()
    r = relay_factory("--redis", redis.url(), start=False)
    state = r.dir / "state.json"
    r.extra_args += ["--state-file", str(state)]
    r.start()
    await await_readyz(r, 200)
    s, _ = await sub_to(r, "t")
    await emit(r, [line("t", 1)])
    await s.wait_events(1, timeout=10)
    await s.close()
    assert r.stop() == 0
    assert not state.exists(), "cluster mode wrote a state file"
    log = r.log_text().lower()
    assert "state-file" in log or "state file" in log, "no notice that --state-file is ignored"


# --------------------------------------------------------------------------------------------
# 1. cross-relay delivery

@async_test(timeout=120)
async def test_01_cross_relay_delivery(cluster_factory):
    N = 10_000
    c = cluster_factory()
    subs = {}
    for r in (c.A, c.B, c.C):
        subs[r.name], f = await sub_to(r, "job:1")
        assert (f["seq"], f["recovered"]) == (0, False), f

    t0 = time.monotonic()
    await emit(c.A, [line("job:1", i, pad=120) for i in range(N)], batch=500)
    for s in subs.values():
        await s.wait_events(N, timeout=90)
    epochs = {s.subscribed("job:1")[0]["epoch"] for s in subs.values()}
    assert len(epochs) == 1, f"the relays disagree on the topic's epoch: {epochs}"
    print(f"{N} events A -> A,B,C in {time.monotonic() - t0:.1f}s")
    await asyncio.sleep(0.3)
    texts = None
    for name, s in subs.items():
        events, resets = audit(s.frames, "job:1")
        assert resets == [], f"{name}: unexpected repeated subscribed {resets}"
        assert [e[1] for e in events] == list(range(1, N + 1)), name
        assert ids(events) == list(range(N)), name
        s.assert_open()
        if texts is None:
            texts = s.event_texts()
        else:
            assert s.event_texts() == texts, f"{name} got other frames than relayA's subscriber"
    if not SELFCHECK_NO_REDIS:
        m = redis_meta(c.redis, "job:1")
        assert m["s"] == str(N) and m["e"] == epochs.pop(), m


# --------------------------------------------------------------------------------------------
# 2. one sequence

@async_test(timeout=120)
async def test_02_one_sequence_for_emitters_on_every_relay(cluster_factory):
    PER = 2000
    c = cluster_factory()
    subs = [(await sub_to(r, "shared"))[0] for r in (c.A, c.B, c.C)]
    srcs = {"A": c.A, "B": c.B, "C": c.C}
    await asyncio.gather(*(
        emit(r, [line("shared", n, src=name, pad=80) for n in range(PER)], batch=50, pause=0.002)
        for name, r in srcs.items()))
    total = PER * len(srcs)
    for s in subs:
        await s.wait_events(total, timeout=90)
    await asyncio.sleep(0.3)
    orders = []
    for s in subs:
        events, resets = audit(s.frames, "shared")
        assert resets == [], f"{s.name}: {resets}"
        assert [e[1] for e in events] == list(range(1, total + 1)), s.name
        order = [(e[2]["src"], e[2]["i"]) for e in events]
        orders.append(order)
        for name in srcs:
            mine = [n for src, n in order if src == name]
            assert mine == list(range(PER)), f"{s.name}: emitter {name}'s lines out of order"
    assert orders[0] == orders[1] == orders[2], "the relays' subscribers saw different orders"
    # they really were interleaved (otherwise this test proves little)
    switches = sum(1 for a, b in zip(orders[0], orders[0][1:]) if a[0] != b[0])
    print(f"source switches in the merged sequence: {switches}")


# --------------------------------------------------------------------------------------------
# 3. resume elsewhere

async def _resume_elsewhere(c, topic: str, keeper_on_b: bool, pause_b: bool):
    N, K = 3000, 1000
    keeper = None
    if keeper_on_b:
        keeper, _ = await sub_to(c.B, topic, name="keeper@B")
    reader, f0 = await sub_to(c.A, topic, name="reader@A")
    epoch = f0["epoch"]
    lines = [line(topic, i, pad=60) for i in range(N)]
    emitting = asyncio.create_task(emit(c.C, lines, batch=20, pause=0.004))
    await reader.wait_events(K, timeout=60)
    try:
        if pause_b:
            # B is stopped: while it cannot read its Redis subscription, A's reader goes further
            c.B.send_signal(signal.SIGSTOP)
            await asyncio.sleep(0.5)
        await reader.close()
        got_a = reader.events(topic)         # what the reader had when it dropped
        k = got_a[-1]["seq"]
        if pause_b:
            connecting = asyncio.create_task(sub_to(c.B, topic, name="resumed@B", epoch=epoch,
                                                    since=k))
            await asyncio.sleep(0.3)
            c.B.send_signal(signal.SIGCONT)
            resumed, f = await connecting
        else:
            resumed, f = await sub_to(c.B, topic, name="resumed@B", epoch=epoch, since=k)
    finally:
        if pause_b:
            c.B.send_signal(signal.SIGCONT)
    assert f["epoch"] == epoch and f["recovered"] is True, f
    await emitting
    await resumed.wait_events(N - k, timeout=60)
    await asyncio.sleep(0.3)
    events, resets = audit(resumed.frames, topic, since=k)
    assert resets == []
    assert [e[1] for e in events] == list(range(k + 1, N + 1))
    assert ids(got_a) + ids(events) == list(range(N)), "gap or duplicate across the two relays"
    if keeper:
        keeper.assert_open()


@async_test(timeout=120)
async def test_03_resume_on_another_relay_that_holds_the_topic(cluster_factory):
    c = cluster_factory(relay_args=["--history", "5000"])
    await _resume_elsewhere(c, "resume:held", keeper_on_b=True, pause_b=False)


@async_test(timeout=120)
async def test_03_resume_on_a_relay_that_never_held_the_topic(cluster_factory):
    c = cluster_factory(relay_args=["--history", "5000"])
    await _resume_elsewhere(c, "resume:fresh", keeper_on_b=False, pause_b=False)


@async_test(timeout=120)
async def test_03_resume_with_a_since_ahead_of_the_relay(cluster_factory):
    """B holds the topic but is stopped while A's reader goes on; the resume reaches B before (or
    while) B catches up with its Redis subscription: B has to wait for `since` (up to 2 s)."""
    c = cluster_factory(relay_args=["--history", "5000"])
    await _resume_elsewhere(c, "resume:ahead", keeper_on_b=True, pause_b=True)


# --------------------------------------------------------------------------------------------
# 4. wandering subscriber

@async_test(timeout=180)
async def test_04_wandering_subscriber_gets_each_event_once(cluster_factory):
    N, HOP = 10_000, 500
    c = cluster_factory(relay_args=["--history", str(N)])
    topic = "wander"
    ring = [c.A, c.B, c.C]
    sub, f = await sub_to(ring[0], topic, name="hop0@A")
    epoch = f["epoch"]
    emitting = asyncio.create_task(
        emit(c.A, [line(topic, i, pad=60) for i in range(N)], batch=50, pause=0.02))
    got: list[int] = []
    hop = live_hops = 0
    since = None
    while True:
        # this connection's share: the next HOP events (whatever came after them is not taken:
        # the next relay replays it from `since`)
        need = min(HOP, N - len(got))
        await sub.wait(lambda: len(sub.events(topic)) >= need, 60, f"hop {hop}: {need} events")
        events, resets = audit(sub.frames, topic, since=since)
        assert resets == [], f"hop {hop}: {resets}"
        take = events[:need]
        got += ids(take)
        since = take[-1][1]
        await sub.close()
        if len(got) >= N:
            break
        hop += 1
        live_hops += not emitting.done()
        relay = ring[hop % 3]
        sub, f = await sub_to(relay, topic, name=f"hop{hop}@{relay.name}", epoch=epoch,
                              since=since)
        assert f["epoch"] == epoch and f["recovered"] is True, f"hop {hop}: {f}"
    await emitting
    assert got == list(range(N)), "an event was lost or repeated on the way"
    assert hop == N // HOP - 1
    print(f"{hop} hops, {live_hops} of them while the stream was still being emitted")


# --------------------------------------------------------------------------------------------
# 5. Redis blips

@async_test(timeout=120)
async def test_05_redis_blips_lose_and_repeat_nothing(cluster_factory):
    PER = 1500
    c = cluster_factory(relay_args=["--history", "3000"])
    topic = "blips"
    subs = [(await sub_to(r, topic))[0] for r in (c.A, c.B, c.C)]
    redis = c.redis
    done_a = 0

    def progress(n):
        nonlocal done_a
        done_a = n

    emitting = asyncio.gather(
        emit(c.A, [line(topic, n, src="A", pad=80) for n in range(PER)], batch=25, pause=0.02,
             on_batch=progress),
        emit(c.C, [line(topic, n, src="C", pad=80) for n in range(PER)], batch=25, pause=0.02))

    async def at(fraction, *cmd):
        await async_wait_until(lambda: done_a >= PER * fraction, 60, what=f"{fraction} emitted")
        r = await asyncio.to_thread(redis.cli, *cmd)
        print(f"{' '.join(cmd)} -> {r!r} after {done_a} lines of A")
        return r

    if not SELFCHECK_NO_REDIS:
        assert await at(0.25, "CLIENT", "KILL", "TYPE", "pubsub") >= 3
        assert await at(0.5, "CLIENT", "KILL", "TYPE", "normal") >= 3
        assert await at(0.75, "SCRIPT", "FLUSH") == b"OK"
    await emitting
    total = 2 * PER
    for s in subs:
        await s.wait_events(total, timeout=60)
    await asyncio.sleep(0.5)
    for s in subs:
        s.assert_open()
        events, resets = audit(s.frames, topic)
        assert resets == [], f"{s.name}: a blip must not cost a reset: {resets}"
        assert [e[1] for e in events] == list(range(1, total + 1))
        for src in "AC":
            assert [e[2]["i"] for e in events if e[2]["src"] == src] == list(range(PER)), \
                f"{s.name}: emitter {src}"


# --------------------------------------------------------------------------------------------
# 6. Redis hang

@async_test(timeout=120)
async def test_06_redis_hang_holds_emitters_back_and_loses_nothing(cluster_factory):
    N0, N = 100, 30_000
    c = cluster_factory(relay_args=["--redis-queue-bytes", "65536", "--history", "200"])
    topic = "hang"
    subs = [(await sub_to(r, topic))[0] for r in (c.A, c.B)]
    await emit(c.A, [line(topic, i) for i in range(N0)])
    for s in subs:
        await s.wait_events(N0, timeout=20)

    c.redis.pause()
    paused_at = time.monotonic()
    em = await Emitter.open(c.A)
    lines = [line(topic, i, pad=200) for i in range(N0, N0 + N)]
    total_bytes = sum(map(len, lines))

    async def write_all():
        for k in range(0, N, 100):
            await em.send(lines[k:k + 100])

    writing = asyncio.create_task(write_all())
    try:
        body = await await_readyz(c.A, 503, timeout=10)
        assert body.strip(), "a 503 from /readyz names its reason"
        print(f"/readyz 503 after {time.monotonic() - paused_at:.2f}s: {body.strip()!r}")
        assert c.A.http("/healthz") == (200, "ok"), "liveness is not readiness"
        await asyncio.sleep(max(0.0, paused_at + 3 - time.monotonic()))
        s1 = em.sent
        await asyncio.sleep(1.0)
        s2 = em.sent
        assert not writing.done() and s1 == s2 < total_bytes, (
            f"the emitter was not held back: {s1} then {s2} of {total_bytes} bytes taken")
        print(f"emitter held back at {s2} of {total_bytes} bytes")
        for s in subs:
            s.assert_open()
            assert len(s.events(topic)) == N0, "a line was delivered while Redis hung"
        assert (await asyncio.to_thread(readyz, c.B))[0] == 503
    finally:
        c.redis.cont()
    await asyncio.wait_for(writing, 60)
    assert await em.finish() == []
    for s in subs:
        await s.wait_events(N0 + N, timeout=90)
    await asyncio.sleep(0.3)
    for s in subs:
        s.assert_open()
        events, resets = audit(s.frames, topic)
        assert resets == [], resets
        assert ids(events) == list(range(N0 + N))
    await await_readyz(c.A, 200, timeout=10)


# --------------------------------------------------------------------------------------------
# 7. Redis restart without data

@async_test(timeout=120)
async def test_07_redis_restart_without_data_announces_a_new_epoch(cluster_factory):
    c = cluster_factory(relay_args=["--history", "1000"])
    topic = "restart"
    sa, f = await sub_to(c.A, topic, name="live@A")
    sb, _ = await sub_to(c.B, topic, name="live@B")
    e1 = f["epoch"]
    await emit(c.A, [line(topic, i) for i in range(100)])
    for s in (sa, sb):
        await s.wait_events(100, timeout=20)

    c.redis.stop(nosave=True)
    # lines read while Redis is away
    await emit(c.A, [line(topic, i) for i in range(100, 150)])
    await await_readyz(c.A, 503, timeout=10)
    await asyncio.sleep(0.5)
    for s in (sa, sb):
        assert len(s.events(topic)) == 100
    c.redis.start()
    for s in (sa, sb):
        await s.wait(lambda s=s: len(s.subscribed(topic)) >= 2, 20,
                     "a repeated subscribed after the Redis restart")
        await s.wait_for_i(149, topic, timeout=30)
    await asyncio.sleep(0.5)
    for s in (sa, sb):
        s.assert_open()
        events, resets = audit(s.frames, topic)
        assert len(resets) == 1, resets
        r = resets[0]
        assert r["epoch"] != e1 and r["recovered"] is False, r
        print(f"{s.name}: reset frame {r}, then ids {ids(events)[100:][:5]}...")
        assert ids(events)[:100] == list(range(100))
        assert all(ep == r["epoch"] for ep, _, _ in events[100:])
        # Redis lost the data: "subscribed with seq 0, then new events" (docs/cluster.md, What
        # subscribers see), and "after Redis returns every line is delivered in order, once"
        # (issue 13): the lines read during the outage reach the live subscribers of every
        # relay, including the relay that read them, not just the newest of them.
        assert r["seq"] == 0, (
            f"{s.name}: the reset after a Redis restart without data came at seq {r['seq']}, "
            f"not 0: the outage lines before it were not delivered to this live subscriber")
        assert ids(events)[100:] == list(range(100, 150))
    # every line of the outage is in the new epoch, once, in order (a resume from 0 shows it)
    chk, f2 = await sub_to(c.C, topic, name="check@C", epoch=sa.subscribed(topic)[-1]["epoch"],
                           since=0)
    assert f2["recovered"] is True and f2["seq"] == 50, f2
    await chk.wait_events(50, timeout=10)
    assert ids(chk.events()) == list(range(100, 150))
    # a resume with the old epoch is not recovered
    old, f3 = await sub_to(c.B, topic, name="old@B", epoch=e1, since=100)
    assert f3["recovered"] is False and f3["epoch"] != e1, f3


# --------------------------------------------------------------------------------------------
# 8. restart from an old snapshot

@async_test(timeout=120)
async def test_08_restart_from_an_old_snapshot_never_reuses_a_seq(cluster_factory):
    c = cluster_factory(relay_args=["--history", "1000"])
    topic = "snap"
    sa, f = await sub_to(c.A, topic, name="live@A")
    sb, _ = await sub_to(c.B, topic, name="live@B")
    e1 = f["epoch"]
    await emit(c.A, [line(topic, i) for i in range(150)])
    for s in (sa, sb):
        await s.wait_events(150, timeout=20)
    assert c.redis.cli("SAVE") == b"OK"
    await emit(c.A, [line(topic, i) for i in range(150, 200)])
    for s in (sa, sb):
        await s.wait_events(200, timeout=20)
    c.redis.kill()
    c.redis.start()          # loads dump.rdb: the topic at seq 150, from an earlier server run
    assert text(c.redis.cli("HGET", meta_key(topic), "s")) in ("150", "1"), "no snapshot loaded?"
    for s in (sa, sb):
        await s.wait(lambda s=s: len(s.subscribed(topic)) >= 2, 20,
                     "a repeated subscribed after the restart from the snapshot")
        await s.wait(lambda s=s: len(s.events(topic)) >= 201, 10, "the restored newest event")
    e2 = sa.subscribed(topic)[-1]["epoch"]
    assert e2 != e1
    # the restored newest event is seq 1 of the new epoch
    for s in (sa, sb):
        events, resets = audit(s.frames, topic)
        # the new epoch stands at 0 and every event of it follows: the carried one first
        assert len(resets) == 1 and resets[0]["epoch"] == e2 and resets[0]["seq"] == 0, resets
        assert events[200][0] == e2 and events[200][1] == 1 and events[200][2]["i"] == 149
    await emit(c.A, [line(topic, i) for i in range(200, 210)])
    for s in (sa, sb):
        await s.wait_for_i(209, topic, timeout=20)
    await asyncio.sleep(0.3)
    seen: dict[tuple[str, int], int] = {}
    for s in (sa, sb):
        s.assert_open()
        events, _ = audit(s.frames, topic)
        assert [(e[1], e[2]["i"]) for e in events if e[0] == e2] == \
            [(1, 149)] + [(k + 2, 200 + k) for k in range(10)]
        for ep, seq, ev in events:
            assert seen.setdefault((ep, seq), ev["i"]) == ev["i"], \
                f"seq {seq} of epoch {ep} was given to two events"
    # a client that saw seq 150 (or 200) of the old epoch is never told it recovered
    for since in (150, 200, 149):
        for r in (c.A, c.C):
            probe, pf = await sub_to(r, topic, name=f"probe@{r.name}", epoch=e1, since=since)
            assert pf["recovered"] is False and pf["epoch"] == e2, (since, pf)
            await probe.close()
    m = redis_meta(c.redis, topic)
    assert m["e"] == e2 and m["s"] == "11", m


# --------------------------------------------------------------------------------------------
# 9. restart with appendonly

@async_test(timeout=120)
async def test_09_restart_with_aof_still_changes_the_epoch(cluster_factory):
    """Redis with `appendonly yes, appendfsync always` keeps every write across a kill -9, and the
    topic's epoch changes anyway: the relay cannot tell a server run that lost nothing from one
    restored from an older file, so every new Redis run_id means a new epoch (the run_id rule is
    deliberately conservative). Nothing is lost: the newest event is carried over as seq 1."""
    c = cluster_factory(redis_options=["--appendonly", "yes", "--appendfsync", "always"])
    topic = "aof"
    sa, f = await sub_to(c.A, topic, name="live@A")
    e1 = f["epoch"]
    await emit(c.B, [line(topic, i) for i in range(100)])
    await sa.wait_events(100, timeout=20)
    c.redis.kill()
    c.redis.start()
    assert text(c.redis.cli("HGET", meta_key(topic), "s")) in ("100", "1"), "AOF not loaded?"
    await sa.wait(lambda: len(sa.subscribed(topic)) >= 2, 20, "a repeated subscribed")
    await sa.wait_events(101, timeout=10)
    events, resets = audit(sa.frames, topic)
    assert len(resets) == 1 and resets[0]["epoch"] != e1 and resets[0]["seq"] == 0, resets
    assert (events[100][1], events[100][2]["i"]) == (1, 99)
    probe, pf = await sub_to(c.C, topic, epoch=e1, since=100)
    assert pf["recovered"] is False and pf["epoch"] == resets[0]["epoch"], pf


# --------------------------------------------------------------------------------------------
# 10. slow relay

@async_test(timeout=150)
async def test_10_slow_relay_is_cut_by_redis_and_repairs(cluster_factory):
    c = cluster_factory(relay_args=["--history", "20000"],
                        redis_options=["--client-output-buffer-limit", "pubsub 64kb 32kb 1"])
    redis = c.redis
    topic = "slow"
    subs = {r.name: (await sub_to(r, topic))[0] for r in (c.A, c.B, c.C)}
    await emit(c.A, [line(topic, i, pad=300) for i in range(200)])
    for s in subs.values():
        await s.wait_events(200, timeout=20)
    before = {cl["id"] for cl in redis.clients("pubsub")}
    assert len(before) >= 3 or SELFCHECK_NO_REDIS, redis.clients("pubsub")

    c.B.send_signal(signal.SIGSTOP)
    n = 200
    try:
        cut = False
        # emit until Redis cuts the stopped relay's subscription (at most 15,000 lines, 4.5 MB)
        while n < 15_000 and not cut:
            await emit(c.A, [line(topic, i, pad=300) for i in range(n, n + 500)])
            n += 500
            now = {cl["id"] for cl in redis.clients("pubsub")}
            cut = len(before - now) > 0
        assert cut or SELFCHECK_NO_REDIS, "Redis never cut the stopped relay's subscription"
        print(f"Redis cut a subscription after {n} events")
        await emit(c.A, [line(topic, i, pad=300) for i in range(n, n + 500)])
        n += 500
        # A and C are not held up by B
        for name in ("relayA", "relayC"):
            await subs[name].wait_events(n, timeout=60)
    finally:
        c.B.send_signal(signal.SIGCONT)
    await emit(c.A, [line(topic, i, pad=300) for i in range(n, n + 100)])
    n += 100
    for s in subs.values():
        await s.wait_for_i(n - 1, topic, timeout=60)
    await asyncio.sleep(0.5)
    for name, s in subs.items():
        s.assert_open()
        events, resets = audit(s.frames, topic)   # no silent loss, on any relay
        # history (20000) covers everything: no loss at all, hence no announcement either
        assert resets == [], f"{name}: {resets}"
        assert ids(events) == list(range(n)), name


# --------------------------------------------------------------------------------------------
# 11. patterns

@async_test(timeout=60)
async def test_11_patterns_across_relays(cluster_factory):
    c = cluster_factory()
    await emit(c.A, [line("task:1", 1), line("task:2", 1), line("other:1", 1),
                     line("task:1", 2), line("task:2", 2)])
    probe, _ = await sub_to(c.C, "task:2")       # settle: A's lines are in
    await probe.wait_events(1, timeout=10)
    await emit(c.A, [line("task:2", 3)])
    await probe.wait_events(2, timeout=10)
    await probe.close()

    pat = await Sub.open(c.B, name="pattern@B")
    f = await pat.subscribe("task:*")
    assert f == {"op": "subscribed", "topic": "task:*", "seq": 0, "recovered": False, "ping_interval": 25}, f
    await pat.wait_events(2, timeout=10)
    await asyncio.sleep(0.3)
    snap = [(e["topic"], e["seq"], e["i"]) for e in pat.events()]
    # the newest event of each matching topic. In cluster mode the (at most 1000) topics are
    # chosen by name from Redis's index (protocol.md, Patterns, the cluster addition); the order
    # they come in is not asserted: observed, most recently taken into B's hub first, which for
    # topics new to B is reverse name order.
    assert sorted(snap) == [("task:1", 2, 2), ("task:2", 3, 3)], snap
    print(f"pattern snapshot order on B: {snap}")

    both = await Sub.open(c.C, name="both@C")
    await both.subscribe("task:1")
    await both.subscribe("task:*")
    await both.wait_events(2, timeout=10)
    await asyncio.sleep(0.5)
    start_both = len(both.events())

    await emit(c.A, [line("task:3", 1), line("task:1", 3), line("other:1", 2), line("task:3", 2)])
    await pat.wait_events(5, timeout=10)
    await both.wait_events(start_both + 3, timeout=10)
    await asyncio.sleep(0.5)
    assert [(e["topic"], e["seq"]) for e in pat.events()[2:]] == \
        [("task:3", 1), ("task:1", 3), ("task:3", 2)]
    live = [(e["topic"], e["seq"]) for e in both.events()[start_both:]]
    assert live == [("task:3", 1), ("task:1", 3), ("task:3", 2)], \
        f"task:1 and task:* on one connection: each event once: {live}"


# --------------------------------------------------------------------------------------------
# 12. bounds

@pytest.mark.slow
@async_test(timeout=600 if LONG else 240)
async def test_12_bounds_many_topics(cluster_factory):
    """10,000 topics x 100 events with PROGRESS_RELAY_LONG=1, 1,000 x 100 by default."""
    TOPICS = 10_000 if LONG else 1_000
    PER = 100
    c = cluster_factory(relay_args=["--log-level", "info"])
    redis = c.redis
    topics = [f"b:{k:05d}" for k in range(TOPICS)]
    sample = topics[:: max(1, TOPICS // 10)][:10]
    subs = []
    for k, t in enumerate(sample):
        r = (c.B, c.C)[k % 2]
        subs.append((t, (await sub_to(r, t, name=f"{t}@{r.name}"))[0]))
    mem0 = redis.used_memory
    rss0 = {r.name: rss_kib(r.proc.pid) for r in c.relays}

    # two connections (A and B), each all events of half the topics, round-robin over them
    def payload(mine):
        return b"".join(line(t, j, pad=200) for j in range(PER) for t in mine)

    t0 = time.monotonic()
    await asyncio.gather(*(
        asyncio.to_thread(r.emit_raw, payload(topics[h::2]), True, 600)
        for h, r in enumerate((c.A, c.B))))
    t_emit = time.monotonic() - t0

    def all_in():
        seqs = redis.pipeline([["HGET", meta_key(t), "s"] for t in topics])
        return sum(1 for s in seqs if s == str(PER).encode())

    if not SELFCHECK_NO_REDIS:
        await async_wait_until(lambda: all_in() == TOPICS, 120, interval=0.5,
                               what="every topic at seq 100 in Redis")
    t_all = time.monotonic() - t0
    for t, s in subs:
        await s.wait_events(PER, timeout=60)
    await asyncio.sleep(0.3)
    for t, s in subs:
        events, resets = audit(s.frames, t)
        assert resets == [] and ids(events) == list(range(PER)), t
    if SELFCHECK_NO_REDIS:
        return
    assert redis.cli("ZCARD", topics_key()) == TOPICS
    assert redis.cli("XLEN", hist_key(topics[0])) == PER
    mem1 = redis.used_memory
    per_topic = (mem1 - mem0) / TOPICS
    usage_h = redis.cli("MEMORY", "USAGE", hist_key(topics[1]), "SAMPLES", "0")
    usage_m = redis.cli("MEMORY", "USAGE", meta_key(topics[1]), "SAMPLES", "0")
    rss1 = {r.name: rss_kib(r.proc.pid) for r in c.relays}
    print(f"{TOPICS} topics x {PER} events of 200 bytes: emitted in {t_emit:.1f}s, all in Redis "
          f"after {t_all:.1f}s ({TOPICS * PER / t_all:.0f} events/s); Redis used_memory "
          f"{mem0} -> {mem1}: {per_topic / 1024:.1f} KiB per topic (MEMORY USAGE: history "
          f"{usage_h}, meta {usage_m}); relay RSS KiB before {rss0}, after {rss1}")
    assert per_topic < 31 * 1024, f"{per_topic:.0f} bytes of Redis memory per topic"
    for name in rss0:
        grew = rss1[name] - rss0[name]
        # loose: the relays keep no history of topics without local subscribers
        assert grew < 400 * 1024, f"{name} grew by {grew} KiB"


@pytest.mark.slow
@async_test(timeout=90)
async def test_12_topic_keys_expire_after_the_topic_ttl(cluster_factory):
    TOPICS = 200
    c = cluster_factory(relay_args=["--topic-ttl", "3"])
    redis = c.redis
    topics = [f"ttl:{k}" for k in range(TOPICS)]
    await emit(c.A, [line(t, j, pad=200) for j in range(5) for t in topics])
    if SELFCHECK_NO_REDIS:
        return
    await async_wait_until(lambda: redis.cli("ZCARD", topics_key()) == TOPICS, 20,
                           what="every topic in Redis")
    assert redis.cli("EXISTS", meta_key(topics[-1]), hist_key(topics[-1])) == 2
    ttl = redis.cli("TTL", meta_key(topics[-1]))
    assert 0 < ttl <= 3, ttl
    t0 = time.monotonic()
    await async_wait_until(lambda: not redis.scan(f"{PREFIX}:[mh]:*"), 15,
                           what="every P:m and P:h key gone")
    print(f"P:m/P:h gone {time.monotonic() - t0:.1f}s after the last event")
    # P:topics is a sorted set without a TTL of its own: its members whose hash is gone are
    # removed by one relay's sweeper "every minute (every TTL when shorter)" (docs/cluster.md,
    # What Redis holds): with --topic-ttl 3, within a few seconds.
    await async_wait_until(lambda: redis.cli("EXISTS", topics_key()) == 0, 20, interval=0.5,
                           what="P:topics emptied by the sweeper")
    print(f"P:topics gone {time.monotonic() - t0:.1f}s after the last event")
    assert not redis.scan(f"{PREFIX}:[mht]*"), redis.scan(f"{PREFIX}:*")
