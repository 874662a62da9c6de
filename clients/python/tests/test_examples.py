"""The token endpoints of examples/ (Django, Flask, FastAPI), through each framework's own test
client: the task's owner gets 200 with {"topic", "url", "token"}, another user 403; the token is
one the relay (a real one, with its key) accepts, and it grants exactly `task:<id>`."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import sys
import urllib.parse
from pathlib import Path

from prhelpers import ws_connect, ws_kwargs

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
TASK = "5f0c9a1e-7b1d-4c0e-9a57-1f2b3c4d5e6f"  # a Celery task id
OTHER = "0d7e1f6a-2b3c-4d5e-8f90-a1b2c3d4e5f6"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pydantic look their module up
    spec.loader.exec_module(module)
    return module


def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def check_answer(relay, answer: dict, sub: str, topic: str = f"task:{TASK}"):
    """The answer's shape, the token's claims, and the relay's verdict on it."""
    assert set(answer) == {"topic", "url", "token"}, answer
    assert answer["topic"] == topic
    token = answer["token"]
    c = claims(token)
    assert c["topics"] == [topic], c
    assert c["sub"] == sub and c["aud"] == "progress-relay", c
    assert 0 < c["exp"] - c["iat"] <= 15 * 60, c

    async def main():
        # The relay verifies it with its key and grants the task's topic...
        q = urllib.parse.urlencode([("token", token), ("topic", topic)])
        ws = await ws_connect(relay.url + "?" + q, **ws_kwargs())
        first = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert first["op"] == "subscribed" and first["topic"] == topic, first
        # ...and nothing else.
        if topic != "task:*":
            await ws.send(json.dumps({"op": "subscribe", "topic": f"task:{OTHER}"}))
            refused = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert refused["op"] == "error" and refused["code"] == "forbidden", refused
        await ws.close()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------

def test_fastapi_example(relay):
    from fastapi.testclient import TestClient

    app = load("fastapi_example", EXAMPLES / "fastapi" / "app.py")
    os.environ["RELAY_SECRET_FILE"] = relay.secret_file
    try:
        app.TASK_OWNERS[TASK] = "alice"
        client = TestClient(app.app)
        assert client.get(f"/tasks/{TASK}/relay-token").status_code == 401

        app.app.dependency_overrides[app.current_user] = lambda: app.User("alice")
        r = client.get(f"/tasks/{TASK}/relay-token")
        assert r.status_code == 200, r.text
        check_answer(relay, r.json(), "alice")
        assert client.get(f"/tasks/{OTHER}/relay-token").status_code == 403  # unknown task
        assert client.get("/admin/relay-token").status_code == 403

        app.app.dependency_overrides[app.current_user] = lambda: app.User("bob")
        assert client.get(f"/tasks/{TASK}/relay-token").status_code == 403

        app.app.dependency_overrides[app.current_user] = lambda: app.User("carol", is_admin=True)
        r = client.get("/admin/relay-token")
        assert r.status_code == 200, r.text
        check_answer(relay, r.json(), "carol", topic="task:*")
    finally:
        os.environ.pop("RELAY_SECRET_FILE", None)


def test_flask_example(relay):
    app = load("flask_example", EXAMPLES / "flask" / "app.py")
    os.environ["RELAY_SECRET_FILE"] = relay.secret_file
    try:
        app.TASK_OWNERS[TASK] = "alice"
        client = app.app.test_client()
        assert client.get(f"/tasks/{TASK}/relay-token").status_code == 401

        with client.session_transaction() as session:
            session["user_id"] = "alice"
        r = client.get(f"/tasks/{TASK}/relay-token")
        assert r.status_code == 200, r.get_data(as_text=True)
        check_answer(relay, r.get_json(), "alice")
        assert client.get(f"/tasks/{OTHER}/relay-token").status_code == 403
        assert client.get("/admin/relay-token").status_code == 403

        with client.session_transaction() as session:
            session["user_id"] = "bob"
        assert client.get(f"/tasks/{TASK}/relay-token").status_code == 403

        with client.session_transaction() as session:
            session.update(user_id="carol", is_admin=True)
        r = client.get("/admin/relay-token")
        assert r.status_code == 200
        check_answer(relay, r.get_json(), "carol", topic="task:*")
    finally:
        os.environ.pop("RELAY_SECRET_FILE", None)


def test_django_example(relay):
    import django
    from django.conf import settings

    sys.path.insert(0, str(EXAMPLES / "django"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_settings")
    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client
    from relaytokens import views

    call_command("migrate", verbosity=0)
    settings.RELAY_SECRET_FILE = relay.secret_file
    alice = User.objects.create_user("alice")
    bob = User.objects.create_user("bob")
    staff = User.objects.create_user("carol", is_staff=True)
    views.TASK_OWNERS[TASK] = alice.pk

    client = Client()
    r = client.get(f"/tasks/{TASK}/relay-token")
    assert r.status_code == 302 and "/login/" in r["Location"], r  # login_required

    client.force_login(alice)
    r = client.get(f"/tasks/{TASK}/relay-token")
    assert r.status_code == 200, r.content
    check_answer(relay, r.json(), str(alice.pk))
    assert client.get(f"/tasks/{OTHER}/relay-token").status_code == 403
    assert client.get("/admin/relay-token").status_code == 403

    client.force_login(bob)
    assert client.get(f"/tasks/{TASK}/relay-token").status_code == 403

    client.force_login(staff)
    r = client.get("/admin/relay-token")
    assert r.status_code == 200
    check_answer(relay, r.json(), str(staff.pk), topic="task:*")
