from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.authentication import IsPerson
from marketplace.api.filters import JobFilter
from marketplace.api.idempotency import idempotent
from marketplace.api.schema import ErrorOut
from marketplace.api.specs import JobSubmission, submission_examples
from marketplace.api.v1.artifacts import file_response
from marketplace.core.exceptions import Conflict
from marketplace.jobs.cancel import job_cancel
from marketplace.jobs.models import Job
from marketplace.jobs.quotes import job_quote
from marketplace.jobs.selectors import (
    job_get_for_owner,
    job_progress,
    job_progress_annotated,
    job_rounds,
    job_runnable,
    jobs_for_owner,
)
from marketplace.jobs.services import job_submit


class JobOut(serializers.Serializer):
    id = serializers.IntegerField(help_text="the job's id")
    kind = serializers.CharField(help_text="the task kind: inference or fedavg")
    state = serializers.ChoiceField(choices=Job.State.choices, help_text="pending -> running -> merging -> completed, or failed")
    spec = serializers.JSONField(help_text="the spec as stored: the kind's normalised spec, defaults filled in")
    units_total = serializers.IntegerField(help_text="units made so far")
    units_done = serializers.IntegerField(help_text="units decided by a quorum")
    units_error = serializers.IntegerField(help_text="units that reached max_results_per_unit without a quorum")
    results_valid = serializers.IntegerField(help_text="results that agreed with their unit's decision")
    results_invalid = serializers.IntegerField(help_text="results that disagreed (paid nothing)")
    units_in_progress = serializers.FloatField(
        help_text="undecided units being computed, counted by the fraction done their devices last reported "
                  "(the furthest replica of each)")
    results_per_unit = serializers.FloatField(allow_null=True, help_text="verification cost: results computed per decided unit")
    corrections = serializers.IntegerField(help_text="times a ban reopened the job to re-verify what a cheater vouched for")
    output_sha256 = serializers.CharField(allow_null=True, help_text="the merged output artifact, once completed")
    error = serializers.CharField(help_text="why the job failed; empty otherwise")
    created_at = serializers.DateTimeField(help_text="when it was submitted")
    started_at = serializers.DateTimeField(allow_null=True, help_text="when it was split into units")
    finished_at = serializers.DateTimeField(allow_null=True, help_text="when it completed or failed")
    runnable_devices = serializers.IntegerField(
        allow_null=True,
        help_text="(one job's page only) online devices whose reported capabilities fit its largest waiting unit; "
                  "null when nothing waits or in a list; 0: no online device can run it")
    not_runnable_reason = serializers.CharField(allow_null=True,
                                                help_text="what its waiting units need, when runnable_devices is 0")


def job_out(job: Job, *, progress: dict | None = None, runnable: dict | None = None) -> dict:
    return JobOut(
        {
            "id": job.pk,
            "kind": job.kind,
            "state": job.state,
            "spec": job.spec,
            "output_sha256": job.output_id,
            "error": job.error,
            "corrections": job.corrections,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            **(progress if progress is not None else job_progress(job=job)),
            **(runnable or {"runnable_devices": None, "not_runnable_reason": None}),
        }
    ).data


