from django.contrib import admin

from marketplace.jobs.models import FedRound, Job
from marketplace.jobs.selectors import job_progress


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["pk", "kind", "owner", "state", "units_total", "results_per_unit", "corrections", "created_at",
                    "finished_at"]
    list_filter = ["state", "kind"]
    readonly_fields = ["progress", "output", "started_at", "finished_at", "units_total"]

    @admin.display(description="results per unit")
    def results_per_unit(self, job: Job) -> float | None:
        return job_progress(job=job)["results_per_unit"]

    @admin.display(description="progress")
    def progress(self, job: Job) -> str:
        return ", ".join(f"{k}={v}" for k, v in job_progress(job=job).items())


@admin.register(FedRound)
class FedRoundAdmin(admin.ModelAdmin):
    list_display = ["pk", "job", "index", "samples", "train_loss", "eval_loss", "eval_accuracy", "created_at"]
    list_filter = ["job"]
    readonly_fields = ["job", "index", "weights_in", "weights_out", "updates", "samples", "train_loss", "eval_loss",
                       "eval_accuracy"]
