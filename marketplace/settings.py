"""Idlegrid settings: all from the environment, with embedded defaults, failing loudly on bad values.

Embedded defaults (nothing configured): SQLite in WAL mode under IDLEGRID_VAR_DIR, Celery's
filesystem:// broker under the same folder, artifacts on the local filesystem.
DATABASE_URL selects PostgreSQL; CELERY_BROKER_URL selects Redis.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name: str, default: str | None = None) -> str | None:
    """A setting from the environment, or from the file named by NAME_FILE (for secrets)."""
    file_name = os.environ.get(f"{name}_FILE")
    if file_name:
        try:
            return Path(file_name).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={file_name!r} cannot be read: {exc}") from exc
    return os.environ.get(name, default)


def envbool(name: str, default: bool) -> bool:
    value = env(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, got {value!r}")


def envint(name: str, default: int, *, low: int = 0, high: int = 2**62) -> int:
    value = env(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ImproperlyConfigured(f"{name} must be between {low} and {high}, got {number}")
    return number


DEBUG = envbool("DEBUG", False)
VAR_DIR = Path(env("IDLEGRID_VAR_DIR") or BASE_DIR / "var").resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)

_DEV_SECRET = "idlegrid-insecure-development-key-do-not-use-in-production"
SECRET_KEY = env("SECRET_KEY") or _DEV_SECRET
if SECRET_KEY == _DEV_SECRET and envbool("IDLEGRID_PRODUCTION", False):
    raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) must be set when IDLEGRID_PRODUCTION is true")

ALLOWED_HOSTS = [h.strip() for h in (env("ALLOWED_HOSTS") or "localhost,127.0.0.1,[::1],testserver").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [o.strip() for o in (env("CSRF_TRUSTED_ORIGINS") or "").split(",") if o.strip()]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "marketplace.core",
    "marketplace.accounts",
    "marketplace.artifacts",
    "marketplace.workers",
    "marketplace.jobs",
    "marketplace.workunits",
    "marketplace.ledger",
    "marketplace.api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "marketplace.urls"
WSGI_APPLICATION = "marketplace.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# --- database -------------------------------------------------------------------------------------
_database_url = env("DATABASE_URL")
if _database_url:
    try:
        # Persistent connections without a per-request health check: the check is one more round trip on
        # every lease and report (measured at ~10% of a web worker's time by bench/dispatch.py).
        DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=60, conn_health_checks=False)}
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from exc
    if DATABASES["default"]["ENGINE"] not in {"django.db.backends.postgresql", "django.db.backends.sqlite3"}:
        raise ImproperlyConfigured("DATABASE_URL must select PostgreSQL (postgres://...) or SQLite (sqlite:///...)")
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": VAR_DIR / "idlegrid.sqlite3"}}

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets readers run beside one writer across processes; IMMEDIATE takes the write lock at BEGIN
    # so two processes never deadlock upgrading read locks; the timeout waits for that lock.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A file (not :memory:) so the end-to-end tests' server processes share it; one per test run.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-idlegrid-{os.getpid()}.sqlite3")}
    DATABASES["default"]["CONN_MAX_AGE"] = 0

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Celery ---------------------------------------------------------------------------------------
CELERY_BROKER_URL = env("CELERY_BROKER_URL") or "filesystem://"
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = VAR_DIR / "broker"
    (_broker_dir / "queue").mkdir(parents=True, exist_ok=True)
    (_broker_dir / "processed").mkdir(parents=True, exist_ok=True)
    (_broker_dir / "control").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
elif not CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    raise ImproperlyConfigured("CELERY_BROKER_URL must be redis://... or filesystem://")
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = envint("IDLEGRID_TASK_TIME_LIMIT", 600, low=1)
CELERY_TASK_SOFT_TIME_LIMIT = CELERY_TASK_TIME_LIMIT - 30 if CELERY_TASK_TIME_LIMIT > 60 else None
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
IDLEGRID_SWEEP_SECONDS = envint("IDLEGRID_SWEEP_SECONDS", 10, low=1)
CELERY_BEAT_SCHEDULE = {
    "expire-leases": {"task": "workunits.expire_leases", "schedule": timedelta(seconds=IDLEGRID_SWEEP_SECONDS)},
    "sweep": {"task": "workunits.sweep", "schedule": timedelta(seconds=IDLEGRID_SWEEP_SECONDS)},
}

# --- Idlegrid -------------------------------------------------------------------------------------
IDLEGRID_ARTIFACT_DIR = Path(env("IDLEGRID_ARTIFACT_DIR") or VAR_DIR / "artifacts").resolve()
# The Ed25519 keys that sign work units (marketplace/core/signing.py): private keys in files, never in
# the database; every web and Celery process must see the same directory.
IDLEGRID_SIGNING_KEY_DIR = Path(env("IDLEGRID_SIGNING_KEY_DIR") or VAR_DIR / "keys").resolve()
IDLEGRID_MAX_ARTIFACT_BYTES = envint("IDLEGRID_MAX_ARTIFACT_BYTES", 256 * 1024 * 1024, low=1024)
IDLEGRID_LEASE_SECONDS = envint("IDLEGRID_LEASE_SECONDS", 120, low=2, high=86_400)
IDLEGRID_LEASE_RETRY_AFTER = envint("IDLEGRID_LEASE_RETRY_AFTER", 2, low=1, high=3600)
IDLEGRID_ENROLLMENT_TOKEN_SECONDS = envint("IDLEGRID_ENROLLMENT_TOKEN_SECONDS", 3600, low=60)
IDLEGRID_ENROLLMENTS_PER_HOUR = envint("IDLEGRID_ENROLLMENTS_PER_HOUR", 10, low=1)


def envfloat(name: str, default: float, *, low: float = 0.0, high: float = 1.0) -> float:
    value = env(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None
    if not low <= number <= high:
        raise ImproperlyConfigured(f"{name} must be between {low} and {high}, got {number}")
    return number


# Adaptive replication: a device earns trust after this many consecutive valid replicated results;
# a trusted device's units are then accepted on its word alone, except a random AUDIT_RATE of them.
# 100, not 20: a device cheating on 10% of its units (colluders confirming each other) earns trust in a
# quarter of its attempts at 20 and in about 1 of 700 at 100 (bench/sabotage.py), and a trusted
# colluder's word both gets wrong results accepted alone and can convict honest devices.
IDLEGRID_TRUST_THRESHOLD = envint("IDLEGRID_TRUST_THRESHOLD", 100, low=1, high=100_000)
IDLEGRID_AUDIT_RATE = envfloat("IDLEGRID_AUDIT_RATE", 0.1)
# Devices on probation get known-answer units mixed in at this rate. 0.05, not 0.1: with trusted confirmation
# and collusion bans doing most of the catching, 0.1 cost 0.022 results per unit and put the 200,000-unit
# colluding run at 1.3026; 0.05 gave 1.2955 with still no wrong unit left (bench/README.md, sabotage).
IDLEGRID_KNOWN_ANSWER_RATE = envfloat("IDLEGRID_KNOWN_ANSWER_RATE", 0.05)
# A banned device's valid results reported within this window are re-verified; earnings are held as long.
# Seconds are allowed (low=1) so the demo and the end-to-end tests can settle an epoch right after a job.
IDLEGRID_AUDIT_WINDOW_SECONDS = envint("IDLEGRID_AUDIT_WINDOW_SECONDS", 30 * 86_400, low=1)
# Once this many devices are trusted for a kind, a replicated unit is decided only with one of them in the
# agreeing quorum: devices on probation (new Sybil identities among them) cannot decide units among themselves.
IDLEGRID_TRUSTED_CONFIRMATION = envbool("IDLEGRID_TRUSTED_CONFIRMATION", True)
IDLEGRID_TRUSTED_POOL_MIN = envint("IDLEGRID_TRUSTED_POOL_MIN", 3, low=1)
# Units a device on probation may lease at once (BOINC's quota for new hosts).
IDLEGRID_PROBATION_BATCH = envint("IDLEGRID_PROBATION_BATCH", 1, low=1, high=1000)

# --- chain (marketplace/chain) --------------------------------------------------------------------
# All optional: without them the marketplace runs with no chain, and chain_client() says what is missing.
# `manage.py chain_deploy` prints these lines for a new deployment. The operator key signs publishRoot
# only; keep it in a file (IDLEGRID_CHAIN_OPERATOR_KEY_FILE) outside the repository.
IDLEGRID_CHAIN_RPC_URL = env("IDLEGRID_CHAIN_RPC_URL") or None
if IDLEGRID_CHAIN_RPC_URL and not IDLEGRID_CHAIN_RPC_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured(f"IDLEGRID_CHAIN_RPC_URL must be an http(s):// JSON-RPC URL, got {IDLEGRID_CHAIN_RPC_URL!r}")
IDLEGRID_CHAIN_CONTRACT = env("IDLEGRID_CHAIN_CONTRACT") or None
if IDLEGRID_CHAIN_CONTRACT and not re.fullmatch(r"0x[0-9a-fA-F]{40}", IDLEGRID_CHAIN_CONTRACT):
    raise ImproperlyConfigured(f"IDLEGRID_CHAIN_CONTRACT must be a 0x address, got {IDLEGRID_CHAIN_CONTRACT!r}")
IDLEGRID_CHAIN_OPERATOR_KEY = env("IDLEGRID_CHAIN_OPERATOR_KEY") or None
if IDLEGRID_CHAIN_OPERATOR_KEY and not re.fullmatch(r"(0x)?[0-9a-fA-F]{64}", IDLEGRID_CHAIN_OPERATOR_KEY):
    raise ImproperlyConfigured("IDLEGRID_CHAIN_OPERATOR_KEY must be 64 hex digits (the value is not shown)")
# Blocks a deposit or a published root must be buried under before it counts (reorganisations up to this).
IDLEGRID_CHAIN_CONFIRMATIONS = envint("IDLEGRID_CHAIN_CONFIRMATIONS", 2, low=0, high=10_000)
IDLEGRID_EPOCH_SECONDS = envint("IDLEGRID_EPOCH_SECONDS", 3600, low=1, high=366 * 86_400)

# --- ledger (marketplace/ledger) ------------------------------------------------------------------
# Amounts are integer base units of the payout token (wei-like: 10**18 per token for 18 decimals).
IDLEGRID_PRICE_PER_RESULT = envint("IDLEGRID_PRICE_PER_RESULT", 10**15, low=0)  # a job's spec may set its own
IDLEGRID_PLATFORM_FEE_BPS = envint("IDLEGRID_PLATFORM_FEE_BPS", 500, low=0, high=10_000)  # 500 = 5% of each result
# A job escrows price x units x this at submission; valid results past it are paid by the platform.
IDLEGRID_EXPECTED_REPLICATION = envint("IDLEGRID_EXPECTED_REPLICATION", 2, low=1, high=20)
IDLEGRID_WALLET_CHALLENGE_SECONDS = envint("IDLEGRID_WALLET_CHALLENGE_SECONDS", 600, low=10, high=86_400)
IDLEGRID_CHAIN_START_BLOCK = envint("IDLEGRID_CHAIN_START_BLOCK", 0)  # the deployment block: deposits are read from it
IDLEGRID_CHAIN_GAS_PRICE_WEI = envint("IDLEGRID_CHAIN_GAS_PRICE_WEI", 0) or None  # unset: the node's fee market
CELERY_BEAT_SCHEDULE["ledger-sweep"] = {"task": "ledger.sweep", "schedule": timedelta(seconds=max(60, IDLEGRID_SWEEP_SECONDS))}
if IDLEGRID_CHAIN_RPC_URL and IDLEGRID_CHAIN_CONTRACT:
    CELERY_BEAT_SCHEDULE.update({
        "ledger-settle-epoch": {"task": "ledger.settle_epoch", "schedule": timedelta(seconds=IDLEGRID_EPOCH_SECONDS)},
        "ledger-follow-deposits": {"task": "ledger.follow_deposits", "schedule": timedelta(seconds=15)},
        "ledger-reconcile-chain": {"task": "ledger.reconcile_chain", "schedule": timedelta(seconds=IDLEGRID_EPOCH_SECONDS)},
    })

# --- REST -----------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "marketplace.api.exception_handler.handle",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_THROTTLE_RATES": {"enroll": env("IDLEGRID_ENROLL_RATE") or "30/minute"},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Idlegrid API",
    "DESCRIPTION": "Submit AI jobs, follow them, download results; agents lease units and report signed results.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
# Served by whitenoise straight from the apps' static folders (Swagger UI and admin work offline,
# with no collectstatic step); plain storage, since the manifest variant breaks test servers.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL") or "INFO"},
}
