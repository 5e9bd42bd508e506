"""Every error leaves the API in one shape: {"error": {"code", "message", "fields"}}."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_handler

from marketplace.core.exceptions import ApplicationError

# DRF's own codes for these, renamed to the ones docs/protocol.md promises ("Errors").
_PROTOCOL_CODES = {"authentication_failed": "not_authenticated", "permission_denied": "forbidden", "parse_error": "invalid"}


def _body(code: str, message: str, fields: Any = None) -> dict:
    return {"error": {"code": code, "message": message, "fields": fields or {}}}


def handle(exc: Exception, context: dict) -> Response | None:
    if isinstance(exc, ApplicationError):
        return Response(_body(exc.code, exc.message, exc.fields), status=exc.status)
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
