from django.contrib import admin

from marketplace.workunits.models import Result, WorkUnit


class ResultInline(admin.TabularInline):
    model = Result
    fk_name = "unit"
    extra = 0
    fields = ["state", "device", "owner", "lease_expires_at", "lease_deadline", "reported_at", "output",
              "failed_known_rows", "disputes_known_answer", "error"]
    readonly_fields = fields
    can_delete = False


@admin.register(WorkUnit)
class WorkUnitAdmin(admin.ModelAdmin):
    list_display = ["pk", "job", "index", "state", "results_created", "max_results", "need_validate", "finished_at"]
    list_filter = ["state", "need_validate"]
    readonly_fields = ["canonical_result", "results_created", "finished_at", "known_answer_copies", "hidden_rows"]
    inlines = [ResultInline]


@admin.register(Result)
class ResultAdmin(admin.ModelAdmin):
    list_display = ["pk", "unit", "state", "device", "owner", "lease_expires_at", "reported_at"]
    list_filter = ["state"]
    readonly_fields = ["signature", "output", "metrics", "elapsed_seconds", "reported_at", "leased_at",
                       "lease_deadline", "disputes_known_answer", "failed_known_rows"]
