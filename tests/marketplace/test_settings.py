"""Settings come from the environment and fail loudly on bad values (each case in a fresh interpreter)."""

import os
import subprocess
import sys

import pytest
from django.conf import settings

SETUP = "import django; django.setup(); from django.conf import settings; print(settings.DATABASES['default']['ENGINE'])"
CONFIG_NAMES = ("DATABASE_URL", "CELERY_BROKER_URL", "SECRET_KEY", "SECRET_KEY_FILE", "IDLEGRID_PRODUCTION", "DEBUG")


def django_setup(tmp_path, *, code: str = SETUP, **env):
    clean = {
        name: value for name, value in os.environ.items()
        if not name.startswith("IDLEGRID_") and name not in CONFIG_NAMES
    }
    clean.update(DJANGO_SETTINGS_MODULE="marketplace.settings", IDLEGRID_VAR_DIR=str(tmp_path / "var"), **env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=settings.BASE_DIR, env=clean, capture_output=True, text=True, timeout=120
    )


def test_the_embedded_defaults_need_no_configuration(tmp_path):
    run = django_setup(tmp_path)

    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "django.db.backends.sqlite3"
    assert (tmp_path / "var" / "broker" / "queue").is_dir()


def test_a_postgres_database_url_selects_postgresql(tmp_path):
    run = django_setup(tmp_path, DATABASE_URL="postgres://idlegrid@db.invalid:5432/idlegrid")

    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "django.db.backends.postgresql"


@pytest.mark.parametrize(("name", "value", "says"), [
    ("IDLEGRID_LEASE_SECONDS", "abc", "IDLEGRID_LEASE_SECONDS must be an integer"),
    ("IDLEGRID_LEASE_SECONDS", "1", "IDLEGRID_LEASE_SECONDS must be between"),
    ("IDLEGRID_MAX_ARTIFACT_BYTES", "12", "IDLEGRID_MAX_ARTIFACT_BYTES must be between"),
    ("IDLEGRID_SWEEP_SECONDS", "10s", "IDLEGRID_SWEEP_SECONDS must be an integer"),
    ("DEBUG", "maybe", "DEBUG must be true or false"),
    ("DATABASE_URL", "mysql://idlegrid:secret@db.invalid/idlegrid", "DATABASE_URL must select PostgreSQL"),
    ("DATABASE_URL", "nonsense", "DATABASE_URL is not a valid database URL"),
    ("CELERY_BROKER_URL", "amqp://guest@broker.invalid//", "CELERY_BROKER_URL must be redis"),
    ("SECRET_KEY_FILE", "/nonexistent/idlegrid-secret", "SECRET_KEY_FILE='/nonexistent/idlegrid-secret' cannot be read"),
    ("IDLEGRID_STORAGE", "gcs", "IDLEGRID_STORAGE must be filesystem or s3"),
    ("IDLEGRID_STORAGE", "s3", "IDLEGRID_S3_BUCKET must name a bucket"),  # and no bucket
    ("IDLEGRID_S3_ENDPOINT_URL", "minio:9000", "IDLEGRID_S3_ENDPOINT_URL must be http(s)://host[:port]"),
    ("IDLEGRID_S3_ADDRESSING_STYLE", "dns", "IDLEGRID_S3_ADDRESSING_STYLE must be auto, path or virtual"),
    ("IDLEGRID_S3_PREFIX", "/artifacts", "IDLEGRID_S3_PREFIX must be folder names each ending in /"),
    ("IDLEGRID_S3_PREFIX", "../x/", "IDLEGRID_S3_PREFIX must be folder names each ending in /"),
    ("IDLEGRID_S3_ACCESS_KEY_ID", "AKIDONLY", "IDLEGRID_S3_ACCESS_KEY_ID and IDLEGRID_S3_SECRET_ACCESS_KEY go together"),
    ("IDLEGRID_S3_SECRET_ACCESS_KEY_FILE", "/nonexistent/s3-secret", "IDLEGRID_S3_SECRET_ACCESS_KEY_FILE='/nonexistent/s3-secret' cannot be read"),
])
def test_it_refuses_a_bad_value(tmp_path, name, value, says):
    run = django_setup(tmp_path, **{name: value})

    assert run.returncode != 0
    assert "ImproperlyConfigured" in run.stderr
    assert says in run.stderr


def test_it_refuses_production_without_a_secret_key(tmp_path):
    run = django_setup(tmp_path, IDLEGRID_PRODUCTION="true")

    assert run.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY" in run.stderr


def test_it_reads_a_secret_from_a_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("from-a-file-" * 4 + "\n")

    run = django_setup(tmp_path, IDLEGRID_PRODUCTION="true", SECRET_KEY_FILE=str(secret))

    assert run.returncode == 0, run.stderr


def test_s3_storage_is_chosen_by_settings_with_its_secret_from_a_file(tmp_path):
    secret = tmp_path / "s3-secret"
    secret.write_text("s3-secret-from-a-file\n")
    code = ("import django; django.setup(); from django.conf import settings; "
            "from marketplace.artifacts.storage import get_storage; "
            "print(type(get_storage()).__name__, settings.IDLEGRID_S3_BUCKET, settings.IDLEGRID_S3_PREFIX, "
            "settings.IDLEGRID_S3_ADDRESSING_STYLE, settings.IDLEGRID_S3_SECRET_ACCESS_KEY)")

    run = django_setup(tmp_path, code=code, IDLEGRID_STORAGE="s3", IDLEGRID_S3_BUCKET="idlegrid-artifacts",
                       IDLEGRID_S3_PREFIX="prod/blobs/", IDLEGRID_S3_ENDPOINT_URL="http://minio:9000",
                       IDLEGRID_S3_ADDRESSING_STYLE="path", IDLEGRID_S3_ACCESS_KEY_ID="idlegrid",
                       IDLEGRID_S3_SECRET_ACCESS_KEY_FILE=str(secret))

    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["S3ObjectStorage", "idlegrid-artifacts", "prod/blobs/", "path", "s3-secret-from-a-file"]


def test_the_filesystem_is_the_default_storage(tmp_path):
    code = ("import django; django.setup(); from marketplace.artifacts.storage import get_storage; "
            "print(type(get_storage()).__name__)")

    run = django_setup(tmp_path, code=code)

    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "FileSystemStorage"
