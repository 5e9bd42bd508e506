"""The landing page (anyone) and its live figures; `home` sends a signed-in person to their jobs."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path
from django.views.decorators.http import require_GET

from marketplace.jobs.network import network_figures


@require_GET
def landing(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/landing.html", {"figures": network_figures()})


@require_GET
def figures(request: HttpRequest) -> HttpResponse:
    """The figures alone, for the landing page's poll (htmx) and for anyone who reloads them."""
    return render(request, "portal/partials/figures.html", {"figures": network_figures()})


@login_required
def home(request: HttpRequest) -> HttpResponse:
    return redirect("portal:dashboard")


urlpatterns = [
    path("", landing, name="landing"),
    path("network/figures/", figures, name="figures"),
    path("home/", home, name="home"),
]
