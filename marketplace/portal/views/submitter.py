"""The submitter's pages: dashboard, new job (validated as you type, uploads, quote, confirm), the live
job page (its fragment polled), cancel and output download, funds and the ledger statement (and its CSV).

Views only translate: they call the same services and selectors as the API (jobs.services.job_submit,
jobs.quotes.job_quote, jobs.cancel.job_cancel, artifacts.services.artifact_store, ledger.selectors) and
the portal's read models (jobs.live, ledger.statements)."""

from __future__ import annotations

import csv
import json
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from marketplace.artifacts.services import artifact_store
from marketplace.artifacts.storage import get_storage
from marketplace.core.exceptions import ApplicationError, Conflict, NotFound
from marketplace.jobs.cancel import job_cancel
from marketplace.jobs.live import job_live, job_output_for_owner
from marketplace.jobs.quotes import job_quote
from marketplace.jobs.selectors import job_get_for_owner, job_progress_annotated, job_runnable, jobs_for_owner
from marketplace.jobs.services import job_submit
from marketplace.ledger.selectors import balances_for, entries_for
from marketplace.ledger.statements import deposits_credited, deposits_pending, statement_rows
from marketplace.ledger.wallets import wallet_active
from marketplace.portal import forms_submit
from marketplace.portal.forms_submit import JobForm
from marketplace.portal.limits import within_rate

JOBS_PER_PAGE = 20
LINES_PER_PAGE = 50
DEPOSITS_SHOWN = 50
UPLOAD_CHUNK = 1024 * 1024


def _page(request: HttpRequest, rows: Any, per_page: int):
    """One page of `rows` by ?page=N (bounded: a page past the end is the last one)."""
    return Paginator(rows, per_page).get_page(request.GET.get("page"))


# --- dashboard ------------------------------------------------------------------------------------

@login_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    page = _page(request, jobs_for_owner(owner=request.user).order_by("-pk"), JOBS_PER_PAGE)
    jobs = [{"job": job, **job_progress_annotated(job=job)} for job in page]
    for row in jobs:
        row["fraction"] = row["units_done"] / row["units_total"] if row["units_total"] else 0
    return render(request, "portal/submitter/dashboard.html",
                  {"balances": balances_for(user=request.user), "page": page, "jobs": jobs})


# --- new job: form, validation as you type, uploads, quote, confirm -------------------------------

@login_required
@require_http_methods(["GET", "POST"])
def job_new(request: HttpRequest) -> HttpResponse:
    """GET: the form (again with a quote's values, ?quote=TOKEN). POST: store the files it carries,
    validate and quote; a valid job shows the quote and its confirm step, an invalid one the form with
    each error next to its field. Nothing is created or escrowed here."""
    if request.method == "GET":
        recalled = forms_submit.quote_recall(request.session, request.GET.get("quote", ""))
        return _new_job_page(request, JobForm(initial=recalled["values"]) if recalled else JobForm())
    form = JobForm(request.POST, request.FILES)
    if not within_rate("job_create", user_id=request.user.pk):
        form.add_error(None, "Too many quotes and submissions in a short time: wait a minute and try again.")
        return _new_job_page(request, form, status=429)
    valid = form.is_valid()
    if valid:
        forms_submit.uploads_store(form, request.FILES, user=request.user)
    form.artifacts_missing(stored=valid)
    if form.errors:
        return _new_job_page(request, form, status=400)
    kind, spec = form.submission()
    try:
        quote = job_quote(owner=request.user, kind=kind, spec=spec)
    except ApplicationError as exc:
        form.spec_errors_show(exc)
        return _new_job_page(request, form, status=400)
    token = forms_submit.quote_remember(request.session, kind=kind, spec=spec, values=forms_submit.field_values(form))
    return render(request, "portal/submitter/quote.html", {"quote": quote, "token": token, "kind": kind,
                                                            "shortfall": _shortfall(quote)})


def _new_job_page(request: HttpRequest, form: JobForm, *, status: int = 200) -> HttpResponse:
    form.validate_as_you_type(reverse("portal:job-validate"))
    return render(request, "portal/submitter/job_new.html",
                  {"form": form, "examples": json.dumps(forms_submit.EXAMPLE_CONFIGS)}, status=status)


def _shortfall(quote: Any) -> int:
    return max(0, int(quote.cost_worst_case) - int(quote.balance_available))


