from django.contrib import admin

from marketplace.workers.models import Device, DeviceTrust, HardwareChange


class DeviceTrustInline(admin.TabularInline):
    model = DeviceTrust
    extra = 0
    fields = ["kind", "hardware_class", "consecutive_valid", "trusted_since", "updated_at"]
    readonly_fields = fields
    can_delete = False


class HardwareChangeInline(admin.TabularInline):
    model = HardwareChange
    extra = 0
    fields = ["old_class", "new_class", "changed_at"]
    readonly_fields = fields
    can_delete = False


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = ["pk", "name", "owner", "state", "valid_results", "invalid_results", "audits_passed",
                    "audits_failed", "gave_up", "expired", "hardware_class_short", "last_seen_at"]
    inlines = [DeviceTrustInline, HardwareChangeInline]
    list_filter = ["state"]
    search_fields = ["name", "owner__username"]
    readonly_fields = ["public_key", "secret_hash", "hardware", "hardware_class", "valid_results", "invalid_results",
                       "audits_passed", "audits_failed", "gave_up", "expired", "released", "cooldown_until",
                       "hardware_enrolled", "banned_at", "ban_reason", "earnings_held",
                       "created_at", "last_seen_at"]

    @admin.display(description="hardware class")
    def hardware_class_short(self, device: Device) -> str:
        return device.hardware_class[:12]
