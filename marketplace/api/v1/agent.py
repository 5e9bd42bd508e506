"""The agent's endpoints: enrol, marketplace keys, lease, heartbeat, report, fail, earnings. Thin: each calls one service.

The wire schema is worker_agent/wire.py's, shared with the agent: answers are built with its records.
The serializers here document the endpoints (drf-spectacular) and validate what agents send; that their
fields are the records' fields is a test (tests/marketplace/test_wire_schema.py).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.authentication import DeviceAuthentication, IsDevice
from marketplace.api.idempotency import idempotent
from marketplace.api.schema import ErrorBody
from marketplace.core.exceptions import ApplicationError, ValidationFailed
from marketplace.core.signing import keyring
from marketplace.ledger.earnings_report import device_earnings
from marketplace.workers.services import device_enroll, device_hardware_update
from marketplace.workunits.leasing import Lease, cooldown_remaining, lease_renew, workunit_lease
from marketplace.workunits.report_batch import ReportItem, results_report_batch
from marketplace.workunits.results import result_fail, result_release, result_report
from worker_agent import wire
from worker_agent.protocol import MAX_INLINE_OUTPUT_BYTES, MAX_LEASE_BATCH, MAX_LEASE_WAIT_SECONDS, MAX_REPORT_BATCH


class AgentApi(APIView):
    authentication_classes = [DeviceAuthentication]
    permission_classes = [IsDevice]


class MarketplaceKeyOut(serializers.Serializer):
    key_id = serializers.CharField(help_text="names the key in units' key_id")
    public_key = serializers.CharField(help_text="raw 32-byte Ed25519 public key, base64")
    endorsed_by = serializers.CharField(allow_null=True, help_text="the key whose signature vouches for this one")
    endorsement = serializers.CharField(
        allow_null=True, help_text="base64 signature by endorsed_by of key_endorsement_message(key_id, public_key)"
    )
    retired = serializers.BooleanField(help_text="signs nothing any more; agents stop trusting it")


ENROLLED_OUT = inline_serializer("Enrolled", {
    "device_id": serializers.IntegerField(help_text="the new device's id"),
    "device_secret": serializers.CharField(help_text="send as `Authorization: Device <device_id>:<device_secret>`; "
                                                     "shown this once, stored hashed"),
    "lease_seconds": serializers.IntegerField(help_text="how long a lease lasts without a heartbeat"),
    "marketplace_keys": MarketplaceKeyOut(many=True, help_text="the keys that sign units: pin them")})


class EnrollApi(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_scope = "enroll"  # per client address, as every anonymous request (marketplace/api/throttling.py)

    class EnrollIn(serializers.Serializer):
        token = serializers.CharField(max_length=200, help_text="a one-time enrolment token (POST /enrollment-tokens/)")
        name = serializers.CharField(max_length=100, help_text="a name for the device, for its owner")
        public_key = serializers.CharField(max_length=100, help_text="the device's raw 32-byte Ed25519 public key, base64")
        hardware = serializers.JSONField(help_text="the device's hardware facts (docs/protocol.md, 'Hardware facts')")
        proof = serializers.CharField(max_length=200, help_text="base64 Ed25519 signature of "
                                                                "enroll_message(token, public_key) by that key")

    @extend_schema(operation_id="agent_enroll", request=EnrollIn, responses={201: ENROLLED_OUT},
                   description="Enrol a device with a one-time token, proving its key; anonymous, per address.")
    @idempotent  # a lost answer would lose the device secret, and the token is spent: a retry replays it
    def post(self, request):
        body = self.EnrollIn(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        # Read before the token is spent: a keyring that cannot be read must not cost a token.
        marketplace_keys = [key.wire() for key in keyring().published()]
        device, secret = device_enroll(
            token=data["token"], name=data["name"], public_key_b64=data["public_key"],
            hardware=data["hardware"], proof_b64=data["proof"],
        )
        answer = wire.Enrolled(
            device_id=device.pk,
            device_secret=secret,
            lease_seconds=settings.IDLEGRID_LEASE_SECONDS,
            # Pinned by the agent: from now on it runs only units these keys (or keys they endorse) signed.
            marketplace_keys=tuple(marketplace_keys),
        )
        return Response(answer.to_wire(), status=status.HTTP_201_CREATED)


class KeysApi(AgentApi):
    @extend_schema(
        operation_id="agent_key_list",
        responses=inline_serializer("MarketplaceKeys", {"marketplace_keys": MarketplaceKeyOut(
            many=True, help_text="every marketplace key, retired ones too")}),
        description="The marketplace's unit-signing keys and their endorsements (key rotation).",
    )
    def get(self, request):
        # Retired keys too: a retired key may be a link in the endorsement chain back to a key an agent
        # pinned, and its retirement is news the agent must hear.
        return Response({"marketplace_keys": [key.wire() for key in keyring().keys]})


class LeaseOut(serializers.Serializer):
    # No job id: a known-answer or audit unit must look like any other on the wire.
    result_id = serializers.IntegerField(help_text="names the lease in heartbeat, report, fail and release")
    unit_id = serializers.IntegerField(help_text="the unit computed (signed with the payload)")
    expires_at = serializers.DateTimeField(help_text="the lease ends then unless a heartbeat renews it")
    payload = serializers.JSONField(help_text="the kind's unit payload (worker_agent/wire.py)")
    signature = serializers.CharField(
        allow_null=True, help_text="base64 Ed25519 signature of unit_message(unit_id, payload) by the key key_id"
    )
    key_id = serializers.CharField(allow_blank=True, help_text="empty for a unit never signed")


LEASES_OUT = inline_serializer("Leases", {
    "leases": LeaseOut(many=True, help_text="0 to max_units leases"),
    "retry_after": serializers.IntegerField(help_text="seconds to wait before asking again when nothing was leased")})
RENEWED_OUT = inline_serializer("Renewed", {
    "renewed": serializers.ListField(child=serializers.IntegerField(), help_text="leases renewed"),
    "lost": serializers.ListField(child=serializers.IntegerField(), help_text="leases no longer this device's: stop"),
    "expires_at": serializers.DateTimeField(help_text="the renewed leases end then")})


def _timestamp(value: datetime) -> str:
    return serializers.DateTimeField().to_representation(value)


def _lease_wire(lease: Lease) -> dict[str, Any]:
    return wire.Lease(
        result_id=lease.result_id, unit_id=lease.unit_id, expires_at=_timestamp(lease.expires_at),
        payload=lease.payload, signature=lease.signature, key_id=lease.key_id,
    ).to_wire()


class CapabilitiesIn(serializers.Serializer):
    """What the device can run now: read by worker_agent/wire.py Capabilities itself (to_internal_value), so
    the marketplace refuses exactly what the agent's own record refuses; these fields document it."""

    memory_mb = serializers.IntegerField(min_value=0, max_value=wire.MAX_MEMORY_MB,
                                         help_text="memory free for a unit now, MB, within the contributor's cap")
    cores = serializers.IntegerField(min_value=1, max_value=wire.MAX_CORES, help_text="cores the unit may use")
    device_type = serializers.ChoiceField(choices=list(wire.DEVICE_TYPES), default="cpu",
                                          help_text="cuda: the compute child uses a CUDA GPU")
    gpu_name = serializers.CharField(min_length=1, max_length=wire.MAX_NAME, required=False,
                                     help_text="the GPU's model (cuda only)")
    gpu_memory_mb = serializers.IntegerField(min_value=0, max_value=wire.MAX_MEMORY_MB, default=0,
                                             help_text="the GPU's memory, MB: more than 0 exactly with cuda")
    torch_version = serializers.CharField(min_length=1, max_length=64, required=False,
                                          help_text="the torch the child imported")
    kinds = serializers.ListField(child=serializers.CharField(min_length=1, max_length=wire.MAX_KIND_NAME),
                                  max_length=wire.MAX_KINDS, default=list,
                                  help_text="the task kinds the agent ships, each once")

    def to_internal_value(self, data: Any) -> wire.Capabilities:
        # The record reads the raw JSON, strictly (no "1024" for 1024, no unknown member): the fields above
        # document it in the schema, and a test keeps them the record's fields.
        try:
            return wire.Capabilities.from_wire(data)
        except wire.WireError as exc:
            raise serializers.ValidationError({exc.path or "non_field_errors": [exc.problem]}) from None


