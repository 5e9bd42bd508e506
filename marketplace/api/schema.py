"""Schema pieces shared by the API modules, and the postprocessing hook that documents, in one place, what
every operation can answer besides its own bodies.

`postprocess` (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]) reads each operation's view and adds:

- the error answers the view's machinery can produce, in the one error shape (ErrorOut): 400/413/415 where
  there is a body or a query, 401 where authentication is needed, 403 where only people or only devices
  may call, 404 on path parameters, 409/422 where Idempotency-Key is honoured, 429 where a throttle or a
  domain limit applies (with Retry-After), each described with the codes it carries;
- the `Idempotency-Key` header parameter on operations decorated with `@idempotent`, and
  `Idempotent-Replayed` on their answers;
- the RateLimit-* headers on every answer of a throttled operation.

A view still declares what is its own (its 2xx bodies, a 402 or 409 its service raises); the hook never
replaces what a view declared, it only fills in the description and headers.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from rest_framework import serializers
from rest_framework.permissions import AllowAny

from marketplace.api.authentication import IsDevice, IsPerson
from marketplace.api.idempotency import HEADER as IDEMPOTENCY_HEADER
from marketplace.api.idempotency import REPLAYED_HEADER, is_idempotent
from marketplace.api.specs import CLOSED_COMPONENTS
from marketplace.api.throttling import LIMIT_HEADER, POLICY_HEADER, REMAINING_HEADER, RESET_HEADER, ScopedThrottle

# Every `code` an error can carry, by the status it comes with (core/exceptions.py and its subclasses,
# DRF's exceptions as api/exception_handler.py renames them, Django's error views there).
ERROR_CODES: dict[int, tuple[str, ...]] = {
    400: ("invalid", "wallet_link_refused", "webhook_target_refused"),
    401: ("not_authenticated",),
    402: ("insufficient_balance",),
    403: ("forbidden",),
    404: ("not_found", "no_proof"),
    405: ("method_not_allowed",),
    406: ("not_acceptable",),
    409: ("conflict", "lease_expired", "lease_cancelled", "already_reported", "artifact_in_use", "hardware_changed", "idempotency_key_in_flight",
          "epoch_out_of_order", "epoch_underfunded"),
    413: ("too_large", "quota_exceeded"),
    415: ("unsupported_media_type",),
    422: ("idempotency_key_reused",),
    429: ("throttled",),
    500: ("server_error",),
}
ALL_CODES = [code for codes in ERROR_CODES.values() for code in codes]


class ErrorBody(serializers.Serializer):
    code = serializers.ChoiceField(
        choices=ALL_CODES, help_text="stable, for programs (docs/api/errors.md has the table); a new code may be "
                                     "added in a minor version, so treat an unknown one by its HTTP status")
    message = serializers.CharField(help_text="for people; may change wording at any time")
    fields = serializers.DictField(help_text="request field -> its problem (dotted for nested fields: "
                                             "model.weights); empty when the error is not about one field")


class ErrorOut(serializers.Serializer):
    """Every error's shape (marketplace/api/exception_handler.py); a 429 also carries Retry-After (seconds)."""

    error = ErrorBody(help_text="what went wrong")


