from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "marketplace.workers"
    label = "workers"
