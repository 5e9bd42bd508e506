"""The contributor's pages: devices (and why one gets no work), enrolment, earnings, the payout address."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path


@login_required
def devices(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/placeholder.html", {"title": "Devices"})


@login_required
def device_enrol(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/placeholder.html", {"title": "Enrol a device"})


@login_required
def earnings(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/placeholder.html", {"title": "Earnings"})


@login_required
def payout(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/placeholder.html", {"title": "Payout address"})


urlpatterns = [
    path("devices/", devices, name="devices"),
    path("devices/enrol/", device_enrol, name="device-enrol"),
    path("earnings/", earnings, name="earnings"),
    path("payout/", payout, name="payout"),
]
