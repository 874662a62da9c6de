"""Relay tokens (HS256 JWTs) minted with the standard library, for web applications that hand
tokens to their pages."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["token", "read_secret"]

#: The ``aud`` claim written by default, as ``progress-relay token`` does; run the relay with
#: ``--jwt-audience progress-relay`` so that it refuses tokens minted for other services.
DEFAULT_AUDIENCE = "progress-relay"
#: The relay refuses a secret shorter than this (HS256 needs a key as long as its digest).
MIN_SECRET_BYTES = 32

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TTL_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([smhd]?)\s*\Z")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _seconds(ttl: int | float | str | datetime.timedelta) -> int:
    if isinstance(ttl, datetime.timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, str):
        m = _TTL_RE.match(ttl)
        if not m:
            raise ValueError(f"ttl {ttl!r}: expected seconds or a number with s, m, h or d")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        seconds = float(ttl)
    else:
        raise TypeError(f"ttl must be seconds, a timedelta or a string like '15m', not {ttl!r}")
    if not (seconds >= 1 and seconds < float("inf")):
        raise ValueError(f"ttl {ttl!r}: must be at least one second")
    return int(seconds)


def token(secret: str | bytes, sub: str, topics: str | Iterable[str] = (),
          ttl: int | float | str | datetime.timedelta = 3600, *,
          now: float | None = None, claims: Mapping[str, Any] | None = None,
          aud: str | None = DEFAULT_AUDIENCE) -> str:
    """An HS256 relay token for user ``sub``, granting ``topics`` (topic names or patterns such
    as ``"task:*"``), valid ``ttl`` from now: seconds, a ``timedelta``, or a string such as
    ``"90"``, ``"15m"``, ``"1h"``, ``"7d"`` (as ``progress-relay token --ttl``).

    ``secret`` is the relay's ``--jwt-secret-file`` content without its trailing newline (a str
    is encoded as UTF-8; :func:`read_secret` reads such a file), at least 32 bytes as the relay
    requires. Claims: ``sub``, ``topics``, ``iat`` and ``exp`` (whole seconds), ``aud`` (default
    ``"progress-relay"``; ``aud=None`` leaves it out), plus ``claims`` if given.
    Raises ``ValueError``/``TypeError`` on bad arguments."""
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("the secret is empty")
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret is {len(key)} bytes; the relay needs at least "
                         f"{MIN_SECRET_BYTES} (make one with: head -c 32 /dev/urandom | base64)")
    if not isinstance(sub, str) or not sub:
        raise ValueError("sub must be a non-empty string")
    topic_list = [topics] if isinstance(topics, str) else list(topics)
    for t in topic_list:
        if not isinstance(t, str) or not t:
            raise ValueError(f"topics must be non-empty strings, got {t!r}")
    issued = int(time.time() if now is None else now)
    payload = {"sub": sub, "topics": topic_list, "iat": issued, "exp": issued + _seconds(ttl)}
    if aud is not None:
        if not isinstance(aud, str) or not aud:
            raise ValueError("aud must be a non-empty string or None")
        payload["aud"] = aud
    if claims:
        payload.update(claims)
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64url(json.dumps(payload, separators=(",", ":")).encode()))
    signature = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + _b64url(signature)


def read_secret(path: str) -> bytes:
    """The secret in ``path`` as the relay reads its ``--jwt-secret-file``: the file's bytes with
    one trailing newline (``\\n`` or ``\\r\\n``) removed."""
    with open(path, "rb") as f:
        data = f.read()
    if data.endswith(b"\n"):
        data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
    return data
