"""Debian's nginx as a reverse proxy in front of a test relay: its own temporary prefix, a free
loopback port, `daemon off`, stopped gracefully (SIGQUIT) so that every access-log line is
written. Used by test_token_transport.py (the README's configuration) and test_reverse_proxy.py
(examples/nginx/progress-relay.conf)."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import relaylib

NGINX = os.environ.get("NGINX_BIN") or "/usr/sbin/nginx"
SKIP_REASON = "needs Debian's nginx (.ci/run installs nginx-light)"


def have_nginx() -> bool:
    return os.access(NGINX, os.X_OK)


class Nginx:
    """`Nginx()` picks a directory and a port (`self.dir`, `self.port`); `configure(block)` writes
    nginx.conf with `block` inside its `http { }`; `start()` waits for `GET /healthz` = 200
    through it (so the block must proxy that to a running relay)."""

    def __init__(self):
        self.dir = relaylib.short_tmpdir("ngx-")
        os.chmod(self.dir, 0o755)
        self.port = relaylib.free_port()
        self.error_log = self.dir / "error.log"
        self.conf = self.dir / "nginx.conf"
        self.proc: subprocess.Popen | None = None

    def configure(self, block: str) -> "Nginx":
        temp = "\n".join(f"    {kind}_temp_path {self.dir}/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = (f"worker_processes 1;\npid {self.dir}/nginx.pid;\nerror_log {self.error_log} info;\n"
                f"events {{ worker_connections 1024; }}\nhttp {{\n{temp}\n{block}\n}}\n")
        self.conf.write_text(conf)
        return self

    def start(self) -> "Nginx":
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.dir), "-e", str(self.error_log), "-c", str(self.conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr", "wb"))
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, (self.dir / "stderr").read_text() + self.error_log.read_text()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            assert time.monotonic() < deadline, "nginx did not answer"
            time.sleep(0.05)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: every log line is written
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def read_logs(*paths: Path) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace") if p.exists() else "" for p in paths}


class Through:
    """A relay as seen through the proxy: ws_connect's URL is the proxy's."""

    def __init__(self, relay, port: int):
        self.relay = relay
        self.port = port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def token(self, **kw) -> str:
        return self.relay.token(**kw)
