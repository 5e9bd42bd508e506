"""The filters of the API's lists, as django-filter FilterSets: each query parameter is a form field,
checked before the query runs; a bad value answers 400 in the error shape ({"error": {"code": "invalid",
"fields": {"<parameter>": [...]}}}: DjangoFilterBackend raises a DRF ValidationError, which
api/exception_handler.py renders). Parameters a FilterSet does not name are ignored, as DRF does.

Every value is bounded: integers by the form field's range (a 5000-digit number is refused, not sent to
the database), text by length, and Django's CharField refuses U+0000 (PostgreSQL cannot compare it)."""

from __future__ import annotations

from datetime import UTC

import django_filters
from django import forms
from django_filters.fields import IsoDateTimeField

from marketplace.jobs.models import Job
from marketplace.ledger.models import Posting
from marketplace.workers.models import Device

MAX_SIZE = 2**62


class SizeFilter(django_filters.Filter):
    """A whole number of bytes, 0..2**62 (django-filter's NumberFilter takes any decimal, 1e999 included)."""

    field_class = forms.IntegerField

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, min_value=0, max_value=MAX_SIZE, **kwargs)


class UtcDateTimeField(IsoDateTimeField):
    """An ISO 8601 time, turned to UTC before it reaches the query: Python takes offsets up to +-24 h,
    PostgreSQL only to +-15:59 ("time zone displacement out of range" was a 500, found by schemathesis),
    and a time that cannot be expressed in UTC (year 9999 with a negative offset) is refused."""

    def clean(self, value):
        cleaned = super().clean(value)
        if cleaned is None:
            return None
        try:
            return cleaned.astimezone(UTC)
        except OverflowError:
            raise forms.ValidationError("a time out of range", code="invalid") from None


class UtcDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcDateTimeField


class IdFilter(django_filters.Filter):
    """A row id, 1..2**63 - 1 (NumberFilter takes any decimal: 0.0, 1e999)."""

    field_class = forms.IntegerField

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, min_value=1, max_value=2**63 - 1, **kwargs)


def created_range(field_name: str) -> tuple[UtcDateTimeFilter, UtcDateTimeFilter]:
    return (
        UtcDateTimeFilter(field_name=field_name, lookup_expr="gte", help_text="created at or after this time (ISO 8601)"),
        UtcDateTimeFilter(field_name=field_name, lookup_expr="lt", help_text="created before this time (ISO 8601)"),
    )


class JobFilter(django_filters.FilterSet):
    state = django_filters.MultipleChoiceFilter(
        choices=Job.State.choices, help_text="one or more states: ?state=pending&state=running")
    kind = django_filters.ChoiceFilter(choices=Job.Kind.choices)
    created_after, created_before = created_range("created_at")


class ArtifactFilter(django_filters.FilterSet):
    """Over the caller's ownership rows (Artifact.owners' through table), hence the `artifact__` paths."""

    created_after, created_before = created_range("artifact__created_at")
    size_min = SizeFilter(field_name="artifact__size", lookup_expr="gte", help_text="at least this many bytes")
    size_max = SizeFilter(field_name="artifact__size", lookup_expr="lte", help_text="at most this many bytes")


class DeviceFilter(django_filters.FilterSet):
    state = django_filters.MultipleChoiceFilter(choices=Device.State.choices, help_text="one or more states")
    hardware_class = django_filters.CharFilter(max_length=64)
    created_after, created_before = created_range("created_at")


class EntryFilter(django_filters.FilterSet):
    kind = django_filters.MultipleChoiceFilter(field_name="posting__kind", choices=Posting.Kind.choices,
                                               help_text="one or more posting kinds")
    created_after, created_before = created_range("posting__created_at")
