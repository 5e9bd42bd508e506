"""The API's one JSON parser: every JSON body is read and parsed with limits (docs/protocol.md, "Errors").

A body is read from the request stream up to DATA_UPLOAD_MAX_MEMORY_SIZE bytes (one more to see an
overflow) and parsed by worker_agent.safejson: depth, item count and number length are checked before
the C decoder recurses (a 200 KB body nested 100,000 deep killed a gunicorn worker without this).
Strings holding U+0000 or an unpaired surrogate are refused as well: valid JSON, and DRF's CharField
refuses both, but a JSONField takes them. Seen here: enrolment hardware {"extra": "\\u0000"} or
"\\ud800" answered 500 on PostgreSQL (jsonb: "unsupported Unicode escape sequence", "invalid input
syntax for type json"); on SQLite "\\ud800" was stored, and the owner's device list answered 500 from
then on (the renderer cannot encode it as UTF-8). Oversized bodies answer 413 `too_large`; anything
else refused answers 400 `invalid`.

It derives from BaseParser, not DRF's JSONParser, on purpose: DRF 3.18 reads `request.body` for a
JSONParser, and Django refuses an oversized body there with RequestDataTooBig, which leaves DRF and
becomes Django's 400 page instead of this API's 413.
"""

from __future__ import annotations

import codecs

from django.conf import global_settings, settings
from rest_framework import exceptions
from rest_framework.parsers import BaseParser

from worker_agent import safejson


class BodyTooLarge(exceptions.APIException):
    status_code = 413
    default_code = "too_large"
    default_detail = "the request body is too large"


def body_limit(view: object = None) -> int:
    """DATA_UPLOAD_MAX_MEMORY_SIZE, or Django's default where it is None: a JSON body is always bounded. A view
    whose bodies are larger by design names its own bound (`max_body_bytes`: the batched report's inline
    outputs, marketplace/api/v1/agent.py ReportsApi), computed from its protocol limits, never unbounded."""
    own = getattr(view, "max_body_bytes", None)
    if isinstance(own, int) and own > 0:
        return own
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE or global_settings.DATA_UPLOAD_MAX_MEMORY_SIZE


class BoundedJSONParser(BaseParser):
    media_type = "application/json"

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        _require_utf8(parser_context.get("encoding") or settings.DEFAULT_CHARSET)
        limit = body_limit(parser_context.get("view"))
        request = parser_context.get("request")
        if request is not None and _declared_over(request.META.get("CONTENT_LENGTH") or "", limit):
            raise BodyTooLarge(f"the request body is larger than {limit} bytes")  # refused before reading it
        raw = stream.read(limit + 1)
        if len(raw) > limit:
            raise BodyTooLarge(f"the request body is larger than {limit} bytes")
        try:
            value = safejson.loads(raw, max_bytes=limit)
        except safejson.JSONRefused as exc:
            raise exceptions.ParseError(f"the request body is refused: {exc}") from None
        if problem := _unstorable(value):
            raise exceptions.ParseError(f"the request body is refused: a string holds {problem}")
        return value


def _unstorable(value: object) -> str | None:
    """What makes a string of the document unstorable, if one is. Iterative: depth is bounded already,
    and the walk is linear in the items, which are bounded too."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item)  # the keys
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and (problem := _string_problem(item)):
            return problem
    return None


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "U+0000"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "an unpaired surrogate"
    return None


def _declared_over(declared: str, limit: int) -> bool:
    """Content-Length says more than limit (compared without int() of a 5,000-digit header)."""
    digits = declared.strip().lstrip("0")
    if not (digits.isascii() and digits.isdigit()):
        return False  # absent or not a number: the bounded read decides
    return len(digits) > len(str(limit)) or int(digits) > limit


def _require_utf8(encoding: str) -> None:
    try:
        utf8 = codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        utf8 = False
    if not utf8:
        # RFC 8259 section 8.1: JSON exchanged between systems is UTF-8.
        raise exceptions.UnsupportedMediaType(
            f"application/json; charset={encoding}", detail="send JSON as UTF-8 (RFC 8259)"
        )
