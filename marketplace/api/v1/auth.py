"""People's API tokens: log in for a token, list and revoke them, log out (docs/protocol.md, "People")."""

from __future__ import annotations

from django.contrib.auth import authenticate
from drf_spectacular.utils import OpenApiParameter, extend_schema
from knox.models import AuthToken
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.accounts.services import (
    TOKEN_NAME_MAX,
    api_token_create,
    api_token_info,
    api_token_revoke,
    api_tokens_of,
    api_tokens_revoke_all,
)
from marketplace.api.authentication import ApiTokenAuthentication, IsPerson
from marketplace.api.idempotency import idempotent
from marketplace.api.schema import ErrorOut
from marketplace.core.exceptions import ValidationFailed

LOGGED_OUT = {204: None, 401: ErrorOut}


class TokenOut(serializers.Serializer):
    token = serializers.CharField(help_text="send as `Authorization: Token <token>`; shown this once, stored hashed")
    expiry = serializers.DateTimeField(help_text="the token stops working then")
    token_key = serializers.CharField(help_text="its first characters: names it in the token list and to revoke it")


class TokenListed(serializers.Serializer):
    token_key = serializers.CharField(help_text="the token's first characters: revoke it by this")
    created = serializers.DateTimeField(help_text="when it was made (log in)")
    expiry = serializers.DateTimeField(allow_null=True, help_text="when it stops working")
    current = serializers.BooleanField(help_text="the token this request was made with")
    name = serializers.CharField(allow_blank=True, help_text="the name given when it was made (empty: none)")
    last_used_at = serializers.DateTimeField(allow_null=True, help_text="its last use, to the minute (null: never)")


class TokenCreateApi(APIView):
    # A login: the password is the credential, and every attempt counts against the client address's rate.
    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_scope = "token"

    class LoginIn(serializers.Serializer):
        username = serializers.CharField(max_length=150, help_text="the account's username")
        password = serializers.CharField(max_length=1024, trim_whitespace=False, help_text="the account's password")
        name = serializers.CharField(max_length=TOKEN_NAME_MAX, required=False, allow_blank=True, default="",
                                     help_text="a name for the token, shown in your token list (a script, a machine)")

    @extend_schema(
        operation_id="auth_token_create", request=LoginIn, auth=[],
        responses={201: TokenOut, 400: ErrorOut, 429: ErrorOut},
        description="A new API token for a username and password. It expires (IDLEGRID_TOKEN_TTL_SECONDS); past "
                    "IDLEGRID_TOKENS_PER_PERSON tokens the oldest is revoked.",
    )
    @idempotent
    def post(self, request):
        body = self.LoginIn(data=request.data)
        body.is_valid(raise_exception=True)
        # authenticate() refuses inactive accounts too (ModelBackend.user_can_authenticate).
        data = body.validated_data
        user = authenticate(request, username=data["username"], password=data["password"])
        if user is None:
            raise ValidationFailed("unable to log in with this username and password")
        row, token = api_token_create(user=user, name=data["name"])
        return Response({"token": token, "expiry": serializers.DateTimeField().to_representation(row.expiry),
                         "token_key": row.token_key}, status=status.HTTP_201_CREATED)


class TokenListApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(operation_id="auth_token_list", responses={200: TokenListed(many=True), 401: ErrorOut},
                   description="Your live tokens, newest first; never the tokens themselves.")
    def get(self, request):
        used = request.auth.digest if isinstance(request.auth, AuthToken) else None
        return Response([TokenListed(_listed(row, current=row.digest == used)).data
                         for row in api_tokens_of(user=request.user)])


def _listed(row: AuthToken, *, current: bool) -> dict:
    info = api_token_info(row)
    return {"token_key": row.token_key, "created": row.created, "expiry": row.expiry, "current": current,
            "name": info.name if info else "", "last_used_at": info.last_used_at if info else None}


class TokenRevokeApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(operation_id="auth_token_revoke",
                   parameters=[OpenApiParameter("token_key", str, OpenApiParameter.PATH)],
                   responses={204: None, 401: ErrorOut, 404: ErrorOut},
                   description="Revoke one of your tokens, by its token_key.")
    def delete(self, request, token_key: str):
        api_token_revoke(user=request.user, token_key=token_key)
        return Response(status=status.HTTP_204_NO_CONTENT)


class LogoutApi(APIView):
    authentication_classes = [ApiTokenAuthentication]  # it revokes the token it was called with
    permission_classes = [IsPerson]

    @extend_schema(operation_id="auth_logout", request=None, responses=LOGGED_OUT,
                   description="Revoke the token this request was made with.")
    @idempotent
    def post(self, request):
        request.auth.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)


class LogoutAllApi(APIView):
    authentication_classes = [ApiTokenAuthentication]
    permission_classes = [IsPerson]

    @extend_schema(operation_id="auth_logout_all", request=None, responses=LOGGED_OUT,
                   description="Revoke every token of yours, this one included.")
    @idempotent
    def post(self, request):
        api_tokens_revoke_all(user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
