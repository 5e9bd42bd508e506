from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from knox.auth import TokenAuthentication
from rest_framework import authentication, exceptions, permissions

from marketplace.accounts.services import api_token_used
from marketplace.workers.models import Device
from marketplace.workers.services import device_authenticate
from worker_agent.protocol import DEVICE_AUTH_SCHEME


class DeviceAuthentication(authentication.BaseAuthentication):
    """`Authorization: Device <device_id>:<secret>`; request.user is the owner, request.auth the Device."""

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].decode(errors="replace") != DEVICE_AUTH_SCHEME:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("use: Authorization: Device <device_id>:<secret>")
        device_id, _, secret = header[1].decode(errors="replace").partition(":")
        device = device_authenticate(device_id=device_id, secret=secret)
        if device is None:
            raise exceptions.AuthenticationFailed("unknown device or wrong secret")
        if device.state != Device.State.ACTIVE:
            raise exceptions.AuthenticationFailed("this device is disabled")
        # A deactivated account's devices stop too: they would lease, report and earn for it otherwise (as
        # knox refuses the account's tokens). is_active came with the device, in the same query.
        if not device.owner.is_active:
            raise exceptions.AuthenticationFailed("the account that owns this device is deactivated")
        return device.owner, device

    def authenticate_header(self, request):
        return DEVICE_AUTH_SCHEME


class DeviceAuthScheme(OpenApiAuthenticationExtension):
    target_class = "marketplace.api.authentication.DeviceAuthentication"
    name = "deviceAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "header", "name": "Authorization",
                "description": "Device <device_id>:<device_secret>, from enrolment"}


class IsDevice(permissions.BasePermission):
    message = "this endpoint is for enrolled devices (Authorization: Device ...)"

    def has_permission(self, request, view):
        return isinstance(request.auth, Device)


class IsPerson(permissions.BasePermission):
    message = "this endpoint is for people (Authorization: Token ...), not devices"

    def has_permission(self, request, view):
        return bool(request.user and request.user.is_authenticated and not isinstance(request.auth, Device))


class ApiTokenAuthentication(TokenAuthentication):
    """knox's `Authorization: Token <token>`, recording the token's last use to the minute (a conditional
    UPDATE that matches nothing on most requests: marketplace/accounts/services.py api_token_used)."""

    def authenticate_credentials(self, token):
        user, auth_token = super().authenticate_credentials(token)
        api_token_used(digest=auth_token.digest)
        return user, auth_token


class ApiTokenScheme(OpenApiAuthenticationExtension):
    """The same scheme as knox's own (drf-spectacular's knox extension matches that class only)."""

    target_class = "marketplace.api.authentication.ApiTokenAuthentication"
    name = "knoxApiToken"

    def get_security_definition(self, auto_schema):
        return build_bearer_security_scheme_object(header_name="Authorization",
                                                   token_prefix=self.target.authenticate_header(""))
