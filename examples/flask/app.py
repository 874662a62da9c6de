"""A token endpoint for progress-relay with Flask: one short-lived token per task, for its owner.

    GET /tasks/<task id>/relay-token  ->  {"topic": "task:<id>", "url": "wss://...", "token": "<JWT>"}

The Celery task (`base=ProgressTask`) publishes to `task:<id>`; the page asks this endpoint for a
token before it subscribes. The token grants exactly `task:<id>`, and only the user who started
the task gets one (a `task:*` token would let every user read every task's progress: that is for
the admin page only).

Run: RELAY_SECRET_FILE=/etc/myapp/relay-secret FLASK_SECRET_KEY=... flask --app app run
"""

from __future__ import annotations

import os

from flask import Flask, abort, session

import progress_relay

RELAY_URL = os.environ.get("RELAY_URL", "wss://example.com/relay/ws")
TOKEN_TTL = "15m"  # the browser client asks again before it expires


def relay_secret() -> bytes:
    # The application's own copy of the relay's secret (README, "Install under systemd").
    return progress_relay.read_secret(os.environ.get("RELAY_SECRET_FILE", "/etc/myapp/relay-secret"))


# Who started which task: in a real application a row written when the task was started, e.g.
# `Import(owner_id=user_id, celery_id=import_rows.delay(path).id)`.
TASK_OWNERS: dict[str, str] = {}


def task_owner(task_id: str) -> str | None:
    return TASK_OWNERS.get(task_id)


app = Flask(__name__)
app.secret_key = os.environ.get("FLASK_SECRET_KEY") or os.urandom(32)


def signed_in_user() -> str:
    # Your login sets session["user_id"] (Flask-Login's current_user works the same way).
    user_id = session.get("user_id")
    if not user_id:
        abort(401)
    return user_id


@app.get("/tasks/<task_id>/relay-token")
def relay_token(task_id: str):
    user_id = signed_in_user()
    if task_owner(task_id) != user_id:  # unknown tasks too: say nothing about others' tasks
        abort(403)
    topic = f"task:{task_id}"
    return {
        "topic": topic,
        "url": RELAY_URL,
        "token": progress_relay.token(relay_secret(), user_id, [topic], ttl=TOKEN_TTL),
    }


@app.get("/admin/relay-token")
def admin_relay_token():
    """Every task's progress, for an operators' page only."""
    user_id = signed_in_user()
    if not session.get("is_admin"):
        abort(403)
    return {
        "topic": "task:*",
        "url": RELAY_URL,
        "token": progress_relay.token(relay_secret(), user_id, ["task:*"], ttl=TOKEN_TTL),
    }
