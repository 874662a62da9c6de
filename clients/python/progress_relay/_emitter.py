"""The emitter: events queued by any thread, written to the relay's Unix socket by one
background thread per process.

How it works, in short (the README says more):

* ``emit`` checks and encodes the event on the caller's thread (JSON, no system call), appends
  the line to a bounded deque under a lock, and wakes the writer thread only when it is asleep.
  It never raises: every problem is logged on the ``progress_relay`` logger and the event is
  dropped (or, for values JSON cannot encode, converted: see ``_sanitize``).
* The writer thread (a daemon, started on the first ``emit``) connects, takes a batch of lines,
  writes it with non-blocking ``send`` calls, and reads the relay's answers (rejected lines) as
  they come. When a write fails, the lines written in full count as sent; the unfinished line
  and every line after it are written again on a new connection (docs/protocol.md, 3).
  Connecting retries with exponential backoff (50 ms doubling up to ``max_backoff``).
* When the queue is full the oldest queued event is dropped and counted (``stats()["dropped"]``).
* After ``os.fork()`` the child starts from an empty emitter: new locks, no queue, no
  connection, no thread. Its first ``emit`` opens its own connection; it never writes into the
  parent's connection and never sends what the parent had queued.
* At interpreter exit, every emitter gets a short ``flush`` (``exit_timeout``).
"""

from __future__ import annotations

import atexit
import bisect
import collections
import json
import logging
import math
import os
import re
import select
import socket
import threading
import time
import weakref
from typing import Any

__all__ = ["Emitter", "default_socket_path", "DEFAULT_SOCKET_PATH", "SOCKET_ENV"]

logger = logging.getLogger("progress_relay")

DEFAULT_SOCKET_PATH = "/run/progress.sock"
SOCKET_ENV = "PROGRESS_RELAY_SOCKET"

# The relay's rules for an ingest line (docs/protocol.md, 3), checked here so that a bad call is
# reported where it is made, with its topic, rather than as a line number in a relay answer.
_TOPIC_RE = re.compile(r"[A-Za-z0-9_\-.:/@=]{1,256}\Z")
_MAX_TYPE_BYTES = 64
_RESERVED = ("seq", "op")

_BATCH_BYTES = 256 * 1024          # at most this much is taken from the queue per write
_SEND_CHUNK = 64 * 1024            # per send() call; answers are read between two calls
_MIN_BACKOFF = 0.05                # first retry after a failed connect, then doubling
_CONNECT_TIMEOUT = 2.0             # a Unix connect blocks only when the relay's backlog is full
_POLL_INTERVAL = 0.5               # a blocked write wakes this often to check for close()
_IDLE_POLLS = (0.05, 0.25, 1.0)    # after writing, look for late answers this often, then sleep
_RECENT_LINES = 1024               # (line number, topic) kept to name the topic of a rejection
_REPORT_EVERY = 10.0               # seconds between two "events dropped" warnings
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)

_encode_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def default_socket_path() -> str:
    """``$PROGRESS_RELAY_SOCKET`` when set and not empty, else ``/run/progress.sock``."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH


class _Unencodable(Exception):
    pass


def _sanitize(value: Any, stack: list[int]) -> Any:
    """A copy of value that JSON can encode: what JSON has no form for becomes ``str(value)``,
    NaN and infinities become null, non-string keys become strings. Circular references raise
    _Unencodable."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dict, list, tuple)):
        if id(value) in stack:
            raise _Unencodable("circular reference")
        stack.append(id(value))
        try:
            if isinstance(value, dict):
                return {_key(k): _sanitize(v, stack) for k, v in value.items()}
            return [_sanitize(v, stack) for v in value]
        finally:
            stack.pop()
    return str(value)


def _key(k: Any) -> str:
    if isinstance(k, str):
        return k
    if k is None or isinstance(k, bool):
        return json.dumps(k)
    return str(k)


def _percent(current: Any, total: Any) -> Any:
    """100 * current / total, within 0 and 100, one decimal, an int when whole; 0 when it cannot
    be computed (no total, or not numbers)."""
    try:
        p = 100.0 * float(current) / float(total)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return 0
    if not math.isfinite(p):
        return 0
    p = round(min(100.0, max(0.0, p)), 1)
    return int(p) if p == int(p) else p


