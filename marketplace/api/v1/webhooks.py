"""Webhooks in the API: register receivers, rotate their secrets, send a test, read deliveries and their
attempts, replay one (docs/api/webhooks.md). A person sees and touches their own rows only: anyone else's
is a 404, as if it did not exist.

POSTs that create something take an Idempotency-Key (api/idempotency.py). An endpoint's creation and a
rotation answer with a secret shown once: a client that lost that answer (a timeout) can only get the
secret back by retrying with its key, so the remembered answer holds it for IDLEGRID_IDEMPOTENCY_HOURS --
in the same database as the endpoint's own copy (HMAC needs the secret itself), deleted by the hourly purge.
Without a key, a retried rotation would rotate twice and end the secret the receiver still holds."""

from __future__ import annotations

import django_filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.authentication import IsPerson
from marketplace.api.filters import IdFilter, created_range
from marketplace.api.idempotency import idempotent
from marketplace.api.schema import ErrorOut
from marketplace.webhooks.catalog import EVENT_TYPES
from marketplace.webhooks.models import MAX_URL, Attempt, Delivery, Endpoint
from marketplace.webhooks.selectors import (
    deliveries_for,
    delivery_get_for_owner,
    endpoint_get_for_owner,
    endpoints_for,
)
from marketplace.webhooks.services import (
    delivery_replay,
    endpoint_create,
    endpoint_delete,
    endpoint_secret_rotate,
    endpoint_test,
    endpoint_update,
)

IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
    description="Send the same key to retry safely: the operation runs once and every retry gets the first answer "
                "again (Idempotent-Replayed: true) for 24 hours.")
READ_ERRORS = {401: ErrorOut, 404: ErrorOut}
WRITE_ERRORS = {400: ErrorOut, 401: ErrorOut, 404: ErrorOut, 409: ErrorOut, 422: ErrorOut}


class EndpointOut(serializers.ModelSerializer):
    event_types = serializers.ListField(child=serializers.CharField(), help_text="the types sent to it; empty: all")
    previous_secret_expires_at = serializers.DateTimeField(
        allow_null=True, help_text="after a rotation, the previous secret also signs until then")

    class Meta:
        model = Endpoint
        fields = ["id", "url", "description", "event_types", "enabled", "previous_secret_expires_at", "created_at",
                  "updated_at"]
        extra_kwargs = {
            "id": {"help_text": "the endpoint's id"},
            "url": {"help_text": "where events are POSTed"},
            "description": {"help_text": "yours, free text"},
            "enabled": {"help_text": "false: nothing is sent to it (pending deliveries wait)"},
            "created_at": {"help_text": "when it was registered"},
            "updated_at": {"help_text": "when it last changed"},
        }


class EndpointSecretOut(EndpointOut):
    secret = serializers.CharField(help_text="whsec_ + base64: the key of the signatures (Standard Webhooks). "
                                             "Shown in this answer only: keep it.")

    class Meta(EndpointOut.Meta):
        fields = [*EndpointOut.Meta.fields, "secret"]


class AttemptOut(serializers.ModelSerializer):
    class Meta:
        model = Attempt
        fields = ["number", "replay", "started_at", "duration_ms", "outcome", "status_code", "error",
                  "response_body", "address"]
        extra_kwargs = {
            "replay": {"help_text": "made by a replay through the API, not by the schedule"},
            "started_at": {"help_text": "when the attempt began"},
            "duration_ms": {"help_text": "from connect to the end of the answer (or the failure)"},
            "outcome": {"help_text": "succeeded (2xx), http_error, timeout, connection_error, or refused (SSRF rules, "
                                     "endpoint disabled or deleted)"},
            "status_code": {"help_text": "the receiver's HTTP status; null without an answer"},
            "error": {"help_text": "what went wrong, for people; empty on success"},
        }


class EventOut(serializers.Serializer):
    id = serializers.CharField(source="msg_id", help_text="the webhook-id header: the same on every attempt")
    type = serializers.CharField(help_text="the event type, e.g. job.completed (docs/api/webhooks.md)")
    data = serializers.JSONField(help_text="the payload's data: ids and states, per type (docs/api/webhooks.md)")
    created_at = serializers.DateTimeField(help_text="the payload's timestamp")


