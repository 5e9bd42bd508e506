"""The submitter's pages: dashboard, new job (quote, confirm), the live job page, funds and statement."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/placeholder.html", {"title": "Jobs"})


@login_required
def job_new(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/placeholder.html", {"title": "New job"})


@login_required
def job(request: HttpRequest, job_id: int) -> HttpResponse:
    return render(request, "portal/placeholder.html", {"title": f"Job {job_id}"})


@login_required
def funds(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/placeholder.html", {"title": "Funds"})


@login_required
def statement(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/placeholder.html", {"title": "Statement"})


urlpatterns = [
    path("jobs/", dashboard, name="dashboard"),
    path("jobs/new/", job_new, name="job-new"),
    path("jobs/<int:job_id>/", job, name="job"),
    path("funds/", funds, name="funds"),
    path("funds/statement/", statement, name="statement"),
]
