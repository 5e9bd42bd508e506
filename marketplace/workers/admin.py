from django.contrib import admin

from marketplace.workers.models import Device


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = ["pk", "name", "owner", "state", "valid_results", "invalid_results", "hardware_class_short", "last_seen_at"]
    list_filter = ["state"]
    search_fields = ["name", "owner__username"]
    readonly_fields = ["public_key", "secret_hash", "hardware", "hardware_class", "valid_results", "invalid_results",
                       "created_at", "last_seen_at"]

    @admin.display(description="hardware class")
    def hardware_class_short(self, device: Device) -> str:
        return device.hardware_class[:12]