WHY: dict[int, str] = {
    400: "invalid: the body, a query parameter or a header is invalid; `fields` says which and why "
         "(wallet_link_refused on a wallet link the signature does not prove; webhook_target_refused on a webhook "
         "URL that is not a public http(s) address)",
    401: "not_authenticated: no credentials, or wrong, expired or revoked ones",
    402: "insufficient_balance: your available balance does not cover the job's escrow; nothing was created",
    403: "forbidden: these credentials may not call this (a device on a people's endpoint, or the reverse)",
    404: "not_found: no such object, or not yours",
    409: "a conflict with the object's state (conflict, lease_expired, lease_cancelled, already_reported, "
         "hardware_changed, artifact_in_use) or "
         "idempotency_key_in_flight: a request with this Idempotency-Key is still running; retry later",
    413: "too_large: the body is past the size limit; quota_exceeded: the upload would take your artifacts past "
         "your storage quota (nothing was stored)",
    415: "unsupported_media_type: send the Content-Type this operation takes",
    422: "idempotency_key_reused: this Idempotency-Key was used with other parameters or another operation",
    429: "throttled: too many requests (or a domain limit, such as enrolment tokens per hour); wait Retry-After "
         "seconds",
    500: "server_error: the server failed; the error was logged (no details are sent)",
}
# What an operation's service raises beyond what its view's machinery shows (read from the services' raises):
# kept here, beside the rules, so that a view module needs no edit for them.
RAISES: dict[str, set[int]] = {
    "agent_enroll": {403},  # an unknown, expired or used enrolment token
    "agent_lease": {409, 429},  # hardware_changed; IDLEGRID_HARDWARE_CHANGES_PER_DAY (RateLimited)
    "agent_report": {409},  # lease_expired, already_reported
    "agent_fail": {409},
    "agent_release": {409},
    "artifact_upload": {400},  # X-Content-SHA256 is not the body's
    "enrollment_token_create": {429},  # IDLEGRID_ENROLLMENTS_PER_HOUR (RateLimited)
    "job_output_download": {409},  # not completed yet (or cancelled without an output)
    "job_cancel": {409},  # the job completed or failed
    "job_round_list": {409},  # not a fedavg job
    "wallet_link": {409},  # a concurrent change
}
HEADERS: dict[str, dict[str, Any]] = {
    "Retry-After": {"schema": {"type": "integer", "minimum": 1},
                    "description": "seconds to wait before the request can succeed"},
    LIMIT_HEADER: {"schema": {"type": "integer"}, "description": "requests the rate allows per window"},
    REMAINING_HEADER: {"schema": {"type": "integer"},
                       "description": "requests left now (a sliding-window estimate)"},
    RESET_HEADER: {"schema": {"type": "integer"},
                   "description": "seconds until more requests are left: the end of the current window, or "
                                  "when none is left, until one more fits (Retry-After on a 429)"},
    POLICY_HEADER: {"schema": {"type": "string"}, "description": "the rate: `<limit>;w=<window seconds>`"},
    REPLAYED_HEADER: {"schema": {"type": "string", "enum": ["true"]},
                      "description": "present when this is the recorded first answer to the Idempotency-Key"},
}
RATE_HEADERS = (LIMIT_HEADER, REMAINING_HEADER, RESET_HEADER, POLICY_HEADER)
IDEMPOTENCY_PARAMETER = {
    "in": "header", "name": IDEMPOTENCY_HEADER, "required": False, "schema": {"type": "string", "maxLength": 255},
    "description": "1 to 255 printable ASCII characters (a UUID is a good one). The request runs once: a retry "
                   "with the same key gets the first answer again, byte for byte (Idempotent-Replayed: true), "
                   "for IDLEGRID_IDEMPOTENCY_HOURS; 409 idempotency_key_in_flight while the first is running; 422 "
                   "idempotency_key_reused for the same key with other parameters. A refusal is not remembered. "
                   "docs/api/errors.md.",
}


# POSTs that take the header without recording it: the operation is idempotent by itself.
KEY_NOT_NEEDED = {
    "artifact_upload": "Accepted and not needed: an artifact is named by its sha256, so sending the same bytes again "
                       "stores nothing new and answers 200 with the same body.",
}


def _header_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


def _views(generator) -> dict[tuple[str, str], Any]:
    return {(path, method.lower()): callback.cls for path, _, method, callback in generator.endpoints}


def _is_throttled(view: Any, method: str) -> bool:
    return (bool(getattr(view, "throttle_scope", None))
            and method.upper() not in getattr(view, "throttle_exempt_methods", ())
            and any(issubclass(throttle, ScopedThrottle) for throttle in view.throttle_classes))