class JsonIntegerField(serializers.IntegerField):
    """An integer as JSON says one: no "5" for 5, no true for 1, no 2.0 (the wire records' reading, _int)."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class LeaseApi(AgentApi):
    """Served as it is under WSGI, where `wait_seconds` is read and not waited for (a sync worker held for
    the wait would be a worker per idle agent); under ASGI (marketplace/asgi.py) its long-polling twin,
    marketplace/api/longpoll.py, serves this route with the same checks and answers."""

    throttle_scope = "lease"  # per device (marketplace/api/throttling.py)

    class LeaseIn(serializers.Serializer):
        max_units = serializers.IntegerField(min_value=1, max_value=MAX_LEASE_BATCH, default=1,
                                             help_text="at most this many units")
        # Sent when the agent's facts changed since it last sent them (and with a run's first lease);
        # stored, with the hardware class, before anything is leased.
        hardware = serializers.JSONField(required=False, help_text="the device's hardware facts, when they changed")
        # Sent with every request by agents that match capabilities; an old agent's request lacks it and
        # is matched conservatively (docs/protocol.md, "Capabilities").
        capabilities = CapabilitiesIn(required=False, help_text="what the device can run now: only units "
                                                                "that fit are leased")
        wait_seconds = JsonIntegerField(
            min_value=0, max_value=MAX_LEASE_WAIT_SECONDS, default=0,
            help_text="when nothing can be leased now, hold the request up to this long and answer as soon as "
                      "work comes (docs/protocol.md, 'Long poll'); 0: answer at once. A server may wait less.")

    @extend_schema(operation_id="agent_lease", request=LeaseIn, responses=LEASES_OUT,
                   description="Lease up to max_units signed units the device can run (none: come back after "
                               "retry_after). With wait_seconds, an empty answer may come only after that wait.")
    def post(self, request):
        data = self.lease_request(request)
        return Response(lease_batch(device=request.auth, leases=lease_attempt(device=request.auth, data=data)))

    def lease_request(self, request) -> dict[str, Any]:
        """The request's validated members; stores the hardware facts it carries (before anything is leased)."""
        body = self.LeaseIn(data=request.data)
        body.is_valid(raise_exception=True)  # a bad capabilities object is a 400 before anything is written
        if "hardware" in body.validated_data:
            device_hardware_update(device=request.auth, hardware=body.validated_data["hardware"])
        return body.validated_data


