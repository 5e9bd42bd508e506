from __future__ import annotations

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.authentication import IsPerson
from marketplace.api.filters import DeviceFilter
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
            "token": serializers.CharField(), "expires_at": serializers.DateTimeField()})},
        description="A one-time token to enrol one device under your account. Shown once.",
    )
    def post(self, request):
        token, row = enrollment_token_create(owner=request.user)
        return Response(
            {"token": token, "expires_at": serializers.DateTimeField().to_representation(row.expires_at)},
            status=status.HTTP_201_CREATED,
        )


class TrustOut(serializers.ModelSerializer):
    state = serializers.SerializerMethodField()

    class Meta:
        model = DeviceTrust
        fields = ["kind", "hardware_class", "state", "consecutive_valid", "trusted_since"]

    def get_state(self, trust: DeviceTrust) -> str:
        return "trusted" if trust.trusted else "probation"


class DeviceOut(serializers.ModelSerializer):
    trust = TrustOut(many=True, read_only=True)

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
