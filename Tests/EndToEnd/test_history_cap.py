"""--max-history-bytes (issue 15, "bounded under abuse"): stored events stay under the cap, the
evictions are counted, recent topics still serve their newest event, and a resume into what was
evicted is answered honestly (recovered:false and the newest event)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from relaylib import (
    async_test, async_wait_until, free_port, give_to_relay_user, recv_events, recv_json, run_cli,
    short_tmpdir, subscribe, write_secret, ws_connect,
)

CAP = 1_048_576
PAD = "x" * 300


def ev(topic: str, i: int) -> bytes:
    return json.dumps({"topic": topic, "i": i, "pad": PAD}, separators=(",", ":")).encode()


def metric(text: str, name: str, reason: str | None = None) -> float | None:
    labels = rf'\{{reason="{reason}"\}}' if reason else ""
    m = re.search(rf"^{re.escape(name)}{labels} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


@async_test(timeout=120)
async def test_stored_history_stays_under_the_cap(relay_factory):
    relay = relay_factory("--max-history-bytes", str(CAP))

    # A subscriber holds old:0 throughout: its topic is never forgotten, only its history dropped.
    watcher = await ws_connect(relay)
    epoch = (await subscribe(watcher, "old:0"))["epoch"]

    # 50 old topics of 20 events: about a third of the cap, nothing evicted yet.
    assert await relay.aemit([ev(f"old:{t}", i) for t in range(50) for i in range(20)]) == []
    assert [f["seq"] for f in await recv_events(watcher, 20)] == list(range(1, 21))
    before = await ws_connect(relay)
    replay = await subscribe(before, "old:0", epoch=epoch, since=0)
    assert replay["recovered"] is True
    assert len(await recv_events(before, 20)) == 20
    await before.close()

    # 1000 newer topics of 3 events: their newest events alone are over the cap.
    for first in range(0, 1000, 250):
        lines = [ev(f"new:{t}", i) for t in range(first, first + 250) for i in range(3)]
        assert await relay.aemit(lines) == []

    def settled():
        text = relay.metrics()
        stored = metric(text, "progress_relay_history_bytes")
        history = metric(text, "progress_relay_history_evictions_total", "history") or 0
        topics = metric(text, "progress_relay_history_evictions_total", "topic") or 0
        return stored is not None and 0 < stored <= CAP and history > 0 and topics > 0 and text

    text = await async_wait_until(settled, timeout=10, what="history bytes under the cap, evictions counted")
    assert metric(text, "progress_relay_history_bytes") <= CAP

    # The most recent topics still answer a subscribe with their newest event.
    fresh = await ws_connect(relay)
    for t in (999, 998, 990):
        answer = await subscribe(fresh, f"new:{t}")
        assert answer["seq"] == 3 and answer["recovered"] is False
        newest = await recv_json(fresh)
        assert (newest["seq"], newest["topic"], newest["i"]) == (3, f"new:{t}", 2)
    await fresh.close()

    # old:0 kept its epoch and newest event but not its history: a resume from seq 0 is told so.
    after = await ws_connect(relay)
    answer = await subscribe(after, "old:0", epoch=epoch, since=0)
    assert (answer["epoch"], answer["seq"], answer["recovered"]) == (epoch, 20, False)
    newest = await recv_json(after)
    assert (newest["seq"], newest["i"]) == (20, 19)
    await after.close()
    await watcher.close()

    # One warning (at most one a minute), with counts.
    warnings = [l for l in relay.log_text().splitlines() if "stored events were over --max-history-bytes" in l]
    assert len(warnings) == 1, warnings
    assert "history_events=" in warnings[0] and "topics=" in warnings[0], warnings[0]


@pytest.mark.parametrize("value,env", [("65535", False), ("64MiB", False), ("-1", False), ("100", True)])
def test_a_bad_max_history_bytes_is_status_2_naming_it(value, env):
    tmp = short_tmpdir("prcap-")
    give_to_relay_user(tmp)
    try:
        args = ["serve", "--socket", str(tmp / "p.sock"), "--listen", f"127.0.0.1:{free_port()}",
                "--jwt-secret-file", write_secret(tmp / "secret", "s3cret-for-cap-0123456789abcdef-0123\n")]
        if env:
            cp = run_cli(args, env={"PROGRESS_RELAY_MAX_HISTORY_BYTES": value}, timeout=10)
        else:
            cp = run_cli(args + ["--max-history-bytes", value], timeout=10)
        assert cp.returncode == 2, (cp.returncode, cp.stderr)
        err = cp.stderr.decode()
        assert "--max-history-bytes" in err or "PROGRESS_RELAY_MAX_HISTORY_BYTES" in err, err
        assert not (tmp / "p.sock").exists()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
