"""The API tokens page: create (named, shown once), see last use, revoke."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path


@login_required
def tokens(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/placeholder.html", {"title": "API tokens"})


urlpatterns = [
    path("tokens/", tokens, name="tokens"),
]
