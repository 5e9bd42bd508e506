"""Deployment settings, each case in a fresh interpreter on a fresh var dir: private files, the shared cache,
request rates, and HTTPS (`manage.py check --deploy` clean in production)."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys

import pytest
from django.conf import settings

CONFIG_NAMES = ("DATABASE_URL", "CELERY_BROKER_URL", "SECRET_KEY", "SECRET_KEY_FILE", "DEBUG", "ALLOWED_HOSTS",
                "EMAIL_HOST", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE")


def run(tmp_path, args: list[str], *, umask: int = 0o022, **env: str) -> subprocess.CompletedProcess:
    clean = {name: value for name, value in os.environ.items()
             if not name.startswith("IDLEGRID_") and name not in CONFIG_NAMES}
    clean.update(DJANGO_SETTINGS_MODULE="marketplace.settings", IDLEGRID_VAR_DIR=str(tmp_path / "var"), **env)
    return subprocess.run([sys.executable, *args], cwd=settings.BASE_DIR, env=clean, capture_output=True, text=True,
                          timeout=180, umask=umask)


def setting(tmp_path, expression: str, **env: str) -> str:
    code = f"import django; django.setup(); from django.conf import settings; print(repr(({expression})))"
    done = run(tmp_path, ["-c", code], **env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- private files --------------------------------------------------------------------------------

def test_the_var_dir_and_the_embedded_database_are_private_whatever_the_umask(tmp_path):
    # umask 0 would leave 0777 folders and 0666 files to any code that does not set a mode itself. The
    # journal files exist only while a connection is open (SQLite removes them at the last close): the
    # child lists the database's files and their modes after a write, still connected.
    code = ("import django, json, os, stat; django.setup(); from django.conf import settings\n"
            "from django.db import connection\n"
            "with connection.cursor() as cursor: cursor.execute('CREATE TABLE probe (x int)')\n"
            "print(json.dumps({name: stat.S_IMODE(os.stat(settings.VAR_DIR / name).st_mode)\n"
            "                  for name in os.listdir(settings.VAR_DIR) if name.startswith('idlegrid.sqlite3')}))\n")
    done = run(tmp_path, ["-c", code], umask=0)

    assert done.returncode == 0, done.stderr
    var = tmp_path / "var"
    folders = [var, *(var / name for name in ("artifacts", "broker", "keys", "cache", "mail", "static")),
               *(var / "broker" / name for name in ("queue", "processed", "control"))]
    assert {str(folder.relative_to(tmp_path)): mode(folder) for folder in folders} == {
        str(folder.relative_to(tmp_path)): 0o700 for folder in folders}
    database_files = json.loads(done.stdout.strip().splitlines()[-1])
    assert database_files == {"idlegrid.sqlite3": 0o600, "idlegrid.sqlite3-wal": 0o600, "idlegrid.sqlite3-shm": 0o600}


def test_an_existing_open_var_dir_and_database_are_narrowed(tmp_path):
    var = tmp_path / "var"
    var.mkdir(mode=0o755)
    (var / "idlegrid.sqlite3").touch(mode=0o644)
    os.chmod(var, 0o755)
    os.chmod(var / "idlegrid.sqlite3", 0o644)

    setting(tmp_path, "settings.VAR_DIR")

    assert (mode(var), mode(var / "idlegrid.sqlite3")) == (0o700, 0o600)


# --- the shared cache -----------------------------------------------------------------------------

CACHE = "settings.CACHES['default']['BACKEND'], settings.CACHES['default']['LOCATION'], settings.CACHES['default'].get('KEY_PREFIX')"


def test_the_embedded_cache_is_a_folder_under_the_var_dir(tmp_path):
    assert setting(tmp_path, CACHE) == str(("django.core.cache.backends.filebased.FileBasedCache",
                                            str(tmp_path / "var" / "cache"), None))


def test_a_redis_broker_is_the_cache_too_under_a_key_prefix(tmp_path):
    assert setting(tmp_path, CACHE, CELERY_BROKER_URL="redis://broker.invalid:6379/0") == str((
        "django.core.cache.backends.redis.RedisCache", "redis://broker.invalid:6379/0", "idlegrid"))


def test_idlegrid_cache_url_names_the_cache(tmp_path):
    assert setting(tmp_path, CACHE, CELERY_BROKER_URL="redis://broker.invalid:6379/0",
                   IDLEGRID_CACHE_URL="redis://cache.invalid:6379/3") == str((
                       "django.core.cache.backends.redis.RedisCache", "redis://cache.invalid:6379/3", "idlegrid"))


# --- rates ----------------------------------------------------------------------------------------

def test_rates_come_from_the_environment_and_the_scale_multiplies_them(tmp_path):
    rates = "settings.REST_FRAMEWORK['DEFAULT_THROTTLE_RATES']"

    assert setting(tmp_path, rates + "['lease'], " + rates + "['token']", IDLEGRID_LEASE_RATE="5/second",
                   IDLEGRID_THROTTLE_SCALE="100") == str(("500/second", "1000/minute"))


def test_proxies_are_counted_only_when_configured(tmp_path):
    assert setting(tmp_path, "settings.REST_FRAMEWORK['NUM_PROXIES']") == "0"
    assert setting(tmp_path, "settings.REST_FRAMEWORK['NUM_PROXIES']", IDLEGRID_NUM_PROXIES="1") == "1"


@pytest.mark.parametrize(("name", "value"), [
    ("IDLEGRID_LEASE_RATE", "600 per minute"), ("IDLEGRID_TOKEN_RATE", "0/minute"), ("IDLEGRID_REPORT_RATE", "5/week"),
])
def test_a_bad_rate_stops_the_process_naming_the_variable(tmp_path, name, value):
    done = run(tmp_path, ["-c", "import django; django.setup()"], **{name: value})

    assert done.returncode != 0
    assert f"ImproperlyConfigured: {name} must look like 600/minute" in done.stderr


# --- HTTPS ----------------------------------------------------------------------------------------

def test_production_passes_the_deployment_checks_with_no_warning(tmp_path):
    done = run(tmp_path, ["manage.py", "check", "--deploy", "--fail-level", "WARNING"],
               IDLEGRID_PRODUCTION="true", SECRET_KEY=secrets.token_urlsafe(50))

    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout


def test_production_without_a_secret_key_does_not_start(tmp_path):
    done = run(tmp_path, ["manage.py", "check", "--deploy", "--fail-level", "WARNING"], IDLEGRID_PRODUCTION="true")

    assert done.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY" in done.stderr


HTTPS = ("settings.SECURE_SSL_REDIRECT, settings.SECURE_HSTS_SECONDS, settings.SESSION_COOKIE_SECURE, "
         "settings.CSRF_COOKIE_SECURE, getattr(settings, 'SECURE_PROXY_SSL_HEADER', None)")


def test_https_is_off_by_default_outside_production(tmp_path):
    assert setting(tmp_path, HTTPS) == str((False, 0, False, False, None))


def test_each_https_setting_comes_from_the_environment(tmp_path):
    assert setting(tmp_path, HTTPS, IDLEGRID_PRODUCTION="true", SECRET_KEY=secrets.token_urlsafe(50),
                   SECURE_SSL_REDIRECT="false", SECURE_HSTS_SECONDS="60",
                   IDLEGRID_PROXY_SSL_HEADER="X-Forwarded-Proto") == str(
        (False, 60, True, True, ("HTTP_X_FORWARDED_PROTO", "https")))


def test_the_health_check_answers_plain_http_in_production(tmp_path):
    code = ("import django; django.setup(); from django.test import Client\n"
            "client = Client()\n"
            "print(client.get('/healthz').status_code, client.get('/api/v1/devices/').status_code)\n")
    done = run(tmp_path, ["-c", code], IDLEGRID_PRODUCTION="true", SECRET_KEY=secrets.token_urlsafe(50))

    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["200", "301"]  # the API redirects to HTTPS; the health check does not
