"""docs/protocol.md is the public contract: everything the relay offers must be named there.

- every flag that `progress-relay serve|emit|token --help` lists;
- every metric name the relay exports: scraped from `/metrics` of a relay that carried some
  traffic, and every `label: "progress_relay_…"` of the Swift sources (cluster-only metrics
  included, which a single relay does not export);
- nothing in the repository refers to a file outside it (a `../shared` contract, a CONTRACT.md,
  an absolute path of the machine it was written on).
"""

from __future__ import annotations

import re
import subprocess

from relaylib import REPO, recv_json, run_cli, subscribe, ws_connect, async_test

PROTOCOL = REPO / "docs" / "protocol.md"

# Histograms and summaries export these series beside their base name, which the doc names.
_SERIES_SUFFIXES = ("_bucket", "_sum", "_count")


def _doc() -> str:
    return PROTOCOL.read_text()


def _flags(command: str) -> set[str]:
    cp = run_cli([command, "--help"])
    assert cp.returncode == 0, cp.stderr
    text = (cp.stdout + cp.stderr).decode()
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text)) - {"--help", "--version"}


def _named(doc: str, flag: str) -> bool:
    # `--flag`, `--flag VALUE`, `--flag=...`: the flag as a whole word of the doc.
    return re.search(re.escape(flag) + r"(?![a-z0-9-])", doc) is not None


def test_every_cli_flag_is_in_the_protocol_doc():
    doc = _doc()
    missing = {}
    for command in ("serve", "emit", "token"):
        flags = _flags(command)
        assert len(flags) >= (20 if command == "serve" else 2), (command, flags)
        lost = sorted(f for f in flags if not _named(doc, f))
        if lost:
            missing[command] = lost
    assert not missing, f"flags missing from docs/protocol.md: {missing}"


def _metric_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE ") or line.startswith("# HELP "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    out = set()
    for name in names:
        for suffix in _SERIES_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in names:
                name = name[: -len(suffix)]
        out.add(name)
    return out


def _missing_metrics(doc: str, names) -> list[str]:
    return sorted(n for n in names if re.search(re.escape(n) + r"(?![a-z0-9_])", doc) is None)


@async_test
async def test_every_exported_metric_is_in_the_protocol_doc(relay):
    # Traffic, so that every counter the relay creates lazily has shown up: a subscriber, a
    # delivered event, a rejected line, a refused token, a plain HTTP request.
    ws = await ws_connect(relay)
    await subscribe(ws, "doc:1")
    relay.emit_lines([{"topic": "doc:1", "type": "progress", "progress": 50}, b"not json"])
    event = await recv_json(ws)
    assert event["seq"] == 1, event
    bad = await ws_connect(relay, token="not-a-token")
    error = await recv_json(bad)
    assert error.get("code") == "unauthorized", error
    scraped = relay.metrics()
    await ws.close()
    names = {n for n in _metric_names(scraped) if n.startswith("progress_relay_")}
    assert {"progress_relay_deliveries_total", "progress_relay_events_received_total"} <= names, names
    missing = _missing_metrics(_doc(), names)
    assert not missing, f"metrics exported by /metrics and missing from docs/protocol.md: {missing}"


def test_every_metric_label_in_the_sources_is_in_the_protocol_doc():
    labels = set()
    for path in (REPO / "Sources").rglob("*.swift"):
        labels |= set(re.findall(r'label:\s*"(progress_relay_[a-z0-9_]+)"', path.read_text()))
    assert len(labels) >= 15, labels
    missing = _missing_metrics(_doc(), labels)
    assert not missing, f"metric labels in Sources/ missing from docs/protocol.md: {missing}"


# ---------------------------------------------------------------------------------------------
# the repository stands alone

_OUTSIDE = [
    re.compile(r"\.\./shared"),
    re.compile(r"CONTRACT\.md"),
    re.compile(r"(?<![\w.])/work/"),
    re.compile(r"(?<![\w.])/home/[a-z]"),
    re.compile(r"(?<![\w.])/root/[A-Za-z]"),
]
_SUFFIXES = {".md", ".swift", ".py", ".js", ".ts", ".html", ".toml", ".txt", ".service", ".socket",
             ".conf", ".sh", ".c", ".h", ".yml", ".yaml", ".json", ""}


def test_nothing_refers_to_a_file_outside_the_repository():
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    this = "Tests/EndToEnd/test_protocol_doc.py"
    hits = []
    for rel in listed.stdout.splitlines():
        path = REPO / rel
        if rel == this or path.suffix not in _SUFFIXES or not path.is_file():
            continue
        if rel == "Package.resolved" or path.is_symlink():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for pattern in _OUTSIDE:
                if pattern.search(line):
                    hits.append(f"{rel}:{n}: {line.strip()[:120]}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)
