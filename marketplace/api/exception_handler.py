"""Every error leaves the API in one shape: {"error": {"code", "message", "fields"}}.

`handle` maps what a DRF view raises. The `bad_request`, `permission_denied`, `not_found` and
`server_error` views are Django's handler400/403/404/500 (marketplace/urls.py): they answer what never
reached a DRF view, or left it unhandled (an unknown path, RequestDataTooBig and other
SuspiciousOperation, an uncaught exception), in the same shape under /api/ and as Django's HTML pages
elsewhere (the admin).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_handler

from marketplace.core.exceptions import ApplicationError, RateLimited

# DRF's own codes for these, renamed to the ones docs/protocol.md promises ("Errors").
_PROTOCOL_CODES = {"authentication_failed": "not_authenticated", "permission_denied": "forbidden", "parse_error": "invalid"}


def _body(code: str, message: str, fields: Any = None) -> dict:
    return {"error": {"code": code, "message": message, "fields": fields or {}}}


def handle(exc: Exception, context: dict) -> Response | None:
    if isinstance(exc, ApplicationError):
        # Every 429 says when to come back: DRF's throttles through Throttled.wait, domain limits here.
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
        return Response(_body(exc.code, exc.message, exc.fields), status=exc.status, headers=headers)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        response.data = _body("invalid", "the request is invalid", exc.detail)
    elif isinstance(exc, exceptions.APIException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = str(exc.default_code)
        response.data = _body(_PROTOCOL_CODES.get(code, code), detail)
    return response


# --- Django's error views -------------------------------------------------------------------------

API_PREFIX = "/api/"


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _is_api(request):
        return defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        # Django says 400 for a body past DATA_UPLOAD_MAX_MEMORY_SIZE; the protocol says 413.
        return JsonResponse(_body("too_large", "the request body is too large"), status=413)
    # Not the exception's text: a SuspiciousOperation's message may quote settings (ALLOWED_HOSTS advice).
    return JsonResponse(_body("invalid", "the request is invalid"), status=400)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _is_api(request):
        return defaults.permission_denied(request, exception)
    return JsonResponse(_body("forbidden", "you may not do this"), status=403)


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _is_api(request):
        return defaults.page_not_found(request, exception)
    return JsonResponse(_body("not_found", "no such endpoint or object"), status=404)


def server_error(request: HttpRequest) -> HttpResponse:
    if not _is_api(request):
        return defaults.server_error(request)
    # No traceback and no exception text: Django has logged both (django.request) for the operator.
    return JsonResponse(_body("server_error", "the server failed on this request; the error was logged"), status=500)
