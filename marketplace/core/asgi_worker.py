"""The web server's worker class: gunicorn managing uvicorn workers on marketplace.asgi.

    gunicorn marketplace.asgi:application --worker-class marketplace.core.asgi_worker.AsgiWorker

uvicorn-worker's UvicornWorker (uvicorn.workers is deprecated), with one change: uvicorn's proxy headers off.
uvicorn trusts X-Forwarded-For from 127.0.0.1 by default and rewrites the client address with it, so every
request through a local proxy, or sent from the machine itself, could name its own address, and the
per-address throttles (login, enrolment) would count each forged address apart (tests/e2e/
test_authentication.py caught it). Which proxies are trusted is IDLEGRID_NUM_PROXIES's to say, as under WSGI
(marketplace/api/throttling.py).
"""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker


class AsgiWorker(UvicornWorker):
    CONFIG_KWARGS: dict[str, Any] = {**UvicornWorker.CONFIG_KWARGS, "proxy_headers": False}
