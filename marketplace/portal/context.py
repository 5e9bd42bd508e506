"""What every portal page shows: the token's symbol, how often live views poll, where the viewer is."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest


def portal(request: HttpRequest) -> dict:
    return {
        "token_symbol": settings.IDLEGRID_TOKEN_SYMBOL,
        "poll_seconds": settings.IDLEGRID_PORTAL_POLL_SECONDS,
    }