@login_required
@require_POST
def job_validate(request: HttpRequest) -> HttpResponse:
    """htmx, as the person types: the one field named by `_field`, checked with everything else the form
    holds (files by the sha256 already uploaded), answered as that field's status line."""
    name = request.POST.get("_field", "")
    form = JobForm(request.POST)
    if name not in form.fields:
        return HttpResponse(status=400)
    if not within_rate("job_create", user_id=request.user.pk, counter="validate"):
        return render(request, "portal/submitter/partials/field_status.html",
                      {"name": name, "problem": "Checked too often: the whole form is checked when you ask for the quote.",
                       "empty": False}, status=429)
    form.full_clean()
    if name not in form.errors:
        kind, spec = form.submission()
        try:
            job_quote(owner=request.user, kind=kind, spec=spec)
        except ApplicationError as exc:
            form.spec_errors_show(exc)
    problem = form.errors[name][0] if name in form.errors else None
    given = request.POST.get(forms_submit.SHA_OF.get(name, name)) or ""  # a file: the sha256 of its upload
    return render(request, "portal/submitter/partials/field_status.html",
                  {"name": name, "problem": problem, "empty": not given.strip()})


@login_required
@require_POST
def job_upload(request: HttpRequest) -> JsonResponse:
    """A file of the new-job form, sent alone by submit.js (the raw bytes, so the browser shows the
    upload's progress): streamed into artifact storage within the person's quota. {sha256, size}, or
    {error} with the status the API would answer."""
    if request.content_type != "application/octet-stream":
        return JsonResponse({"error": "send the file's bytes as application/octet-stream"}, status=415)
    if not within_rate("upload", user_id=request.user.pk):
        return JsonResponse({"error": "too many uploads in a short time: wait a minute and try again"}, status=429)

    def chunks():
        while chunk := request.read(UPLOAD_CHUNK):
            yield chunk

    try:
        artifact, created = artifact_store(chunks=chunks(), uploaded_by=request.user, quota_of=request.user)
    except ApplicationError as exc:
        return JsonResponse({"error": exc.message}, status=exc.status)
    return JsonResponse({"sha256": artifact.sha256, "size": artifact.size}, status=201 if created else 200)


@login_required
@require_POST
def job_confirm(request: HttpRequest) -> HttpResponse:
    """Submit what the quote showed (kept in the session under its one-time token). A second POST of the
    same confirm (a double click, a reload) creates nothing: it is sent to the job the first one made."""
    token = request.POST.get("token", "")
    if not within_rate("job_create", user_id=request.user.pk):
        messages.error(request, "Too many quotes and submissions in a short time: wait a minute and confirm again.")
        return redirect(f"{reverse('portal:job-new')}?quote={token}")
    claimed, job_id = forms_submit.confirm_claim(user=request.user, token=token)
    if not claimed:
        messages.info(request, "This job was already submitted." if job_id else "This job is being submitted.")
        return redirect("portal:job", job_id=job_id) if job_id else redirect("portal:dashboard")
    quote = forms_submit.quote_recall(request.session, token)
    if quote is None:
        forms_submit.confirm_done(user=request.user, token=token, job_id=None)
        messages.error(request, "That quote is no longer here (it was used, or is too old): quote the job again.")
        return redirect("portal:job-new")
    try:
        job = job_submit(owner=request.user, kind=quote["kind"], spec=quote["spec"])
    except ApplicationError as exc:
        forms_submit.confirm_done(user=request.user, token=token, job_id=None)
        messages.error(request, exc.message)
        return redirect(f"{reverse('portal:job-new')}?quote={token}")
    forms_submit.confirm_done(user=request.user, token=token, job_id=job.pk)
    forms_submit.quote_forget(request.session, token)
    messages.success(request, f"Job {job.pk} submitted: its escrow is reserved and it is being split into units.")
    return redirect("portal:job", job_id=job.pk)


# --- a job ------------------------------------------------------------------------------------------

def _job_or_404(request: HttpRequest, job_id: int):
    try:
        return job_get_for_owner(job_id=job_id, owner=request.user)
    except NotFound:
        raise Http404(f"no job {job_id}") from None


@login_required
@require_GET
def job(request: HttpRequest, job_id: int) -> HttpResponse:
    return render(request, "portal/submitter/job.html", _job_context(_job_or_404(request, job_id)))


@login_required
@require_GET
def job_live_fragment(request: HttpRequest, job_id: int) -> HttpResponse:
    """The job page's live part, polled by htmx until the job is final (the fragment then stops asking)."""
    return render(request, "portal/submitter/partials/job_live.html", _job_context(_job_or_404(request, job_id)))


