"""The Celery application the test worker runs (tests/test_celery.py starts it).

Broker and result backend come from the environment: PRTEST_BROKER and PRTEST_BACKEND (and, for
Celery's filesystem transport, PRTEST_FS_DIR). The relay's socket comes, as in production, from
PROGRESS_RELAY_SOCKET.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from progress_relay.celery import ProgressTask


def make_app(name: str = "prtest") -> Celery:
    app = Celery(name, broker=os.environ["PRTEST_BROKER"], backend=os.environ["PRTEST_BACKEND"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        task_default_queue=os.environ.get("PRTEST_QUEUE", "prtest"),
    )
    fs_dir = os.environ.get("PRTEST_FS_DIR")
    if fs_dir:
        app.conf.broker_transport_options = {
            "data_folder_in": os.path.join(fs_dir, "out"),
            "data_folder_out": os.path.join(fs_dir, "out"),
            "processed_folder": os.path.join(fs_dir, "processed"),
            "control_folder": os.path.join(fs_dir, "control"),
            "store_processed": False,
        }
    return app


app = make_app()


@app.task(bind=True, base=ProgressTask, name="prtest.count")
def count(self, steps, delay=0.0):
    for i in range(1, steps + 1):
        if delay:
            time.sleep(delay)
        self.progress(i, steps, message=f"step {i} of {steps}")
    return {"steps": steps, "pid": os.getpid()}


@app.task(bind=True, base=ProgressTask, name="prtest.fail")
def fail(self):
    self.progress(1, 2, message="about to fail")
    raise ValueError("boom")
