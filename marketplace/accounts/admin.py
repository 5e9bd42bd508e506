from django.contrib import admin

from marketplace.accounts.models import EnrollmentToken


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(admin.ModelAdmin):
    list_display = ["pk", "owner", "created_at", "expires_at", "used_at", "device"]
    list_filter = ["used_at"]
    readonly_fields = ["token_hash", "used_at", "device"]
