from django.contrib import admin

from marketplace.artifacts.models import Artifact


@admin.register(Artifact)
class ArtifactAdmin(admin.ModelAdmin):
    list_display = ["sha256", "size", "uploaded_by", "uploaded_by_device", "created_at"]
    search_fields = ["sha256"]
    readonly_fields = [f.name for f in Artifact._meta.fields]