class QuoteOut(serializers.Serializer):
    kind = serializers.CharField(help_text="the task kind")
    units = serializers.IntegerField(help_text="the units the job would be split into")
    quorum = serializers.IntegerField(help_text="agreeing results per unit, from the spec")
    price_per_result = serializers.CharField(help_text="base units, a decimal string")
    results_per_unit_expected = serializers.FloatField(
        help_text="results computed per decided unit, replicas and disagreements included, as this kind needed lately")
    results_per_unit_source = serializers.CharField(help_text="where that figure comes from")
    cost_expected = serializers.CharField(help_text="base units: price x units x results_per_unit_expected")
    cost_worst_case = serializers.CharField(help_text="base units: the escrow a submission takes (unused escrow returns)")
    balance_available = serializers.CharField(help_text="base units: your spendable balance")
    affordable = serializers.BooleanField(help_text="the balance covers the escrow")
    devices_active = serializers.IntegerField(help_text="devices seen in the last hour")
    owners_active = serializers.IntegerField(help_text="distinct owners of those devices")
    runnable_devices = serializers.IntegerField(
        help_text="active devices whose reported capabilities (memory, device type, GPU memory, kinds) fit the job's "
                  "largest unit; 0: no device can run it (not_runnable_reason says what the units need)")
    runnable = serializers.BooleanField(help_text="devices of at least `quorum` owners that can run its units are active")
    not_runnable_reason = serializers.CharField(allow_null=True, help_text="why not, when not runnable")
    eta_seconds_p50 = serializers.IntegerField(allow_null=True, help_text="from per-result compute times of the last day")
    eta_seconds_p90 = serializers.IntegerField(allow_null=True, help_text="the 90th percentile of the same estimate")
    eta_reason = serializers.CharField(allow_null=True, help_text="why there is no ETA, when there is none")
    spec = serializers.JSONField(help_text="the spec as a submission would store it, defaults filled in")


class JobCreateApi(GenericAPIView):
    """GET lists the caller's jobs (paged, filtered); POST submits one."""

    permission_classes = [IsPerson]
    throttle_scope = "job_create"
    throttle_exempt_methods = ("GET",)  # a list is a read: the job_create budget counts submissions only
    filterset_class = JobFilter

    class JobCreateIn(serializers.Serializer):
        kind = serializers.CharField(help_text="the task kind: inference or fedavg")
        spec = serializers.JSONField(help_text="the kind's spec (docs/protocol.md)")
        dry_run = serializers.BooleanField(
            default=False, help_text="true: validate and quote (200, the same body as POST /jobs/quote/); nothing is "
                                     "created or escrowed")

    def get_queryset(self):
        return jobs_for_owner(owner=self.request.user)


    @extend_schema(
        operation_id="job_list", responses={200: JobOut(many=True), 400: ErrorOut, 401: ErrorOut, 404: ErrorOut},
        description="Your jobs, newest first, a page at a time (docs/api/lists.md): follow `next` until it is "
                    "null. 400 for a bad filter or limit, 404 for a cursor that was not given out.")
    def get(self, request):
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response([job_out(job, progress=job_progress_annotated(job=job)) for job in page])

    @extend_schema(
        operation_id="job_create", request=JobSubmission, examples=submission_examples(),
        responses={201: JobOut, 200: QuoteOut, 402: ErrorOut},  # the other errors: api/schema.py's hook
        description="Submit a job: validated whole (400 lists every problem), its escrow taken from your balance "
                    "(402 if short), split into units after commit. The spec is typed per kind (JobSubmission); "
                    "dry_run: true quotes instead (200).",
    )
    @idempotent
    def post(self, request):
        body = self.JobCreateIn(data=request.data)
        body.is_valid(raise_exception=True)
        if body.validated_data["dry_run"]:
            quote = job_quote(owner=request.user, kind=body.validated_data["kind"], spec=body.validated_data["spec"])
            return Response(QuoteOut(quote.as_dict()).data)
        job = job_submit(owner=request.user, kind=body.validated_data["kind"], spec=body.validated_data["spec"])
        return Response(job_out(job), status=status.HTTP_201_CREATED)


class JobQuoteApi(APIView):
    permission_classes = [IsPerson]
    throttle_scope = "job_create"
    throttle_exempt_methods = ("GET",)  # a list is a read: the job_create budget counts submissions only

    @extend_schema(operation_id="job_quote", request=JobSubmission, examples=submission_examples(),
                   responses={200: QuoteOut, 400: ErrorOut, 401: ErrorOut, 429: ErrorOut},
                   description="What a job would cost and take, and whether the network can run it now; "
                               "creates and escrows nothing (docs/protocol.md, 'Quotes').")
    @idempotent
    def post(self, request):
        body = JobCreateApi.JobCreateIn(data=request.data)
        body.is_valid(raise_exception=True)
        quote = job_quote(owner=request.user, kind=body.validated_data["kind"], spec=body.validated_data["spec"])
        return Response(QuoteOut(quote.as_dict()).data)


class JobDetailApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(operation_id="job_retrieve", responses=JobOut, description="One of your jobs and its progress.")
    def get(self, request, job_id: int):
        job = job_get_for_owner(job_id=job_id, owner=request.user)
        return Response(job_out(job, runnable=job_runnable(job=job)))


class JobOutputApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(operation_id="job_output_download", responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
                   description="A completed job's merged output (safetensors); 409 before it completed.")
    def get(self, request, job_id: int):
        job = job_get_for_owner(job_id=job_id, owner=request.user)
        if job.state == Job.State.CANCELLED and job.output is None:
            raise Conflict(f"job {job.pk} was cancelled before anything was decided; it has no output")
        if job.state not in (Job.State.COMPLETED, Job.State.CANCELLED):
            raise Conflict(f"job {job.pk} is {job.state}; its output exists once it is completed (or cancelled)")
        return file_response(job.output, filename=f"job-{job.pk}-output.safetensors")



class RoundOut(serializers.Serializer):
    round = serializers.IntegerField(help_text="the round's index, from 0")
    weights_in_sha256 = serializers.CharField(help_text="the global weights the round trained from")
    weights_sha256 = serializers.CharField(help_text="the aggregated global weights (safetensors artifact)")
    updates = serializers.IntegerField(help_text="validated updates aggregated")
    result_ids = serializers.ListField(child=serializers.IntegerField(), help_text="the canonical results aggregated")
    samples = serializers.IntegerField(help_text="training rows the aggregated updates covered")
    train_loss = serializers.FloatField(help_text="samples-weighted mean of the updates' signed training loss")
    eval_loss = serializers.FloatField(help_text="on the held-out eval dataset, computed by the marketplace")
    eval_accuracy = serializers.FloatField(help_text="on the held-out eval dataset, computed by the marketplace")
    aggregated_at = serializers.DateTimeField(help_text="when the round's updates were aggregated")


class TrainingOut(serializers.Serializer):
    round = serializers.IntegerField(help_text="the round being trained")
    units_done = serializers.IntegerField(help_text="its units decided")
    units_total = serializers.IntegerField(help_text="its units (one per shard)")


class RoundsOut(serializers.Serializer):
    rounds_planned = serializers.IntegerField(help_text="the spec's rounds (an early stop ends sooner)")
    rounds = RoundOut(many=True, help_text="the aggregated rounds, in order")
    training = TrainingOut(allow_null=True, help_text="the round being trained, if any")
    privacy = serializers.DictField(allow_null=True, help_text="central DP parameters and the epsilon they give")
    target = serializers.DictField(allow_null=True, help_text="early stop: metric and value")


class JobRoundsApi(APIView):
    """Per-round metrics of a federated (`fedavg`) job; the final weights are the job's output."""

    permission_classes = [IsPerson]

    @extend_schema(operation_id="job_round_list", responses=RoundsOut)
    def get(self, request, job_id: int):
        job = job_get_for_owner(job_id=job_id, owner=request.user)
        if job.kind != Job.Kind.FEDAVG:
            raise Conflict(f"job {job.pk} is a {job.kind} job; only fedavg jobs have rounds")
        return Response(RoundsOut(job_rounds(job=job)).data)


class JobCancelApi(APIView):
    """Cancel a job (docs/api/cancel.md): `cancelling` at once, `cancelled` once its reports are judged."""

    permission_classes = [IsPerson]

    @extend_schema(
        operation_id="job_cancel", request=None, responses={200: JobOut, 401: ErrorOut, 404: ErrorOut, 409: ErrorOut},
        description="Stop the job: nothing more of it is leased, leases held are revoked; results already reported "
                    "are judged and what is valid is paid; then `cancelled`, the unused escrow returned and the "
                    "partial output downloadable. Idempotent: a cancelling or cancelled job is answered as it is; "
                    "409 `conflict` for a completed or failed job.",
    )
    @idempotent
    def post(self, request, job_id: int):
        return Response(job_out(job_cancel(job_id=job_id, owner=request.user)))
