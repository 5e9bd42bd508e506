from django.apps import AppConfig


class WorkunitsConfig(AppConfig):
    name = "marketplace.workunits"
    label = "workunits"
