"""Domain errors. Services raise these; the API maps them to HTTP in one place (api/exception_handler.py)."""

from __future__ import annotations

import math
from typing import Any


class ApplicationError(Exception):
    """A request the domain refuses. `code` is stable for clients; `message` is for people."""

    status = 400
    code = "invalid"

    def __init__(self, message: str, *, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or {}


class ValidationFailed(ApplicationError):
    pass


class NotFound(ApplicationError):
    status = 404
    code = "not_found"


class Forbidden(ApplicationError):
    status = 403
    code = "forbidden"


class Conflict(ApplicationError):
    status = 409
    code = "conflict"


class LeaseExpired(Conflict):
    code = "lease_expired"


class LeaseCancelled(Conflict):
    code = "lease_cancelled"


class AlreadyReported(Conflict):
    code = "already_reported"


class RateLimited(ApplicationError):
    """429: a domain limit (not a request rate); the answer carries Retry-After: `retry_after` seconds."""

    status = 429
    code = "throttled"

    def __init__(self, message: str, *, retry_after: float, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message, fields=fields)
        self.retry_after = max(1, math.ceil(retry_after))


class TooLarge(ApplicationError):
    status = 413
    code = "too_large"


class QuotaExceeded(TooLarge):
    code = "quota_exceeded"
