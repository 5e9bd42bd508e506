"""Webhooks' reads, for the API: a person sees their own endpoints and deliveries only."""

from __future__ import annotations

from django.db.models import QuerySet

from marketplace.core.exceptions import NotFound
from marketplace.webhooks.models import Delivery, Endpoint


def endpoints_for(*, owner_id: int) -> QuerySet[Endpoint]:
    return Endpoint.objects.filter(owner_id=owner_id)


def endpoint_get_for_owner(*, endpoint_id: int, owner_id: int) -> Endpoint:
    endpoint = Endpoint.objects.filter(pk=endpoint_id, owner_id=owner_id).first()
    if endpoint is None:
        raise NotFound(f"no webhook endpoint {endpoint_id}")  # another person's is not revealed either
    return endpoint


def deliveries_for(*, owner_id: int) -> QuerySet[Delivery]:
    return Delivery.objects.filter(endpoint__owner_id=owner_id).select_related("event")


def delivery_get_for_owner(*, delivery_id: int, owner_id: int) -> Delivery:
    delivery = deliveries_for(owner_id=owner_id).filter(pk=delivery_id).prefetch_related("attempts").first()
    if delivery is None:
        raise NotFound(f"no webhook delivery {delivery_id}")
    return delivery
