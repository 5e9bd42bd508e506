from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin
from django.db.models import Model
from django.http import HttpRequest

from marketplace.workunits.models import Result, ResultArchive, WorkUnit

if TYPE_CHECKING:
    # Generic in django-stubs only.
    _ResultInline = admin.TabularInline[Result, WorkUnit]
    _WorkUnitAdmin = admin.ModelAdmin[WorkUnit]
    _ResultAdmin = admin.ModelAdmin[Result]
    _ResultArchiveAdmin = admin.ModelAdmin[ResultArchive]
else:
    _ResultInline = admin.TabularInline
    _WorkUnitAdmin = _ResultAdmin = _ResultArchiveAdmin = admin.ModelAdmin


class ResultInline(_ResultInline):
    model = Result
    fk_name = "unit"
    extra = 0
    # A tuple: one object fits both attributes' stub types (a list is invariant).
    fields = readonly_fields = ("state", "device", "owner", "lease_expires_at", "lease_deadline", "reported_at",
                                "output", "failed_known_rows", "disputes_known_answer", "error")
    can_delete = False


@admin.register(WorkUnit)
class WorkUnitAdmin(_WorkUnitAdmin):
    list_display = ["pk", "job", "index", "state", "results_created", "max_results", "need_validate", "finished_at"]
    list_filter = ["state", "need_validate"]
    readonly_fields = ["canonical_result", "results_created", "finished_at", "known_answer_copies", "hidden_rows"]
    inlines = [ResultInline]


@admin.register(Result)
class ResultAdmin(_ResultAdmin):
    list_display = ["pk", "unit", "state", "device", "owner", "lease_expires_at", "reported_at"]
    list_filter = ["state"]
    readonly_fields = ["signature", "output", "metrics", "elapsed_seconds", "reported_at", "leased_at",
                       "lease_deadline", "disputes_known_answer", "failed_known_rows"]


@admin.register(ResultArchive)
class ResultArchiveAdmin(_ResultArchiveAdmin):
    """Read only: the archiver writes these rows once (workunits/archive.py)."""

    list_display = ["pk", "unit", "job", "state", "device", "reported_at", "archived_at"]
    list_filter = ["state"]

    def has_add_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False
