import os

from celery import Celery

from marketplace.core.broker import register as filesystem_broker_register

filesystem_broker_register()  # the embedded broker publishes whole messages only (marketplace/core/broker.py)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

app = Celery("idlegrid")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
