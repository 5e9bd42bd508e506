from django.apps import AppConfig


class ArtifactsConfig(AppConfig):
    name = "marketplace.artifacts"
    label = "artifacts"