def _statuses(operation: dict[str, Any], view: Any, method: str, path: str) -> set[int]:
    """The error statuses the view's machinery can answer for this operation."""
    found: set[int] = set()
    has_query = any(p.get("in") == "query" for p in operation.get("parameters", []))
    idempotent = is_idempotent(getattr(view, method, None))
    if "requestBody" in operation or idempotent:  # an idempotent view reads the body for its fingerprint
        found |= {400, 413, 415}
    if has_query:
        found.add(400)
    if any(p.get("in") == "query" and p.get("name") == "cursor" for p in operation.get("parameters", [])):
        found.add(404)  # a cursor that was not given out: "Invalid cursor" (api/pagination.py)
    permissions = view.permission_classes
    if not all(issubclass(p, AllowAny) for p in permissions):
        found.add(401)
    if any(issubclass(p, (IsPerson, IsDevice)) for p in permissions):
        found.add(403)
    if "{" in path:
        found.add(404)
    if idempotent:
        found |= {409, 422}
    if _is_throttled(view, method):
        found.add(429)
    return found | RAISES.get(operation.get("operationId", ""), set())


def _error_response(status: int, existing: dict[str, Any] | None) -> dict[str, Any]:
    # Every error leaves in the one shape, whatever the view declared for it.
    response = {**(existing or {}), "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
    response["description"] = WHY.get(status, response.get("description") or "an error")
    return response


def _document_errors(responses: dict[str, Any], statuses: set[int]) -> None:
    for status in statuses:
        responses.setdefault(str(status), {})
    for code in [code for code in responses if int(code) >= 400]:
        responses[code] = _error_response(int(code), responses[code])
    if "429" in responses:
        responses["429"].setdefault("headers", {})["Retry-After"] = _header_ref("Retry-After")
    for code, response in responses.items():
        if not response.get("description"):
            response["description"] = HTTPStatus(int(code)).phrase


def _add_headers(responses: dict[str, Any], names: tuple[str, ...], *, only_success: bool = False) -> None:
    for code, response in responses.items():
        if not only_success or code.startswith("2"):
            response.setdefault("headers", {}).update({name: _header_ref(name) for name in names})


def _document_idempotency(operation: dict[str, Any]) -> None:
    parameters = operation.setdefault("parameters", [])
    parameters[:] = [p for p in parameters if p.get("name") != IDEMPOTENCY_HEADER]
    parameters.append({"$ref": "#/components/parameters/IdempotencyKey"})
    _add_headers(operation["responses"], (REPLAYED_HEADER,), only_success=True)


def _document(operation: dict[str, Any], view: Any, method: str, path: str) -> None:
    responses = operation.setdefault("responses", {})
    _document_errors(responses, _statuses(operation, view, method, path))
    operation["responses"] = dict(sorted(responses.items()))
    if _is_throttled(view, method):
        _add_headers(operation["responses"], RATE_HEADERS)
    if is_idempotent(getattr(view, method, None)):
        _document_idempotency(operation)
    elif operation.get("operationId") in KEY_NOT_NEEDED:
        operation.setdefault("parameters", []).append(
            {**IDEMPOTENCY_PARAMETER, "description": KEY_NOT_NEEDED[operation["operationId"]]})


def postprocess(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular postprocessing hook (module docstring)."""
    views = _views(generator)
    for path, item in result.get("paths", {}).items():
        for method, operation in item.items():
            view = views.get((path, method))
            if view is not None:
                _document(operation, view, method, path)
    components = result.setdefault("components", {})
    components.setdefault("headers", {}).update(HEADERS)
    components.setdefault("parameters", {})["IdempotencyKey"] = IDEMPOTENCY_PARAMETER
    for name in CLOSED_COMPONENTS:
        if name in components.get("schemas", {}):
            components["schemas"][name]["additionalProperties"] = False
    return result