def _error_text(error: Any) -> str:
    if isinstance(error, BaseException):
        name = type(error).__name__
        try:
            text = str(error)
        except Exception:
            text = ""
        return f"{name}: {text}" if text else name
    return error if isinstance(error, str) else str(error)


# Every Emitter of this process, for the fork and exit hooks.
_EMITTERS: weakref.WeakSet[Emitter] = weakref.WeakSet()


class Emitter:
    """Sends events to the progress relay over its Unix socket.

    ``path`` defaults to ``$PROGRESS_RELAY_SOCKET``, else ``/run/progress.sock``.
    ``max_queue`` events wait at most (the oldest is dropped beyond that and counted);
    ``max_backoff`` caps the delay between two connection attempts; ``exit_timeout`` is how long
    the flush at interpreter exit may wait.

    Thread-safe and fork-safe; ``emit`` never blocks on the relay and never raises.
    """

    def __init__(self, path: str | None = None, *, max_queue: int = 10000,
                 max_backoff: float = 2.0, exit_timeout: float = 1.0) -> None:
        self.path: str = path if path else default_socket_path()
        self.max_queue = max(1, int(max_queue))
        self.max_backoff = max(_MIN_BACKOFF, float(max_backoff))
        self.exit_timeout = float(exit_timeout)
        self._init_state()
        _EMITTERS.add(self)

    def __repr__(self) -> str:
        return f"<progress_relay.Emitter path={self.path!r}>"

    # ------------------------------------------------------------------------------ state

    def _init_state(self) -> None:
        """Everything a process owns alone; run again in the child after a fork."""
        self._pid = os.getpid()
        # Reentrant: a signal handler that emits while its thread is inside emit() must not
        # deadlock.
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)     # the writer waits here
        self._done = threading.Condition(self._lock)     # flush() waits here
        self._writer_mutex = threading.Lock()            # held by whoever writes (thread or inline)
        self._queue: collections.deque[tuple[bytes, str]] = collections.deque()
        self._inflight = 0              # lines taken from the queue and not yet written in full
        self._thread: threading.Thread | None = None
        self._writer_waiting = False
        self._stopping = False
        self._closed = False
        # owned by the writer (thread or inline drain)
        self._sock: socket.socket | None = None
        self._pending = bytearray()
        self._pending_ends: list[int] = []
        self._pending_topics: list[str] = []
        self._conn_lines = 0
        self._recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=_RECENT_LINES)
        self._rbuf = b""
        self._rx_eof = False
        self._connect_failures = 0
        self._last_drop_report = 0.0
        self._dropped_reported = 0
        # counters
        self._queued_total = 0
        self._sent = 0
        self._dropped = 0
        self._invalid = 0
        self._rejected = 0
        self._forbidden_logged = False
        self._connections = 0
        self._warned_closed = False
        self._warned_converted = False

    def _after_fork_in_child(self) -> None:
        old = self._sock
        closed = self._closed
        self._init_state()
        self._closed = closed
        if old is not None:
            # Closes this process's copy of the descriptor only: the parent's connection stays.
            try:
                old.close()
            except OSError:
                pass

    # ------------------------------------------------------------------------------ emitting

    def emit(self, topic: Any = None, type: Any = None, /, **fields: Any) -> bool:
        """Queue one event ``{"topic": topic, "type": type, **fields}`` (no ``type`` when None).

        ``topic`` and ``type`` may also be given as keywords. Returns True when the event was
        queued, False when it was dropped (the reason is logged). Never raises."""
        try:
            if "topic" in fields:
                if topic is not None:
                    return self._invalid_event(topic, "topic given twice")
                topic = fields.pop("topic")
            if "type" in fields:
                if type is not None:
                    return self._invalid_event(topic, "type given twice")
                type = fields.pop("type")
            if not isinstance(topic, str) or not _TOPIC_RE.match(topic):
                return self._invalid_event(
                    topic, "the topic must be 1 to 256 characters of A-Z a-z 0-9 _ - . : / @ =")
            if type is not None and (not isinstance(type, str)
                                     or len(type.encode("utf-8", "replace")) > _MAX_TYPE_BYTES):
                return self._invalid_event(topic, "the type must be a string of at most 64 bytes")
            for name in _RESERVED:
                if name in fields:
                    return self._invalid_event(topic, f"the field {name!r} is reserved")
            event: dict[str, Any] = {"topic": topic}
            if type is not None:
                event["type"] = type
            event.update(fields)
            line = self._encode(topic, event)
            if line is None:
                return False
            return self._enqueue(line, topic)
        except Exception:
            try:
                logger.exception("progress-relay: could not queue an event (dropped)")
            except Exception:
                pass
            return False

    def progress(self, topic: str, current: Any, total: Any, message: Any = None,
                 status: Any = "PROGRESS", **fields: Any) -> bool:
        """A ``progress`` event: ``progress`` (0 to 100, from current/total), ``current``,
        ``total``, ``message`` (default ``"current/total"``), ``status``."""
        if message is None:
            message = f"{current}/{total}"
        return self.emit(topic, "progress", progress=_percent(current, total), current=current,
                         total=total, message=message, status=status, **fields)

    def complete(self, topic: str, result: Any = None, message: Any = "done",
                 success: bool = True, **fields: Any) -> bool:
        """A ``complete`` event: ``success``, ``message``, ``result``."""
        return self.emit(topic, "complete", success=success, message=message, result=result,
                         **fields)

    def error(self, topic: str, error: Any, details: Any = None, **fields: Any) -> bool:
        """An ``error`` event: ``error`` (an exception becomes ``"TypeName: message"``) and
        ``details`` (default for an exception: ``{"type": TypeName}``)."""
        if details is None and isinstance(error, BaseException):
            details = {"type": type(error).__name__}
        return self.emit(topic, "error", error=_error_text(error), details=details, **fields)

    def _invalid_event(self, topic: Any, why: str) -> bool:
        with self._lock:
            self._invalid += 1
        logger.error("progress-relay: event for topic %r dropped: %s", topic, why)
        return False

    def _encode(self, topic: str, event: dict[str, Any]) -> bytes | None:
        try:
            text = _encode_json(event)
        except (TypeError, ValueError, OverflowError) as e:
            try:
                text = _encode_json(_sanitize(event, []))
            except Exception as e2:
                with self._lock:
                    self._invalid += 1
                logger.error("progress-relay: event for topic %r dropped: cannot encode it as "
                             "JSON (%s)", topic, e2)
                return None
            if not self._warned_converted:
                self._warned_converted = True
                logger.warning("progress-relay: event for topic %r has values JSON cannot encode "
                               "(%s): sent as strings (NaN and infinities as null). Further "
                               "conversions are logged at DEBUG.", topic, e)
            else:
                logger.debug("progress-relay: converted values of an event for topic %r (%s)",
                             topic, e)
        try:
            line = text.encode("utf-8")
        except UnicodeEncodeError:
            # lone surrogates (e.g. from undecodable file names) cannot be UTF-8
            logger.warning("progress-relay: event for topic %r has text that is not valid "
                           "Unicode: replaced with '?'", topic)
            line = text.encode("utf-8", "replace")
        return line + b"\n"

    def _enqueue(self, line: bytes, topic: str) -> bool:
        with self._lock:
            if self._closed:
                warn = not self._warned_closed
                self._warned_closed = True
            else:
                warn = None
                q = self._queue
                if len(q) >= self.max_queue:
                    q.popleft()
                    self._dropped += 1
                q.append((line, topic))
                self._queued_total += 1
                if self._thread is None:
                    self._start_thread_locked()
                elif self._writer_waiting:
                    self._writer_waiting = False
                    self._work.notify()
        if warn is not None:
            if warn:
                logger.warning("progress-relay: emit after close(): event for topic %r dropped",
                               topic)
            return False
        return True

    def _start_thread_locked(self) -> bool:
        t = threading.Thread(target=self._run, name="progress-relay-emitter", daemon=True)
        try:
            t.start()
        except RuntimeError as e:    # interpreter shutting down, or no more threads
            logger.debug("progress-relay: cannot start the writer thread: %s", e)
            return False
        self._thread = t
        return True

    # ------------------------------------------------------------------------------ flush, close

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until every queued event was written to the relay, at most ``timeout`` seconds
        (None: no limit). True when everything was written. Never raises."""
        try:
            if self._pid != os.getpid():       # forked by something that skipped the fork hooks
                self._after_fork_in_child()
                return True
            deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
            with self._lock:
                if not (self._queue or self._inflight):
                    return True
                if threading.current_thread() is self._thread:
                    return False               # called from the writer (e.g. by a log handler)
                if self._thread is None and not self._closed:
                    self._start_thread_locked()
                while self._thread is not None:
                    if not (self._queue or self._inflight):
                        return True
                    if deadline is None:
                        self._done.wait()
                    else:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return False
                        self._done.wait(left)
            # No writer thread (none can be started, e.g. during interpreter shutdown): write
            # on this thread.
            return self._drain_inline(deadline)
        except Exception:
            logger.exception("progress-relay: flush failed")
            return False

    def close(self, timeout: float | None = 5.0) -> bool:
        """Flush (at most ``timeout`` seconds), then stop the writer and close the connection.
        Events emitted afterwards are dropped. True when everything was written."""
        ok = self.flush(timeout)
        try:
            with self._lock:
                self._closed = True
                self._stopping = True
                self._work.notify_all()
                t = self._thread
            if t is not None and t is not threading.current_thread():
                t.join(2 * _POLL_INTERVAL + 0.5)
            if self._writer_mutex.acquire(timeout=0.1):
                try:
                    self._close_socket()
                finally:
                    self._writer_mutex.release()
            with self._lock:
                left = len(self._queue) + self._inflight
            if left:
                logger.warning("progress-relay: closed with %d event(s) not written to %s",
                               left, self.path)
        except Exception:
            logger.exception("progress-relay: close failed")
        return ok

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """Counts for this process: ``queued`` (waiting or being written), ``sent`` (written in
        full), ``dropped`` (oldest dropped from a full queue), ``invalid`` (refused by emit),
        ``rejected`` (answered as bad by the relay), ``connections`` (made so far),
        ``connected``."""
        with self._lock:
            return {
                "queued": len(self._queue) + self._inflight,
                "sent": self._sent,
                "dropped": self._dropped,
                "invalid": self._invalid,
                "rejected": self._rejected,
                "connections": self._connections,
                "connected": self._sock is not None,
            }

    @property
    def dropped(self) -> int:
        return self._dropped

    def _at_exit(self) -> None:
        if self._pid != os.getpid() or self._closed:
            return
        with self._lock:
            pending = len(self._queue) + self._inflight
        if pending and not self.flush(self.exit_timeout):
            with self._lock:
                left = len(self._queue) + self._inflight
            logger.warning("progress-relay: %d event(s) not written to %s at exit", left,
                           self.path)

    # ------------------------------------------------------------------------------ the writer

    def _run(self) -> None:
        with self._writer_mutex:
            try:
                self._loop(None, until_empty=False)
            except BaseException:
                try:
                    logger.exception("progress-relay: writer thread failed")
                except BaseException:
                    pass
            finally:
                with self._lock:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    self._done.notify_all()
                if self._stopping:
                    self._close_socket()

    def _drain_inline(self, deadline: float | None) -> bool:
        """Write on the caller's thread (no writer thread could be started, e.g. at exit)."""
        timeout = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._writer_mutex.acquire(timeout=timeout):
            return False
        try:
            self._loop(deadline, until_empty=True)
        finally:
            self._writer_mutex.release()
        with self._lock:
            return not (self._queue or self._inflight)

    def _loop(self, deadline: float | None, until_empty: bool) -> None:
        """The writer. It returns when close() stops it, when the deadline (if any) passed, and,
        with until_empty (an inline drain), when everything is written."""
        backoff = _MIN_BACKOFF
        idle_polls = 0
        while True:
            with self._lock:
                if self._stopping:
                    return
                have_work = bool(self._queue or self._pending)
                if not have_work:
                    if until_empty:
                        return
                    timeout: float | None = None
                    if self._sock is not None and idle_polls < len(_IDLE_POLLS):
                        timeout = _IDLE_POLLS[idle_polls]
                    self._writer_waiting = True
                    self._work.wait(timeout)
                    self._writer_waiting = False
                    have_work = bool(self._queue or self._pending)
                    # mypy keeps _stopping narrowed to False from the check above, but close()
                    # sets it from another thread while this one waits.
                    if self._stopping:
                        return  # type: ignore[unreachable]
            self._report_drops()
            if not have_work:
                idle_polls += 1
                if self._sock is not None:
                    self._read_answers(idle=True)
                continue
            idle_polls = 0
            if deadline is not None and time.monotonic() >= deadline:
                return
            if self._sock is None and not self._connect():
                delay = backoff
                backoff = min(backoff * 2, self.max_backoff)
                if deadline is not None:
                    delay = min(delay, deadline - time.monotonic())
                    if delay <= 0:
                        return
                with self._lock:
                    if not self._stopping:
                        self._work.wait(delay)     # close() cuts it short
                continue
            if not self._pending:
                self._take_batch()
            sent_before = self._sent
            ok = self._write_pending(deadline)
            if self._sent != sent_before:
                backoff = _MIN_BACKOFF
            if ok:
                with self._lock:
                    self._done.notify_all()
            elif self._sock is None and self._sent == sent_before:
                # A connection that takes nothing (the relay is stopping, or accepts and drops
                # connections): wait before the next one, as after a failed connect.
                delay = backoff
                backoff = min(backoff * 2, self.max_backoff)
                if deadline is not None:
                    delay = min(delay, deadline - time.monotonic())
                with self._lock:
                    if not self._stopping and delay > 0:
                        self._work.wait(delay)

    def _take_batch(self) -> None:
        with self._lock:
            q = self._queue
            pending = self._pending
            while q and len(pending) < _BATCH_BYTES:
                line, topic = q.popleft()
                pending += line
                self._pending_ends.append(len(pending))
                self._pending_topics.append(topic)
            self._inflight = len(self._pending_ends)

    def _write_pending(self, deadline: float | None) -> bool:
        """Write the batch. True when all of it was written; False when the connection failed
        (the unfinished line and what follows stay pending, for a new connection) or the writer
        must stop."""
        sock = self._sock
        assert sock is not None
        total = len(self._pending)
        sent = 0
        failed: BaseException | None = None
        with memoryview(self._pending) as view:
            while sent < total:
                try:
                    sent += sock.send(view[sent:sent + _SEND_CHUNK], _MSG_NOSIGNAL)
                    if sent < total:
                        self._read_answers(idle=False)   # keep up with the relay's answers
                    continue
                except BlockingIOError:
                    pass
                except OSError as e:
                    failed = e
                    break
                # The relay is not reading (it is busy, or it stopped): wait, reading its
                # answers meanwhile, and give close() or a deadline a chance.
                if self._stopping or (deadline is not None and time.monotonic() >= deadline):
                    break
                try:
                    ready = _wait_fd(sock, readable=not self._rx_eof, timeout=_POLL_INTERVAL)
                except OSError as e:
                    failed = e
                    break
                if ready & 1:
                    self._read_answers(idle=False)
        written = bisect.bisect_right(self._pending_ends, sent)
        if written:
            start = self._pending_ends[written - 1]
            for topic in self._pending_topics[:written]:
                self._conn_lines += 1
                self._recent.append((self._conn_lines, topic))
            del self._pending[:start]
            self._pending_ends = [e - start for e in self._pending_ends[written:]]
            del self._pending_topics[:written]
        with self._lock:
            self._sent += written
            self._inflight = len(self._pending_ends)
        if failed is not None:
            # Read what the relay answered before it went away, then start over elsewhere.
            self._read_answers(idle=False)
            logger.info("progress-relay: write to %s failed (%s); %d line(s) to write again on "
                        "a new connection", self.path, failed, len(self._pending_ends))
            self._close_socket()
            return False
        if self._pending:
            return False
        self._read_answers(idle=False)
        return True

    def _connect(self) -> bool:
        s = None
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(_CONNECT_TIMEOUT)
            s.connect(self.path)
            s.setblocking(False)
        except Exception as e:
            if s is not None:
                s.close()
            self._connect_failures += 1
            if self._connect_failures == 1:
                with self._lock:
                    n = len(self._queue) + self._inflight
                logger.warning("progress-relay: cannot connect to %s (%s); %d event(s) queued, "
                               "retrying (every %gs at most)", self.path, e, n, self.max_backoff)
            else:
                logger.debug("progress-relay: cannot connect to %s (%s), attempt %d", self.path,
                             e, self._connect_failures)
            return False
        if self._connect_failures:
            logger.info("progress-relay: connected to %s after %d failed attempt(s)", self.path,
                        self._connect_failures)
        self._connect_failures = 0
        self._conn_lines = 0
        self._recent.clear()
        self._rbuf = b""
        self._rx_eof = False
        with self._lock:
            self._sock = s
            self._connections += 1
        return True

    def _close_socket(self) -> None:
        s = self._sock
        if s is None:
            return
        with self._lock:
            self._sock = None
        try:
            s.close()
        except OSError:
            pass

    def _read_answers(self, idle: bool) -> None:
        """Read and log the relay's answers without blocking. At end of file while idle, the
        connection is closed (the next event opens a new one)."""
        sock = self._sock
        if sock is None or self._rx_eof:
            return
        eof = False
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not data:
                eof = True
                break
            self._rbuf += data
            if len(self._rbuf) > 1 << 20 and b"\n" not in self._rbuf:
                self._rbuf = b""      # not an answer stream: do not keep it
        if b"\n" in self._rbuf:
            *lines, self._rbuf = self._rbuf.split(b"\n")
            for raw in lines:
                if raw.strip():
                    self._log_answer(raw)
        if eof:
            self._rx_eof = True
        if eof and idle:
            logger.debug("progress-relay: the relay closed the connection")
            self._close_socket()

    def _log_answer(self, raw: bytes) -> None:
        with self._lock:
            self._rejected += 1
        try:
            answer = json.loads(raw)
            reason = answer.get("error")
            n = answer.get("line")
        except Exception:
            logger.error("progress-relay: unexpected answer from the relay: %r", raw[:200])
            return
        topic = None
        for lineno, t in reversed(self._recent):
            if lineno == n:
                topic = t
                break
        if reason == "forbidden_topic":
            # The relay's --publish-grant gives this process's uid and groups no such topic: every
            # event of it will be refused the same way, so it is said once (then at DEBUG).
            if self._forbidden_logged:
                logger.debug("progress-relay: the relay refused topic %r from this process "
                             "(forbidden_topic, line %s of the connection)", topic, n)
                return
            self._forbidden_logged = True
            logger.error("progress-relay: the relay refuses topic %r from this process: no "
                         "--publish-grant of the relay covers it for this process's uid and "
                         "groups (forbidden_topic; further refusals are logged at DEBUG)", topic)
            return
        logger.error("progress-relay: the relay rejected an event for topic %r: %s (line %s of "
                     "the connection)", topic, reason, n)

    def _report_drops(self) -> None:
        dropped = self._dropped
        if dropped == self._dropped_reported:
            return
        now = time.monotonic()
        if now - self._last_drop_report < _REPORT_EVERY and self._dropped_reported:
            return
        logger.warning("progress-relay: queue full (%d events): %d oldest event(s) dropped so "
                       "far", self.max_queue, dropped)
        self._dropped_reported = dropped
        self._last_drop_report = now


def _wait_fd(sock: socket.socket, readable: bool, timeout: float) -> int:
    """Waits until sock is writable or (when asked) readable. Returns bit 1 for readable,
    bit 2 for writable (hang-ups count as both, so that the next call reports the error)."""
    if hasattr(select, "poll"):
        p = select.poll()
        mask = select.POLLOUT | (select.POLLIN if readable else 0)
        p.register(sock.fileno(), mask)
        events = p.poll(timeout * 1000)
        r = 0
        for _, ev in events:
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                r |= 1
            if ev & (select.POLLOUT | select.POLLHUP | select.POLLERR):
                r |= 2
        return r
    rl, wl, _ = select.select([sock] if readable else [], [sock], [], timeout)
    return (1 if rl else 0) | (2 if wl else 0)


def _after_fork_in_child() -> None:
    for em in list(_EMITTERS):
        try:
            em._after_fork_in_child()
        except Exception:
            pass


def _at_exit() -> None:
    for em in list(_EMITTERS):
        try:
            em._at_exit()
        except Exception:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