def _job_context(found: Any) -> dict[str, Any]:
    """The charts' data as JSON text for a hidden element, not a json_script <script>: htmx (allowScriptTags
    false) drops <script> elements from the fragments it swaps in, and the charts lost their data."""
    live = job_live(job=found)
    charts = {"progress": json.dumps(live["series"]),
              "rounds": json.dumps(live["rounds"]["series"]) if live["rounds"] else None}
    # Whether any online device can run what waits (two aggregate queries; None unless running).
    return {"live": live, "job": found, "charts": charts, "runnable": job_runnable(job=found)}


@login_required
@require_POST
def job_cancel_view(request: HttpRequest, job_id: int) -> HttpResponse:
    """Cancel once confirmed: the page's script asks first (and says so in `confirmed`); without
    JavaScript the first POST answers a confirmation page whose form confirms."""
    job = _job_or_404(request, job_id)
    if request.POST.get("confirmed") != "yes":
        return render(request, "portal/submitter/cancel_confirm.html", {"job": job})
    try:
        cancelled = job_cancel(job_id=job_id, owner=request.user)
    except Conflict as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Job {cancelled.pk} is {cancelled.state}: nothing more of it is leased; what was "
                                  "already reported is judged and paid, the rest of the escrow comes back.")
    return redirect("portal:job", job_id=job_id)


@login_required
@require_GET
def job_output(request: HttpRequest, job_id: int) -> HttpResponse:
    """The job's output (or a cancelled job's partial output), streamed from storage; the owner's only."""
    _job_or_404(request, job_id)
    try:
        found, artifact = job_output_for_owner(job_id=job_id, owner=request.user)
    except Conflict as exc:
        messages.error(request, exc.message)
        return redirect("portal:job", job_id=job_id)
    partial = "-partial" if found.state == found.State.CANCELLED else ""
    response = FileResponse(get_storage().open(artifact.sha256), content_type="application/octet-stream",
                            as_attachment=True, filename=f"job-{found.pk}-output{partial}.safetensors")
    if not response.has_header("Content-Length"):
        response["Content-Length"] = str(artifact.size)
    response["X-Content-SHA256"] = artifact.sha256
    return response


# --- funds ------------------------------------------------------------------------------------------

@login_required
@require_GET
def funds(request: HttpRequest) -> HttpResponse:
    need = request.GET.get("need", "")
    need_base = int(need) if need.isascii() and need.isdigit() and len(need) <= 60 else None
    context = {
        "balances": balances_for(user=request.user),
        "contract": settings.IDLEGRID_CHAIN_CONTRACT,
        "confirmations": settings.IDLEGRID_CHAIN_CONFIRMATIONS,
        "wallet": wallet_active(user=request.user),
        "need": need_base,
        "need_tokens": None if need_base is None else _tokens_plain(need_base),
        "credited": list(deposits_credited(user=request.user)[:DEPOSITS_SHOWN]),
        "pending": deposits_pending(user=request.user) if settings.IDLEGRID_CHAIN_CONTRACT else None,
    }
    return render(request, "portal/submitter/funds.html", context)


def _tokens_plain(base_units: int) -> str:
    """An amount to type into a wallet: the exact token figure, no separators."""
    text = format(Decimal(base_units).scaleb(-settings.IDLEGRID_TOKEN_DECIMALS), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


@login_required
@require_GET
def statement(request: HttpRequest) -> HttpResponse:
    page = _page(request, entries_for(user=request.user), LINES_PER_PAGE)
    return render(request, "portal/submitter/statement.html", {"page": page, "balances": balances_for(user=request.user)})


class _Echo:
    def write(self, value: str) -> str:
        return value


@login_required
@require_GET
def statement_csv(request: HttpRequest) -> StreamingHttpResponse:
    """Every ledger line of the person, streamed as CSV (amounts in base units: exact)."""
    writer = csv.writer(_Echo())
    response = StreamingHttpResponse((writer.writerow(row) for row in statement_rows(user=request.user)),
                                     content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="idlegrid-statement.csv"'
    return response


urlpatterns = [
    path("jobs/", dashboard, name="dashboard"),
    path("jobs/new/", job_new, name="job-new"),
    path("jobs/new/validate/", job_validate, name="job-validate"),
    path("jobs/new/upload/", job_upload, name="job-upload"),
    path("jobs/new/confirm/", job_confirm, name="job-confirm"),
    path("jobs/<int:job_id>/", job, name="job"),
    path("jobs/<int:job_id>/live/", job_live_fragment, name="job-live"),
    path("jobs/<int:job_id>/cancel/", job_cancel_view, name="job-cancel"),
    path("jobs/<int:job_id>/output/", job_output, name="job-output"),
    path("funds/", funds, name="funds"),
    path("funds/statement/", statement, name="statement"),
    path("funds/statement.csv", statement_csv, name="statement-csv"),
]
