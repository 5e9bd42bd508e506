from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.authentication import IsPerson
from marketplace.api.filters import JobFilter
from marketplace.api.idempotency import idempotent
from marketplace.api.schema import ErrorOut
from marketplace.api.v1.artifacts import file_response
from marketplace.core.exceptions import Conflict
from marketplace.jobs.models import Job
from marketplace.jobs.quotes import job_quote
from marketplace.jobs.selectors import (
    job_get_for_owner,
    job_progress,
    job_progress_annotated,
    job_rounds,
    jobs_for_owner,
)
from marketplace.jobs.services import job_submit


class JobOut(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.CharField()
    state = serializers.ChoiceField(choices=Job.State.choices)
    spec = serializers.JSONField()
    units_total = serializers.IntegerField()
    units_done = serializers.IntegerField()
    units_error = serializers.IntegerField()
    results_valid = serializers.IntegerField()
    results_invalid = serializers.IntegerField()
    results_per_unit = serializers.FloatField(allow_null=True, help_text="verification cost: results computed per decided unit")
    corrections = serializers.IntegerField(help_text="times a ban reopened the job to re-verify what a cheater vouched for")
    output_sha256 = serializers.CharField(allow_null=True)
    error = serializers.CharField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)


def job_out(job: Job, *, progress: dict | None = None) -> dict:
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
        }
    ).data


class QuoteOut(serializers.Serializer):
    kind = serializers.CharField()
    units = serializers.IntegerField(help_text="the units the job would be split into")
    quorum = serializers.IntegerField()
    price_per_result = serializers.CharField(help_text="base units, a decimal string")
    results_per_unit_expected = serializers.FloatField(
        help_text="results computed per decided unit, replicas and disagreements included, as this kind needed lately")
    results_per_unit_source = serializers.CharField(help_text="where that figure comes from")
    cost_expected = serializers.CharField(help_text="base units: price x units x results_per_unit_expected")
    cost_worst_case = serializers.CharField(help_text="base units: the escrow a submission takes (unused escrow returns)")
    balance_available = serializers.CharField()
    affordable = serializers.BooleanField(help_text="the balance covers the escrow")
    devices_active = serializers.IntegerField(help_text="devices seen in the last hour")
    owners_active = serializers.IntegerField(help_text="distinct owners of those devices")
    runnable = serializers.BooleanField(help_text="devices of at least `quorum` owners are active")
    not_runnable_reason = serializers.CharField(allow_null=True)
    eta_seconds_p50 = serializers.IntegerField(allow_null=True, help_text="from per-result compute times of the last day")
    eta_seconds_p90 = serializers.IntegerField(allow_null=True)
    eta_reason = serializers.CharField(allow_null=True, help_text="why there is no ETA, when there is none")
    spec = serializers.JSONField(help_text="the spec as a submission would store it, defaults filled in")