class DeliveryOut(serializers.ModelSerializer):
    endpoint = serializers.IntegerField(source="endpoint_id", help_text="the endpoint it is sent to")
    event = EventOut(help_text="the event it carries")
    next_attempt_at = serializers.DateTimeField(allow_null=True, help_text="while pending: the next attempt's time")
    last_status_code = serializers.IntegerField(allow_null=True, help_text="of the latest attempt that got an answer")

    class Meta:
        model = Delivery
        fields = ["id", "endpoint", "event", "state", "attempts_made", "next_attempt_at", "last_status_code",
                  "created_at", "finished_at"]
        extra_kwargs = {
            "id": {"help_text": "the delivery's id"},
            "state": {"help_text": "pending (attempts left), succeeded, or failed (the schedule ran out)"},
            "created_at": {"help_text": "when the event was emitted for this endpoint"},
            "finished_at": {"help_text": "when it succeeded or ran out of attempts"},
        }


class DeliveryDetailOut(DeliveryOut):
    attempts = AttemptOut(many=True, help_text="every attempt, oldest first")

    class Meta(DeliveryOut.Meta):
        fields = [*DeliveryOut.Meta.fields, "attempts"]


class EndpointIn(serializers.Serializer):
    url = serializers.CharField(max_length=MAX_URL, help_text="https:// (http:// only where the operator allows it) "
                                                              "to a public address; redirects are not followed")
    description = serializers.CharField(max_length=500, required=False, allow_blank=True, default="",
                                        help_text="yours, free text (500 characters at most)")
    event_types = serializers.ListField(child=serializers.ChoiceField(choices=EVENT_TYPES), required=False,
                                        default=list, max_length=len(EVENT_TYPES),
                                        help_text="the types to send; empty or left out: all")
    enabled = serializers.BooleanField(required=False, default=True, help_text="false: nothing is sent to it")


class EndpointPatchIn(EndpointIn):
    url = serializers.CharField(max_length=MAX_URL, required=False, help_text="a new target (checked as at creation)")
    description = serializers.CharField(max_length=500, required=False, allow_blank=True, help_text="yours, free text")
    event_types = serializers.ListField(child=serializers.ChoiceField(choices=EVENT_TYPES), required=False,
                                        max_length=len(EVENT_TYPES), help_text="the types to send; empty: all")
    enabled = serializers.BooleanField(required=False, help_text="false: nothing is sent to it")


class EndpointListApi(generics.GenericAPIView):
    permission_classes = [IsPerson]
    serializer_class = EndpointOut
    filter_backends: list = []

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Endpoint.objects.none()
        return endpoints_for(owner_id=self.request.user.pk)

    @extend_schema(operation_id="webhook_endpoint_list", responses={200: EndpointOut(many=True), 401: ErrorOut},
                   description="Your webhook endpoints, newest first, a page at a time.")
    def get(self, request):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(EndpointOut(page, many=True).data)

    @extend_schema(
        operation_id="webhook_endpoint_create", request=EndpointIn, parameters=[IDEMPOTENCY_KEY],
        responses={201: EndpointSecretOut, **WRITE_ERRORS},
        description="Register a receiver. Its URL must resolve to public addresses only (checked now and before "
                    "every attempt). The answer holds the endpoint's secret, this once. 409: the per-person cap.")
    @idempotent
    def post(self, request):
        body = EndpointIn(data=request.data)
        body.is_valid(raise_exception=True)
        endpoint = endpoint_create(owner_id=request.user.pk, **body.validated_data)
        return Response(EndpointSecretOut(endpoint).data, status=status.HTTP_201_CREATED)


class EndpointDetailApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(operation_id="webhook_endpoint_retrieve", responses={200: EndpointOut, **READ_ERRORS},
                   description="One of your endpoints (never its secret).")
    def get(self, request, endpoint_id: int):
        return Response(EndpointOut(endpoint_get_for_owner(endpoint_id=endpoint_id, owner_id=request.user.pk)).data)

    @extend_schema(operation_id="webhook_endpoint_update", request=EndpointPatchIn,
                   responses={200: EndpointOut, **WRITE_ERRORS},
                   description="Change the URL (checked again), description, event types or enabled; only the "
                               "fields sent change. A disabled endpoint is sent nothing: its pending deliveries "
                               "log a refused attempt and keep their schedule.")
    def patch(self, request, endpoint_id: int):
        endpoint = endpoint_get_for_owner(endpoint_id=endpoint_id, owner_id=request.user.pk)
        body = EndpointPatchIn(data=request.data, partial=True)
        body.is_valid(raise_exception=True)
        return Response(EndpointOut(endpoint_update(endpoint=endpoint, **body.validated_data)).data)

    @extend_schema(operation_id="webhook_endpoint_delete", responses={204: None, **READ_ERRORS},
                   description="Remove the endpoint with its deliveries and their attempts.")
    def delete(self, request, endpoint_id: int):
        endpoint_delete(endpoint=endpoint_get_for_owner(endpoint_id=endpoint_id, owner_id=request.user.pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


class EndpointRotateSecretApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(
        operation_id="webhook_endpoint_rotate_secret", request=None, parameters=[IDEMPOTENCY_KEY],
        responses={200: EndpointSecretOut, **WRITE_ERRORS},
        description="A new secret, shown this once. The previous one keeps signing too (both signatures in "
                    "webhook-signature) until previous_secret_expires_at; a second rotation before then ends "
                    "the oldest at once.")
    @idempotent
    def post(self, request, endpoint_id: int):
        endpoint = endpoint_get_for_owner(endpoint_id=endpoint_id, owner_id=request.user.pk)
        return Response(EndpointSecretOut(endpoint_secret_rotate(endpoint=endpoint)).data)


class EndpointTestApi(APIView):
    permission_classes = [IsPerson]
    throttle_scope = "webhook_send"

    @extend_schema(
        operation_id="webhook_endpoint_test", request=None, parameters=[IDEMPOTENCY_KEY],
        responses={202: DeliveryOut, **WRITE_ERRORS, 429: ErrorOut},
        description="Send a webhook.test event to this endpoint (whatever its filter): follow the delivery.")
    @idempotent
    def post(self, request, endpoint_id: int):
        endpoint = endpoint_get_for_owner(endpoint_id=endpoint_id, owner_id=request.user.pk)
        return Response(DeliveryOut(endpoint_test(endpoint=endpoint)).data, status=status.HTTP_202_ACCEPTED)


class DeliveryFilter(django_filters.FilterSet):
    endpoint = IdFilter(field_name="endpoint_id", help_text="one endpoint's deliveries")
    event_type = django_filters.ChoiceFilter(field_name="event__type", help_text="one event type's",
                                             choices=[(t, t) for t in (*EVENT_TYPES, "webhook.test")])
    state = django_filters.ChoiceFilter(choices=Delivery.State.choices)
    created_after, created_before = created_range("created_at")

    class Meta:
        model = Delivery
        fields: list[str] = []


class DeliveryListApi(generics.ListAPIView):
    permission_classes = [IsPerson]
    serializer_class = DeliveryOut
    filterset_class = DeliveryFilter

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator, without a person
            return Delivery.objects.none()
        return deliveries_for(owner_id=self.request.user.pk)

    @extend_schema(operation_id="webhook_delivery_list", responses={200: DeliveryOut(many=True), 400: ErrorOut,
                                                                   401: ErrorOut},
                   description="Your deliveries, newest first, a page at a time; filter by endpoint, event type, "
                               "state and creation time.")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class DeliveryDetailApi(APIView):
    permission_classes = [IsPerson]

    @extend_schema(operation_id="webhook_delivery_retrieve", responses={200: DeliveryDetailOut, **READ_ERRORS},
                   description="A delivery with every attempt: time, outcome, status code, duration, error and "
                               "the first kilobyte of the receiver's answer.")
    def get(self, request, delivery_id: int):
        delivery = delivery_get_for_owner(delivery_id=delivery_id, owner_id=request.user.pk)
        return Response(DeliveryDetailOut(delivery).data)


class DeliveryReplayApi(APIView):
    permission_classes = [IsPerson]
    throttle_scope = "webhook_send"

    @extend_schema(
        operation_id="webhook_delivery_replay", request=None, parameters=[IDEMPOTENCY_KEY],
        responses={202: DeliveryOut, **WRITE_ERRORS, 429: ErrorOut},
        description="Send the event again now, with the same webhook-id. A finished delivery gets one more "
                    "attempt; a pending one's next attempt comes forward. 409 while an attempt is in progress.")
    @idempotent
    def post(self, request, delivery_id: int):
        delivery = delivery_get_for_owner(delivery_id=delivery_id, owner_id=request.user.pk)
        return Response(DeliveryOut(delivery_replay(delivery=delivery)).data, status=status.HTTP_202_ACCEPTED)
