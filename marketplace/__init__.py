from marketplace.core.recursion import recursion_limit_restore

# First thing in every process that imports the marketplace (gunicorn, Celery, manage.py, tests):
# py_ecc must not leave its recursion limit of 100000 behind (marketplace/core/recursion.py).
recursion_limit_restore()

from .celery import app as celery_app  # noqa: E402

__all__ = ("celery_app",)