class JobCreateApi(GenericAPIView):
    """GET lists the caller's jobs (paged, filtered); POST submits one."""

    permission_classes = [IsPerson]
    throttle_scope = "job_create"
    filterset_class = JobFilter

    class JobCreateIn(serializers.Serializer):
        kind = serializers.CharField(help_text="the task kind: inference or fedavg")
        spec = serializers.JSONField(help_text="the kind's spec (docs/protocol.md)")
        dry_run = serializers.BooleanField(
            default=False, help_text="true: validate and quote (200, the same body as POST /jobs/quote/); nothing is "
                                     "created or escrowed")

    def get_queryset(self):
        return jobs_for_owner(owner=self.request.user)

    def get_throttles(self):
        # A list is a read: the job_create budget counts submissions and quotes only.
        return [] if self.request.method == "GET" else super().get_throttles()

    @extend_schema(
        operation_id="job_list", responses={200: JobOut(many=True), 400: ErrorOut, 401: ErrorOut, 404: ErrorOut},
        description="Your jobs, newest first, a page at a time (docs/api/lists.md): follow `next` until it is "
                    "null. 400 for a bad filter or limit, 404 for a cursor that was not given out.")
    def get(self, request):
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response([job_out(job, progress=job_progress_annotated(job=job)) for job in page])

    @extend_schema(
        operation_id="job_create", request=JobCreateIn,
        responses={201: JobOut, 200: QuoteOut, 400: ErrorOut, 401: ErrorOut, 402: ErrorOut, 409: ErrorOut, 422: ErrorOut, 429: ErrorOut},
        parameters=[OpenApiParameter(
            "Idempotency-Key", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
            description="Send the same key to retry safely: the job is created once and every retry gets the first "
                        "answer again (Idempotent-Replayed: true) for 24 hours; 409 idempotency_key_in_flight while "
                        "the first is running, 422 idempotency_key_reused for the same key with other parameters.")],
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

    @extend_schema(operation_id="job_quote", request=JobCreateApi.JobCreateIn,
                   responses={200: QuoteOut, 400: ErrorOut, 401: ErrorOut, 429: ErrorOut},
                   description="What a job would cost and take, and whether the network can run it now; "
                               "creates and escrows nothing (docs/protocol.md, 'Quotes').")
    def post(self, request):
        body = JobCreateApi.JobCreateIn(data=request.data)
        body.is_valid(raise_exception=True)
        quote = job_quote(owner=request.user, kind=body.validated_data["kind"], spec=body.validated_data["spec"])
        return Response(QuoteOut(quote.as_dict()).data)


class JobDetailApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(operation_id="job_retrieve", responses=JobOut)
    def get(self, request, job_id: int):
        return Response(job_out(job_get_for_owner(job_id=job_id, owner=request.user)))


class JobOutputApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(operation_id="job_output", responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request, job_id: int):
        job = job_get_for_owner(job_id=job_id, owner=request.user)
        if job.state != Job.State.COMPLETED:
            raise Conflict(f"job {job.pk} is {job.state}; its output exists once it is completed")
        return file_response(job.output, filename=f"job-{job.pk}-output.safetensors")



class RoundOut(serializers.Serializer):
    round = serializers.IntegerField()
    weights_in_sha256 = serializers.CharField(help_text="the global weights the round trained from")
    weights_sha256 = serializers.CharField(help_text="the aggregated global weights (safetensors artifact)")
    updates = serializers.IntegerField(help_text="validated updates aggregated")
    result_ids = serializers.ListField(child=serializers.IntegerField(), help_text="the canonical results aggregated")
    samples = serializers.IntegerField()
    train_loss = serializers.FloatField(help_text="samples-weighted mean of the updates' signed training loss")
    eval_loss = serializers.FloatField(help_text="on the held-out eval dataset, computed by the marketplace")
    eval_accuracy = serializers.FloatField()
    aggregated_at = serializers.DateTimeField()


class TrainingOut(serializers.Serializer):
    round = serializers.IntegerField()
    units_done = serializers.IntegerField()
    units_total = serializers.IntegerField()


class RoundsOut(serializers.Serializer):
    rounds_planned = serializers.IntegerField()
    rounds = RoundOut(many=True)
    training = TrainingOut(allow_null=True, help_text="the round being trained, if any")
    privacy = serializers.DictField(allow_null=True, help_text="central DP parameters and the epsilon they give")
    target = serializers.DictField(allow_null=True, help_text="early stop: metric and value")


class JobRoundsApi(APIView):
    """Per-round metrics of a federated (`fedavg`) job; the final weights are the job's output."""

    permission_classes = [IsPerson]

    @extend_schema(operation_id="job_rounds", responses=RoundsOut)
    def get(self, request, job_id: int):
        job = job_get_for_owner(job_id=job_id, owner=request.user)
        if job.kind != Job.Kind.FEDAVG:
            raise Conflict(f"job {job.pk} is a {job.kind} job; only fedavg jobs have rounds")
        return Response(RoundsOut(job_rounds(job=job)).data)