def lease_attempt(*, device, data: dict[str, Any]) -> list[Lease]:
    return workunit_lease(device=device, max_units=data["max_units"], capabilities=data.get("capabilities"))


def lease_batch(*, device, leases: list[Lease], waited: bool = False) -> dict[str, Any]:
    """The answer. Nothing leased: come back later; after a give-up, not before the cool-down ends; after a
    wait that ran out (`waited`), at once, since the wait was the pause (the next request waits again)."""
    cooldown = math.ceil(cooldown_remaining(device=device)) if not leases else 0
    wait = cooldown if waited else max(settings.IDLEGRID_LEASE_RETRY_AFTER, cooldown)
    return wire.LeaseBatch(leases=tuple(_lease_wire(lease) for lease in leases), retry_after=0 if leases else wait).to_wire()


class HeartbeatApi(AgentApi):
    throttle_scope = "heartbeat"  # per device (marketplace/api/throttling.py)

    class HeartbeatIn(serializers.Serializer):
        result_ids = serializers.ListField(child=serializers.IntegerField(min_value=1, max_value=2**63 - 1), max_length=1000,
                                           help_text="the leases being computed")
        progress = serializers.DictField(
            child=serializers.FloatField(min_value=0, max_value=1), required=False, allow_empty=True,
            help_text="result id (as a string) -> fraction done in [0, 1], for ids in result_ids; information "
                      "for job progress and ETA only")

        def validate(self, data):
            if data.get("progress") is None:
                return data
            # The wire record's checks, on what was sent (the DictField would take "0.5" or true for a
            # number): keys are canonical ids listed in result_ids, fractions JSON numbers in [0, 1].
            try:
                request = wire.HeartbeatRequest(result_ids=tuple(data["result_ids"]),
                                                progress=self.initial_data.get("progress"))
            except wire.WireError as exc:
                raise serializers.ValidationError({"progress": exc.problem}) from None
            return {**data, "progress": request.fractions()}

    @extend_schema(operation_id="agent_heartbeat", request=HeartbeatIn, responses=RENEWED_OUT,
                   description="Renew the leases this device is computing; says which were lost.")
    def post(self, request):
        body = self.HeartbeatIn(data=request.data)
        body.is_valid(raise_exception=True)
        asked = body.validated_data["result_ids"]
        renewed, expires = lease_renew(device=request.auth, result_ids=asked,
                                       progress=body.validated_data.get("progress"))
        answer = wire.HeartbeatAnswer(
            renewed=tuple(renewed), lost=tuple(sorted(set(asked) - set(renewed))), expires_at=_timestamp(expires)
        )
        return Response(answer.to_wire())


