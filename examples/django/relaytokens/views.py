"""A token endpoint for progress-relay with Django: one short-lived token per task, for its owner.

    GET /tasks/<task id>/relay-token  ->  {"topic": "task:<id>", "url": "wss://...", "token": "<JWT>"}

The Celery task (`base=ProgressTask`) publishes to `task:<id>`; the page asks this endpoint for a
token before it subscribes. The token grants exactly `task:<id>`, and only the user who started
the task gets one (a `task:*` token would let every user read every task's progress: that is for
the staff page only).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpResponseForbidden, JsonResponse
from django.views.decorators.http import require_GET

import progress_relay

TOKEN_TTL = "15m"  # the browser client asks again before it expires

# Who started which task: in a real application a model row written when the task was started,
# e.g. `Import.objects.create(owner=request.user, celery_id=import_rows.delay(path).id)`, and
# task_owner() is `Import.objects.filter(celery_id=task_id).values_list("owner_id", flat=True).first()`.
TASK_OWNERS: dict[str, int] = {}


def task_owner(task_id: str) -> int | None:
    return TASK_OWNERS.get(task_id)


def relay_secret() -> bytes:
    # The application's own copy of the relay's secret (README, "Install under systemd").
    return progress_relay.read_secret(settings.RELAY_SECRET_FILE)


@require_GET
@login_required
def relay_token(request, task_id: str):
    if task_owner(task_id) != request.user.pk:  # unknown tasks too: say nothing about others' tasks
        return HttpResponseForbidden("not your task")
    topic = f"task:{task_id}"
    return JsonResponse({
        "topic": topic,
        "url": settings.RELAY_URL,
        "token": progress_relay.token(relay_secret(), str(request.user.pk), [topic], ttl=TOKEN_TTL),
    })


@require_GET
@login_required
def admin_relay_token(request):
    """Every task's progress, for a staff page only."""
    if not request.user.is_staff:
        return HttpResponseForbidden("staff only")
    return JsonResponse({
        "topic": "task:*",
        "url": settings.RELAY_URL,
        "token": progress_relay.token(relay_secret(), str(request.user.pk), ["task:*"], ttl=TOKEN_TTL),
    })
