"""Celery integration: a base task class whose tasks report progress to the relay.

    from celery import Celery
    from progress_relay.celery import ProgressTask

    app = Celery("proj", broker="redis://localhost:6379/0")

    @app.task(bind=True, base=ProgressTask)
    def import_rows(self, path):
        rows = load(path)
        for i, row in enumerate(rows, 1):
            save(row)
            self.progress(i, len(rows), message=f"row {i} of {len(rows)}")
        return {"rows": len(rows)}

Events go to the topic ``task:<task id>``: ``progress`` from ``self.progress(...)``, then
``complete`` (``success: true``, ``message``, ``result``: the return value) when the task
succeeds, or ``error`` (``error``: ``"TypeName: message"``, ``details``) when it fails, published
from Celery's own ``on_success``/``on_failure`` hooks. The socket is ``$PROGRESS_RELAY_SOCKET``,
else ``/run/progress.sock``. The relay being down never fails or slows a task: events wait in the
process's bounded buffer and are sent when it is back.

Each pool process (prefork) has its own connection and writer thread; before a pool process exits,
Celery's ``worker_process_shutdown`` signal flushes what it still holds (at most
``FLUSH_ON_SHUTDOWN`` seconds).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, signals

from . import _emitter, get_emitter
from ._emitter import Emitter

__all__ = ["ProgressTask", "FLUSH_ON_SHUTDOWN"]

logger = logging.getLogger("progress_relay")

FLUSH_ON_SHUTDOWN = 2.0


class ProgressTask(Task):
    """Base class for tasks that publish their progress; use with ``bind=True``.

    Class attributes to adjust in a subclass:

    * ``progress_topic_prefix`` (``"task:"``): the topic is this prefix plus the task id;
    * ``progress_complete_message`` (``"done"``): the ``message`` of the ``complete`` event;
    * ``progress_include_traceback`` (False): add the traceback text to an error's ``details``
      (off by default: the pages that read the topic usually belong to end users);
    * ``progress_emitter`` (None): an :class:`~progress_relay.Emitter` to use instead of the
      process's shared one.
    """

    abstract = True  # Celery < 5 reads this; later versions ignore it

    progress_topic_prefix: str = "task:"
    progress_complete_message: Any = "done"
    progress_include_traceback: bool = False
    progress_emitter: Emitter | None = None

    def progress_topic(self, task_id: str | None = None) -> str | None:
        """The topic of this task (of the current request unless ``task_id`` is given)."""
        if task_id is None:
            try:
                task_id = self.request.id
            except Exception:
                task_id = None
        if not task_id:
            return None
        return f"{self.progress_topic_prefix}{task_id}"

    def _progress_emitter(self) -> Emitter:
        return self.progress_emitter or get_emitter()

    def progress(self, current: Any, total: Any, message: Any = None,
                 status: Any = "PROGRESS", **fields: Any) -> bool:
        """Publish a ``progress`` event for this task: ``progress`` (0 to 100, from
        current/total), ``current``, ``total``, ``message`` (default ``"current/total"``),
        ``status`` (default ``"PROGRESS"``), and any extra fields. Never raises; False when the
        event was not queued (e.g. the task runs outside a worker, without an id)."""
        try:
            topic = self.progress_topic()
            if topic is None:
                logger.debug("progress-relay: %s.progress() called without a task id: not sent",
                             self.name)
                return False
            return self._progress_emitter().progress(topic, current, total, message=message,
                                                     status=status, **fields)
        except Exception:
            logger.exception("progress-relay: progress() failed")
            return False

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        try:
            topic = self.progress_topic(task_id)
            if topic is not None:
                self._progress_emitter().complete(
                    topic, result=retval, message=self.progress_complete_message, success=True)
        except Exception:
            logger.exception("progress-relay: could not publish the complete event")
        super().on_success(retval, task_id, args, kwargs)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        try:
            topic = self.progress_topic(task_id)
            if topic is not None:
                details: dict[str, Any] = {"type": type(exc).__name__}
                if self.progress_include_traceback and einfo is not None:
                    details["traceback"] = str(getattr(einfo, "traceback", einfo))
                self._progress_emitter().error(topic, exc, details=details)
        except Exception:
            logger.exception("progress-relay: could not publish the error event")
        super().on_failure(exc, task_id, args, kwargs, einfo)


def _flush_before_pool_process_exits(*args: Any, **kwargs: Any) -> None:
    # Pool processes end with os._exit(): no atexit flush there.
    for em in list(_emitter._EMITTERS):
        try:
            em.flush(FLUSH_ON_SHUTDOWN)
        except Exception:
            pass


def _flush_before_worker_exits(*args: Any, **kwargs: Any) -> None:
    _flush_before_pool_process_exits()


signals.worker_process_shutdown.connect(_flush_before_pool_process_exits, weak=False)
signals.worker_shutdown.connect(_flush_before_worker_exits, weak=False)