class ReportApi(AgentApi):
    throttle_scope = "report"  # per device (marketplace/api/throttling.py)

    class ReportIn(serializers.Serializer):
        output_sha256 = serializers.CharField(max_length=64, help_text="the output artifact, uploaded by this device")
        signature = serializers.CharField(max_length=200, help_text="base64 Ed25519 signature of result_message(...) "
                                                                    "by the device key")
        elapsed_seconds = serializers.FloatField(min_value=0, required=False, allow_null=True,
                                                 help_text="compute time, for quotes' ETAs")
        metrics = serializers.DictField(required=False, default=dict,
                                        help_text="information only (never judged): plain names, scalar values")

    @extend_schema(
        operation_id="agent_report",
        request=ReportIn,
        responses=inline_serializer("Reported", {"state": serializers.CharField(help_text="the result's state")}),
        description="Report a leased unit's signed output.",
    )
    def post(self, request, result_id: int):
        body = self.ReportIn(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        result = result_report(
            device=request.auth, result_id=result_id, output_sha256=data["output_sha256"],
            signature_b64=data["signature"], elapsed_seconds=data.get("elapsed_seconds"), metrics=data["metrics"],
        )
        return Response({"state": result.state})


class ReportItemIn(serializers.Serializer):
    """One report of a batch: read by worker_agent/wire.py BatchedReport itself (ReportsApi.ReportsIn), so
    the marketplace refuses what the agent's own record refuses; these fields document it."""

    result_id = serializers.IntegerField(min_value=1, max_value=wire.MAX_ID, help_text="the lease reported")
    output_sha256 = serializers.CharField(max_length=64, help_text="the output's sha256: sent inline (`output`) "
                                                                   "or uploaded by this device before")
    signature = serializers.CharField(max_length=wire.MAX_TOKEN, help_text="base64 Ed25519 signature of "
                                                                           "result_message(...) by the device key")
    elapsed_seconds = serializers.FloatField(min_value=0, required=False, allow_null=True,
                                             help_text="compute time, for quotes' ETAs")
    metrics = serializers.DictField(required=False, default=dict,
                                    help_text="information only (never judged): plain names, scalar values")
    output = serializers.CharField(
        required=False, max_length=wire.MAX_INLINE_OUTPUT_BASE64,
        help_text=f"the output file's bytes, base64, at most {MAX_INLINE_OUTPUT_BYTES} bytes decoded: stored as an "
                  f"upload by this device would be, then reported; absent: the output was uploaded before")


class ReportOutcomeOut(serializers.Serializer):
    result_id = serializers.IntegerField(help_text="the report's lease, in the request's order")
    state = serializers.CharField(required=False, help_text="the result's state (reported): absent with `error`")
    error = ErrorBody(required=False, help_text="why this report was refused, as a single report would answer it "
                                                "(already_reported, lease_expired, invalid, ...)")


REPORTS_OUT = inline_serializer("ReportOutcomes", {
    "results": ReportOutcomeOut(many=True, help_text="one outcome per report, in the request's order")})
# One report's members besides its inline output, with room to spare: ids, hash, a signature, metrics (at most
# 4 KiB as canonical JSON, workunits/results.py), and the spacing and escapes a JSON encoder may add.
REPORT_ITEM_MAX_JSON = 8 * 1024
# What a batch of MAX_REPORT_BATCH reports, each with the largest inline output, can weigh, and no more: the
# JSON parser refuses a larger body with 413 before reading it (api/parsers.py).
REPORTS_MAX_BODY = MAX_REPORT_BATCH * (wire.MAX_INLINE_OUTPUT_BASE64 + REPORT_ITEM_MAX_JSON) + 1024


class ReportsApi(AgentApi):
    # A batch counts once against the device's report rate: each of its reports needs a live lease of this
    # device, and leases are throttled themselves (scope "lease"), so a batch cannot report more than was leased.
    throttle_scope = "report"  # per device (marketplace/api/throttling.py)
    max_body_bytes = REPORTS_MAX_BODY

    class ReportsIn(serializers.Serializer):
        reports = ReportItemIn(many=True, min_length=1, max_length=MAX_REPORT_BATCH,
                               help_text=f"1 to {MAX_REPORT_BATCH} reports of distinct leases, each signed on its own")

        def to_internal_value(self, data: Any) -> tuple[tuple[int, wire.BatchedReport | wire.WireError], ...]:
            # The envelope is read strictly (a 400 changes nothing); each report on its own, answered alone.
            try:
                return wire.ReportBatch.items_from_wire(data)
            except wire.WireError as exc:
                raise serializers.ValidationError({exc.path or "non_field_errors": [exc.problem]}) from None

    @extend_schema(
        operation_id="agent_report_batch",
        request=ReportsIn,
        responses=REPORTS_OUT,
        description="Report many leased units at once, each signed on its own and answered on its own (one refused "
                    "report fails no other); small outputs travel inline. docs/protocol.md, 'Batched reports'.",
    )
    def post(self, request):
        body = self.ReportsIn(data=request.data)
        body.is_valid(raise_exception=True)
        parsed: tuple[tuple[int, wire.BatchedReport | wire.WireError], ...] = body.validated_data
        items = [ReportItem(result_id=report.result_id, output_sha256=report.output_sha256, signature=report.signature,
                            elapsed_seconds=report.elapsed_seconds, metrics=report.metrics, output=report.output)
                 for _, report in parsed if isinstance(report, wire.BatchedReport)]
        judged = iter(results_report_batch(device=request.auth, items=items) if items else [])
        answers = []
        for result_id, report in parsed:
            outcome = next(judged) if isinstance(report, wire.BatchedReport) else ValidationFailed(
                "the report is invalid", fields={report.path or "report": report.problem})
            answers.append(_outcome(result_id, outcome))
        return Response(wire.ReportBatchAnswer(results=tuple(answers)).to_wire())


def _outcome(result_id: int, outcome: Any) -> wire.ReportOutcome:
    if isinstance(outcome, ApplicationError):
        return wire.ReportOutcome(result_id=result_id, error={"code": outcome.code, "message": outcome.message,
                                                              "fields": outcome.fields})
    return wire.ReportOutcome(result_id=result_id, state=outcome.state)


class FailApi(AgentApi):
    throttle_scope = "fail"  # per device (marketplace/api/throttling.py)

    class FailIn(serializers.Serializer):
        error = serializers.CharField(max_length=4000, help_text="why the unit could not be computed")

    @extend_schema(
        operation_id="agent_fail",
        request=FailIn,
        responses=inline_serializer("Failed", {"state": serializers.CharField(help_text="the result's state")}),
        description="Give a leased unit up (it costs a cool-down and the trust run).",
    )
    def post(self, request, result_id: int):
        body = self.FailIn(data=request.data)
        body.is_valid(raise_exception=True)
        result = result_fail(device=request.auth, result_id=result_id, error=body.validated_data["error"])
        return Response({"state": result.state})


class ReleaseApi(AgentApi):
    throttle_scope = "fail"  # per device (marketplace/api/throttling.py)

    @extend_schema(
        operation_id="agent_release",
        request=None,
        responses=inline_serializer("Released", {"state": serializers.CharField(help_text="the result's state")}),
        description=("Hand back a lease never started (the agent is shutting down): reissued at once, without "
                     "the cost of giving up (`fail`). The device's owner never gets this unit again."),
    )
    def post(self, request, result_id: int):
        result = result_release(device=request.auth, result_id=result_id)
        return Response({"state": result.state})


AGENT_AMOUNT_HELP = "integer base units of the payout token, as a decimal string (amounts exceed 2**53)"


class EarningsApi(AgentApi):
    # What `idlegrid-agent status` shows; the contributor's earnings page (portal) has the whole story.
    class EarningsOut(serializers.Serializer):
        held = serializers.CharField(help_text=f"the owner's earnings still in their audit window: {AGENT_AMOUNT_HELP}")
        settled = serializers.CharField(help_text=f"the owner's earnings past their audit window, all time: {AGENT_AMOUNT_HELP}")
        token_symbol = serializers.CharField(help_text="the payout token's symbol")
        token_decimals = serializers.IntegerField(help_text="the payout token's decimals (amount / 10**decimals)")
        units_validated_today = serializers.IntegerField(help_text="this device's results validated since midnight "
                                                                   "(the marketplace's time zone)")
        day_started = serializers.DateTimeField(help_text="that midnight")

    @extend_schema(operation_id="agent_earnings_retrieve", responses=EarningsOut,
                   description="The device owner's held and settled earnings and this device's units validated today.")
    def get(self, request):
        earnings = device_earnings(device=request.auth)
        return Response(self.EarningsOut({
            "held": str(earnings.held), "settled": str(earnings.settled),
            "token_symbol": settings.IDLEGRID_TOKEN_SYMBOL, "token_decimals": settings.IDLEGRID_TOKEN_DECIMALS,
            "units_validated_today": earnings.units_validated_today, "day_started": earnings.day_started,
        }).data)
