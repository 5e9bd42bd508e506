from __future__ import annotations

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.authentication import IsPerson
from marketplace.api.filters import DeviceFilter
from marketplace.api.idempotency import idempotent
from marketplace.api.schema import ErrorOut
from marketplace.workers.models import Device, DeviceTrust
from marketplace.workers.selectors import devices_for_owner
from marketplace.workers.services import enrollment_token_create


class EnrollmentTokenCreateApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(
        operation_id="enrollment_token_create",
        request=None,
        responses={201: inline_serializer("EnrollmentToken", {
            "token": serializers.CharField(help_text="give it to `idlegrid-agent enroll`; shown this once, stored hashed"),
            "expires_at": serializers.DateTimeField(help_text="it enrols nothing after this")})},
        description="A one-time token to enrol one device under your account. Shown once.",
    )
    @idempotent
    def post(self, request):
        token, row = enrollment_token_create(owner=request.user)
        return Response(
            {"token": token, "expires_at": serializers.DateTimeField().to_representation(row.expires_at)},
            status=status.HTTP_201_CREATED,
        )


class TrustOut(serializers.ModelSerializer):
    state = serializers.SerializerMethodField(help_text="trusted (results accepted on its word, audited) or probation")

    class Meta:
        model = DeviceTrust
        fields = ["kind", "hardware_class", "state", "consecutive_valid", "trusted_since"]
        extra_kwargs = {
            "kind": {"help_text": "the task kind this trust is for"},
            "hardware_class": {"help_text": "the hardware class this trust is for"},
            "consecutive_valid": {"help_text": "valid replicated results in a row (trust after enough)"},
            "trusted_since": {"help_text": "when the device became trusted for this kind and class"},
        }

    def get_state(self, trust: DeviceTrust) -> str:
        return "trusted" if trust.trusted else "probation"


class DeviceOut(serializers.ModelSerializer):
    trust = TrustOut(many=True, read_only=True, help_text="trust per task kind and hardware class")

    class Meta:
        model = Device
        fields = ["id", "name", "state", "hardware", "hardware_class", "valid_results", "invalid_results",
                  "audits_passed", "audits_failed", "gave_up", "expired", "released", "cooldown_until",
                  "banned_at", "ban_reason", "earnings_held", "trust", "created_at", "last_seen_at"]
        extra_kwargs = {
            "gave_up": {"help_text": "leases given up (`fail`): each costs a cool-down and the trust run"},
            "expired": {"help_text": "leases that expired without a report"},
            "released": {"help_text": "leases handed back unstarted (`release`, at shutdown): free"},
            "cooldown_until": {"help_text": "after a give-up the device leases nothing until then"},
            "id": {"help_text": "the device id (in `Authorization: Device <id>:<secret>`)"},
            "name": {"help_text": "the name given at enrolment"},
            "state": {"help_text": "active, disabled or banned"},
            "hardware": {"help_text": "the hardware facts the agent last sent"},
            "hardware_class": {"help_text": "the class results are compared bitwise within"},
            "valid_results": {"help_text": "results that agreed with their unit's decision"},
            "invalid_results": {"help_text": "results that disagreed"},
            "audits_passed": {"help_text": "audits of unreplicated results it passed"},
            "audits_failed": {"help_text": "audits it failed (one bans the device)"},
            "banned_at": {"help_text": "when it was banned, if it was"},
            "ban_reason": {"help_text": "why it was banned"},
            "earnings_held": {"help_text": "earnings inside the audit window, base units"},
            "created_at": {"help_text": "when it enrolled"},
            "last_seen_at": {"help_text": "its last request"},
        }


class DeviceListApi(ListAPIView):
    permission_classes = [IsPerson]
    serializer_class = DeviceOut
    filterset_class = DeviceFilter

    def get_queryset(self):
        return devices_for_owner(owner=self.request.user)

    @extend_schema(operation_id="device_list",
                   responses={200: DeviceOut(many=True), 400: ErrorOut, 401: ErrorOut, 404: ErrorOut},
                   description="Your devices, newest first, a page at a time (docs/api/lists.md).")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)
