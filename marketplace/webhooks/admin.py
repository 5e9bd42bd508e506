from django.contrib import admin

from marketplace.webhooks.models import Attempt, Delivery, Endpoint, Event


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin):
    list_display = ["pk", "owner", "url", "enabled", "created_at"]
    list_filter = ["enabled"]
    search_fields = ["url", "owner__username"]
    exclude = ["secret", "previous_secret"]  # signing keys: not for the admin's screen
    readonly_fields = ["owner", "previous_secret_expires_at", "created_at", "updated_at"]


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["msg_id", "type", "owner", "created_at"]
    list_filter = ["type"]
    search_fields = ["msg_id"]
    readonly_fields = [f.name for f in Event._meta.fields]


class AttemptInline(admin.TabularInline):
    model = Attempt
    extra = 0
    can_delete = False
    readonly_fields = [f.name for f in Attempt._meta.fields]


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = ["pk", "event", "endpoint", "state", "attempts_made", "next_attempt_at", "last_status_code"]
    list_filter = ["state"]
    readonly_fields = [f.name for f in Delivery._meta.fields]
    inlines = [AttemptInline]
