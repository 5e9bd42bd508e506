"""Idempotent writes: a POST that carries `Idempotency-Key` is carried out once, as Stripe's API does.

The first request with a key records it (in flight) before the operation runs. Once it has answered,
every later request with the same key gets that first answer again, byte for byte, with
`Idempotent-Replayed: true`, for IDLEGRID_IDEMPOTENCY_HOURS. A second request while the first is still
running is refused with 409 `idempotency_key_in_flight`; the same key with other parameters or another
operation with 422 `idempotency_key_reused`. Keys are a person's own: two people never share one; the
anonymous operations (log in, enrol a device) share one space of keys, where a replay still needs the
same body (the password, the one-time enrolment token).

What is remembered is an answer the operation gave: a refusal (a 400 on bad parameters, a 402 on a
short balance) changed nothing, so it is not kept and the request may be retried with the same key
once fixed. A key whose first request died without answering (its process killed) is taken over after
IN_FLIGHT_ABANDONED_SECONDS, longer than any request may run.

Some answers hold a secret (an API token from log in, an enrolment token, a device secret), so nothing
in a row gives the answer or the request back without the raw key, which is never stored:

- the row is found by an HMAC of the raw key (under SECRET_KEY, with the person's id);
- the answer is stored encrypted (AES-256-GCM) under a key derived from the raw key (HKDF, salted with
  SECRET_KEY), the row's name (that HMAC) bound in as associated data;
- the parameters' fingerprint is an HMAC under a second derived key, so a stored fingerprint cannot be
  used to test password guesses offline.

The database alone (a dump, a replica) holds no token, no password hash it could be tested against and
no raw key; with SECRET_KEY too, a key guessed by brute force opens only its own row. Changing SECRET_KEY
forgets every recorded key (a retry after that runs again), as it ends Django's sessions.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.db import IntegrityError, transaction
from django.http import HttpResponse
from django.utils import timezone
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from marketplace.api.models import IdempotencyKey
from marketplace.core.exceptions import Conflict, ValidationFailed

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY = 255
IN_FLIGHT_ABANDONED_SECONDS = 15 * 60


class KeyReused(ValidationFailed):
    status = 422
    code = "idempotency_key_reused"


class KeyInFlight(Conflict):
    code = "idempotency_key_in_flight"


class Sealed:
    """What the raw key opens: the row's name, the answer's cipher and the fingerprint's HMAC key."""

    def __init__(self, raw: str, user: Any) -> None:
        scope = f"user:{user.pk}" if user is not None else "anonymous"
        secret = settings.SECRET_KEY.encode()
        self.digest = hmac.new(secret, f"idempotency-key\0{scope}\0{raw}".encode(), hashlib.sha256).hexdigest()
        salt = hmac.new(secret, b"idempotency-salt", hashlib.sha256).digest()
        keys = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt,
                    info=f"idlegrid idempotency {scope}".encode()).derive(raw.encode())
        self._cipher, self._mac = AESGCM(keys[:32]), keys[32:]

    def fingerprint(self, request: Request) -> str:
        canonical = json.dumps(request.data, sort_keys=True, separators=(",", ":"), default=str)
        return hmac.new(self._mac, canonical.encode(), hashlib.sha256).hexdigest()

    def seal(self, body: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._cipher.encrypt(nonce, body, self.digest.encode())

    def open(self, stored: bytes) -> bytes:
        return self._cipher.decrypt(stored[:12], stored[12:], self.digest.encode())


def _fingerprint(request: Request, sealed: Sealed) -> str:
    return sealed.fingerprint(request)


def _owner(request: Request) -> Any:
    user = request.user
    return user if user is not None and user.is_authenticated else None


def _key_of(request: Request) -> str | None:
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not key or len(key) > MAX_KEY or not key.isprintable() or not key.isascii():
        raise ValidationFailed(f"{HEADER} must be 1 to {MAX_KEY} printable ASCII characters",
                               fields={HEADER: "invalid"})
    return key


def _claim(request: Request, sealed: Sealed) -> IdempotencyKey | HttpResponse:
    """Record the key as in flight, or answer from what it recorded already."""
    operation, fingerprint = f"{request.method} {request.path}", _fingerprint(request, sealed)
    rows = IdempotencyKey.objects.filter(key=sealed.digest)
    rows.filter(created_at__lt=timezone.now() - timedelta(hours=settings.IDLEGRID_IDEMPOTENCY_HOURS)).delete()
    abandoned = timezone.now() - timedelta(seconds=IN_FLIGHT_ABANDONED_SECONDS)
    rows.filter(state=IdempotencyKey.State.IN_FLIGHT, created_at__lt=abandoned).delete()
    try:
        with transaction.atomic():
            return IdempotencyKey.objects.create(user=_owner(request), key=sealed.digest, operation=operation,
                                                 fingerprint=fingerprint)
    except IntegrityError:
        pass
    first = rows.first()
    if first is None:  # it ended (a refusal) between our insert and this read: the caller may retry
        raise KeyInFlight(f"a request with this {HEADER} just ended; send it again")
    if (first.operation, first.fingerprint) != (operation, fingerprint):
        raise KeyReused(f"this {HEADER} was used for another request ({first.operation}, other parameters); "
                        "use a new key for a new request", fields={HEADER: "reused"})
    if first.state == IdempotencyKey.State.IN_FLIGHT:
        raise KeyInFlight(f"a request with this {HEADER} is still being processed; retry after it answered")
    try:
        body = sealed.open(bytes(first.body or b""))
    except InvalidTag:  # not sealed under this key: SECRET_KEY changed, or the row was tampered with
        raise KeyReused(f"this {HEADER} cannot be replayed; use a new key", fields={HEADER: "reused"}) from None
    replay = HttpResponse(body, status=first.status_code, content_type=first.content_type)
    replay[REPLAYED_HEADER] = "true"
    return replay


def idempotent(view: Callable[..., Response]) -> Callable[..., Any]:
    """Decorate an APIView's `post`: with an `Idempotency-Key` it runs once per key (module docstring)."""

    @functools.wraps(view)
    def post(self: Any, request: Request, *args: Any, **kwargs: Any) -> Any:
        key = _key_of(request)
        if key is None:
            return view(self, request, *args, **kwargs)
        sealed = Sealed(key, _owner(request))
        claimed = _claim(request, sealed)
        if isinstance(claimed, HttpResponse):
            return claimed
        try:
            response = view(self, request, *args, **kwargs)
        except BaseException:
            claimed.delete()  # a refusal changed nothing: the same key may carry the fixed request
            raise
        body = JSONRenderer().render(response.data)
        IdempotencyKey.objects.filter(pk=claimed.pk).update(
            state=IdempotencyKey.State.DONE, status_code=response.status_code, body=sealed.seal(body),
            content_type="application/json")
        replayable = HttpResponse(body, status=response.status_code, content_type="application/json")
        for name, value in response.items():
            if name.lower() != "content-type":
                replayable[name] = value
        return replayable

    post.idempotent = True  # type: ignore[attr-defined]  # read by the schema hook (api/schema.py)
    return post


def is_idempotent(method: Any) -> bool:
    """Whether a view method is decorated with `@idempotent` (through extend_schema's wrapper too)."""
    return bool(getattr(method, "idempotent", False))


def idempotency_keys_purge(*, now: Any = None) -> int:
    """Forget keys older than IDLEGRID_IDEMPOTENCY_HOURS (beat runs it hourly). Returns how many."""
    since = (now or timezone.now()) - timedelta(hours=settings.IDLEGRID_IDEMPOTENCY_HOURS)
    deleted, _ = IdempotencyKey.objects.filter(created_at__lt=since).delete()
    return deleted
