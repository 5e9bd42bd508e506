"""The API tokens page: create (named, shown once), see last use, revoke.

The new token is kept in the session only until the page after the POST reads it (POST-redirect-GET,
popped on read), and that page is never cached: reloading it shows the list, never the token again."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path
from django.utils.cache import add_never_cache_headers, patch_cache_control
from django.views.decorators.http import require_http_methods, require_POST

from marketplace.accounts.services import api_token_create, api_token_info, api_token_revoke, api_tokens_of
from marketplace.core.exceptions import ApplicationError
from marketplace.portal.forms_contrib import TokenCreateForm, TokenRevokeForm, as_sentence, errors_from

TOKEN_SHOWN = "portal.api_token_shown"  # session key: the token made by the POST, popped by the next GET


def _rows(request: HttpRequest) -> list[dict[str, Any]]:
    rows = []
    for token in api_tokens_of(user=request.user):
        info = api_token_info(token)
        rows.append({"token_key": token.token_key, "created": token.created, "expiry": token.expiry,
                     "name": info.name if info else "", "last_used_at": info.last_used_at if info else None})
    return rows


@login_required
@require_http_methods(["GET", "POST"])
def tokens(request: HttpRequest) -> HttpResponse:
    status = 200
    if request.method == "POST":
        form = TokenCreateForm(request.POST)
        if form.is_valid():
            try:
                row, token = api_token_create(user=request.user, name=form.cleaned_data["name"])
            except ApplicationError as exc:
                errors_from(form, exc)
            else:
                request.session[TOKEN_SHOWN] = {"token": token, "name": form.cleaned_data["name"],
                                                "token_key": row.token_key}
                return redirect("portal:tokens")
        status = 400
    else:
        form = TokenCreateForm()
    shown = request.session.pop(TOKEN_SHOWN, None) if request.method == "GET" else None
    response = render(request, "portal/tokens/tokens.html", {"form": form, "rows": _rows(request), "shown": shown},
                      status=status)
    add_never_cache_headers(response)
    patch_cache_control(response, no_store=True, private=True)
    return response


@login_required
@require_POST
def token_revoke(request: HttpRequest) -> HttpResponse:
    form = TokenRevokeForm(request.POST)
    if not form.is_valid():
        messages.error(request, "No such token.")
        return redirect("portal:tokens")
    try:
        api_token_revoke(user=request.user, token_key=form.cleaned_data["token_key"])
    except ApplicationError as exc:
        messages.error(request, as_sentence(exc.message))
    else:
        messages.success(request, f"The token {form.cleaned_data['token_key']}… was revoked: it no longer works.")
    return redirect("portal:tokens")


urlpatterns = [
    path("tokens/", tokens, name="tokens"),
    path("tokens/revoke/", token_revoke, name="token-revoke"),
]
