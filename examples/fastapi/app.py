"""A token endpoint for progress-relay with FastAPI: one short-lived token per task, for its owner.

    GET /tasks/<task id>/relay-token  ->  {"topic": "task:<id>", "url": "wss://...", "token": "<JWT>"}

The Celery task (`base=ProgressTask`) publishes to `task:<id>`. The page asks this endpoint for a
token before it subscribes (progress-relay.js: `getToken: () => fetch(...).then((r) => r.json())`).
The token grants exactly `task:<id>`, and only the user who started the task gets one: a token
for `task:*` would let every user read every task's progress. `task:*` is for the admin page.

Run: RELAY_SECRET_FILE=/etc/myapp/relay-secret uvicorn app:app
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fastapi import Depends, FastAPI, HTTPException

import progress_relay

RELAY_URL = os.environ.get("RELAY_URL", "wss://example.com/relay/ws")
TOKEN_TTL = "15m"  # the browser client asks again before it expires


def relay_secret() -> bytes:
    # The application's own copy of the relay's secret (README, "Install under systemd").
    return progress_relay.read_secret(os.environ.get("RELAY_SECRET_FILE", "/etc/myapp/relay-secret"))


# --- stand-ins for the application's own authentication and data -------------------------------

@dataclass
class User:
    id: str
    is_admin: bool = False


def current_user() -> User:
    """The signed-in user: your authentication (a session, OAuth2PasswordBearer, ...)."""
    raise HTTPException(401, "not signed in")


# Who started which task: in a real application a row written when the task was started, e.g.
# `Import(owner=user, celery_id=import_rows.delay(path).id)`.
TASK_OWNERS: dict[str, str] = {}


def task_owner(task_id: str) -> str | None:
    return TASK_OWNERS.get(task_id)


# --- the endpoints ------------------------------------------------------------------------------

app = FastAPI()


@app.get("/tasks/{task_id}/relay-token")
def relay_token(task_id: str, user: User = Depends(current_user)):
    if task_owner(task_id) != user.id:  # unknown tasks too: say nothing about others' tasks
        raise HTTPException(403, "not your task")
    topic = f"task:{task_id}"
    return {
        "topic": topic,
        "url": RELAY_URL,
        "token": progress_relay.token(relay_secret(), user.id, [topic], ttl=TOKEN_TTL),
    }


@app.get("/admin/relay-token")
def admin_relay_token(user: User = Depends(current_user)):
    """Every task's progress, for an operators' page only."""
    if not user.is_admin:
        raise HTTPException(403, "admins only")
    return {
        "topic": "task:*",
        "url": RELAY_URL,
        "token": progress_relay.token(relay_secret(), user.id, ["task:*"], ttl=TOKEN_TTL),
    }
