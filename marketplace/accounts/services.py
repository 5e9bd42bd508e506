"""People's API tokens (django-rest-knox): only a digest of each is stored, each expires, a person holds
several and can revoke any of them. Each may carry a name, and says when it was last used (ApiTokenInfo)."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from knox.models import AuthToken, get_token_model
from knox.settings import knox_settings

from marketplace.accounts.models import ApiTokenInfo
from marketplace.core.exceptions import NotFound, ValidationFailed

# A token's last use is recorded to the minute: one conditional UPDATE a minute per token at most, never a
# write per request (api_token_used).
LAST_USE_RESOLUTION = timedelta(seconds=60)
TOKEN_NAME_MAX = 100


def api_token_name_check(name: str) -> str:
    """A token's name, stripped: at most TOKEN_NAME_MAX printable characters (empty: unnamed)."""
    name = name.strip()
    if len(name) > TOKEN_NAME_MAX or not name.isprintable():
        raise ValidationFailed("the token's name is invalid",
                               fields={"name": f"at most {TOKEN_NAME_MAX} printable characters"})
    return name


def api_token_create(*, user: AbstractBaseUser, name: str = "") -> tuple[AuthToken, str]:
    """A new token for the person: (its row, the token itself, which is shown once and stored nowhere),
    named `name` (for the person's list; may be empty).

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
        row, token = tokens.create(user=user)
        ApiTokenInfo.objects.create(token=row, name=api_token_name_check(name))
        return row, token


def api_token_used(*, digest: str, now: datetime | None = None) -> bool:
    """Record that the token was used now, unless that was recorded less than LAST_USE_RESOLUTION ago: a
    conditional UPDATE that writes nothing on most requests (and only reads an index otherwise). A token
    made before names existed gets its row here. Returns whether anything was written."""
    now = now or timezone.now()
    stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USE_RESOLUTION)
    if ApiTokenInfo.objects.filter(stale, token_id=digest).update(last_used_at=now):
        return True
    if ApiTokenInfo.objects.filter(token_id=digest).exists():
        return False
    _, created = ApiTokenInfo.objects.get_or_create(token_id=digest, defaults={"last_used_at": now})
    return created


def api_tokens_of(*, user: AbstractBaseUser) -> QuerySet[AuthToken]:
    """The person's live tokens, newest first."""
    live = Q(expiry__isnull=True) | Q(expiry__gt=timezone.now())
    return (get_token_model().objects.filter(live, user=user).select_related("info")
            .order_by("-created", "-digest"))


def api_token_info(token: AuthToken) -> ApiTokenInfo | None:
    """The token's name and last use (None for a token made before they were kept and never used since)."""
    try:
        return token.info  # type: ignore[attr-defined]
    except ApiTokenInfo.DoesNotExist:
        return None


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
