"""People's API tokens (django-rest-knox): only a digest of each is stored, each expires, a person holds
several and can revoke any of them."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from knox.models import AuthToken, get_token_model
from knox.settings import knox_settings

from marketplace.core.exceptions import NotFound


def api_token_create(*, user: AbstractBaseUser) -> tuple[AuthToken, str]:
    """A new token for the person: (its row, the token itself, which is shown once and stored nowhere).

    Expired tokens are deleted; past REST_KNOX's TOKEN_LIMIT_PER_USER the oldest are revoked to make room.
    Knox's own login refuses instead, which locks out until expiry a person whose script logs in on every
    run; a login needs the password anyway, so revoking the oldest gives nothing away."""
    tokens = get_token_model().objects
    limit = knox_settings.TOKEN_LIMIT_PER_USER
    with transaction.atomic():
        tokens.filter(user=user, expiry__lte=timezone.now()).delete()
        if limit is not None:
            oldest = list(tokens.filter(user=user).order_by("-created", "-digest").values_list("digest", flat=True)[limit - 1:])
            tokens.filter(digest__in=oldest).delete()
        return tokens.create(user=user)


def api_tokens_of(*, user: AbstractBaseUser) -> QuerySet[AuthToken]:
    """The person's live tokens, newest first."""
    live = Q(expiry__isnull=True) | Q(expiry__gt=timezone.now())
    return get_token_model().objects.filter(live, user=user).order_by("-created", "-digest")


def api_token_revoke(*, user: AbstractBaseUser, token_key: str) -> int:
    """Revoke the person's token(s) whose key (the token's first characters) is `token_key`."""
    if not (token_key.isascii() and token_key.isalnum() and len(token_key) <= 64):
        raise NotFound("you have no token with this key")  # a NUL byte would reach PostgreSQL and fail there
    revoked, _ = get_token_model().objects.filter(user=user, token_key=token_key).delete()
    if not revoked:
        raise NotFound("you have no token with this key")
    return revoked


def api_tokens_revoke_all(*, user: AbstractBaseUser) -> int:
    revoked, _ = get_token_model().objects.filter(user=user).delete()
    return revoked
