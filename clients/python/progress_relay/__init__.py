"""progress_relay: send live progress events from Python workers to a progress-relay daemon.

    import progress_relay

    progress_relay.emit("task:42", "progress", progress=60, message="3/5")

    emitter = progress_relay.Emitter()            # $PROGRESS_RELAY_SOCKET or /run/progress.sock
    emitter.progress("task:42", 3, 5)
    emitter.complete("task:42", result={"rows": 10})

    token = progress_relay.token(secret, sub="alice", topics=["task:*"], ttl="15m")

Celery tasks: see :mod:`progress_relay.celery`. Standard library only; errors go to the
``progress_relay`` logger, never to the caller.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ._emitter import DEFAULT_SOCKET_PATH, SOCKET_ENV, Emitter, default_socket_path
from ._token import read_secret, token

__all__ = [
    "Emitter",
    "emit",
    "flush",
    "get_emitter",
    "token",
    "read_secret",
    "default_socket_path",
    "DEFAULT_SOCKET_PATH",
    "SOCKET_ENV",
]

__version__ = "0.1.0"

_default: Emitter | None = None
_default_lock = threading.Lock()


def get_emitter() -> Emitter:
    """The process's shared emitter (created on first use, for ``$PROGRESS_RELAY_SOCKET`` or
    ``/run/progress.sock``). Forked children use it too: it reconnects on its own after a fork."""
    global _default
    em = _default
    if em is None:
        with _default_lock:
            if _default is None:
                _default = Emitter()
            em = _default
    return em


def emit(topic: Any = None, type: Any = None, /, **fields: Any) -> bool:
    """``get_emitter().emit(topic, type, **fields)``: queue one event; never raises."""
    return get_emitter().emit(topic, type, **fields)


def flush(timeout: float | None = 5.0) -> bool:
    """Flush the shared emitter (see :meth:`Emitter.flush`)."""
    em = _default
    return True if em is None else em.flush(timeout)


def _reset_lock_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)
