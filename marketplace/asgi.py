"""The marketplace as an ASGI application: what production and the demo serve, with gunicorn's
uvicorn workers (`gunicorn marketplace.asgi:application -k marketplace.core.asgi_worker.AsgiWorker`).

Django's own ASGI handler, except for the lease route, which long-polls (marketplace/api/longpoll.py).
The sync views run as Django runs them under ASGI, in threads; their database connections come from a
per-process pool (IDLEGRID_DB_POOL, marketplace/settings.py). marketplace/wsgi.py still serves everything
but the long poll, for a WSGI server.
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
os.environ.setdefault("IDLEGRID_DB_POOL", "true")
django.setup(set_prefix=False)

from marketplace.api.longpoll import LongPollASGIHandler  # noqa: E402 - needs the apps loaded
from marketplace.celery import app as celery_app  # noqa: E402

# The apps' tasks modules, imported now, before requests run in threads: imported lazily by the first
# request that enqueues (marketplace/core/tasks.py), two threads at once made one of them miss the task
# (`NotRegistered: 'workunits.validate'`, a 500 on a report: seen with bench/asgi_cost.py).
celery_app.loader.import_default_modules()

application = LongPollASGIHandler()
