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


def envrate(name: str, default: str) -> str:
    """A request rate as DRF writes it, "<count>/<second|minute|hour|day>", checked here rather than at the
    first request it would throttle."""
    value = env(name) or default
    count, _, period = value.partition("/")
    if not (count.isascii() and count.isdigit() and int(count) >= 1 and period in RATE_PERIODS):
        raise ImproperlyConfigured(f"{name} must look like 600/minute (per second, minute, hour or day), got {value!r}")
    return value


RATE_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}


# --- private files --------------------------------------------------------------------------------
# The var dir holds the embedded database (password hashes, token digests, the ledger), the unit-signing
# keys, throttle counters and mail: this process's user alone may read it. A folder or file of ours that is
# open to the group or others is narrowed; one owned by someone else is left as it is (chmod would fail).
def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _narrow(path)
    return path


def private_file(path: Path) -> Path:
    """Create the file 0600 if it is missing (O_CREAT applies the mode atomically, whatever the umask allows
    beyond it), else narrow it. SQLite gives its -wal and -shm files the database file's mode."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    _narrow(path)
    return path


def _narrow(path: Path) -> None:
    info = path.stat()
    if info.st_uid == os.getuid() and info.st_mode & 0o077:
        path.chmod(info.st_mode & 0o700)


DEBUG = envbool("DEBUG", False)
VAR_DIR = private_dir(Path(env("IDLEGRID_VAR_DIR") or BASE_DIR / "var").resolve())

IDLEGRID_PRODUCTION = envbool("IDLEGRID_PRODUCTION", False)
_DEV_SECRET = "idlegrid-insecure-development-key-do-not-use-in-production"
SECRET_KEY = env("SECRET_KEY") or _DEV_SECRET
if SECRET_KEY == _DEV_SECRET and IDLEGRID_PRODUCTION:
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
    "marketplace.portal",  # before allauth: its templates (allauth/layouts/base.html) override allauth's own
    "allauth",
    "allauth.account",
    "rest_framework",
    "knox",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_filters",
    "marketplace.core",
    "marketplace.accounts",
    "marketplace.artifacts",
    "marketplace.webhooks",
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
    "allauth.account.middleware.AccountMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "marketplace.api.throttling.RateLimitHeadersMiddleware",  # RateLimit-* on throttled views' answers
]

ROOT_URLCONF = "marketplace.urls"
WSGI_APPLICATION = "marketplace.wsgi.application"
ASGI_APPLICATION = "marketplace.asgi.application"  # the production server: gunicorn with uvicorn workers
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
                "marketplace.portal.context.portal",
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
    _sqlite_file = Path(str(DATABASES["default"]["NAME"]))
    if str(_sqlite_file) not in ("", ":memory:") and not str(_sqlite_file).startswith("file:") and _sqlite_file.parent.is_dir():
        # Made 0600 here, before Django's first connection would create it with the umask's mode (0644).
        private_file(_sqlite_file)

# Under ASGI (marketplace/asgi.py turns this on) Django runs each request's sync code in a thread made for that
# request, so a persistent connection would be opened per request and left behind with its thread (Django's
# docs: no persistent connections under ASGI). A pool per process instead: a connection is taken per use and
# given back at the request's end. Measured with bench/asgi_cost.py (docs/protocol.md, "Long poll").
IDLEGRID_DB_POOL = envbool("IDLEGRID_DB_POOL", False)
if IDLEGRID_DB_POOL and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1, "max_size": envint("IDLEGRID_DB_POOL_MAX", 8, low=1, high=1000), "timeout": 10}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Celery ---------------------------------------------------------------------------------------
CELERY_BROKER_URL = env("CELERY_BROKER_URL") or "filesystem://"
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = private_dir(VAR_DIR / "broker")
    for _folder in ("queue", "processed", "control"):
        private_dir(_broker_dir / _folder)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        # The folder is polled: at kombu's default of 1 s a worker took about one message a second, fewer
        # than beat sends with IDLEGRID_SWEEP_SECONDS=1, and a job's merge waited behind hundreds of sweeps.
        "polling_interval": 0.1,
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
# How long an Idempotency-Key and its first answer are kept (marketplace/api/idempotency.py): at least a day,
# Stripe's figure, so a client retrying through an outage of a day gets the first answer, not a second job.
IDLEGRID_IDEMPOTENCY_HOURS = envint("IDLEGRID_IDEMPOTENCY_HOURS", 24, low=24, high=24 * 30)
# Periodic tasks expire when their period has passed: the next one does the same work, and a backlog of
# stale sweeps (a worker that was busy or down) must not stand in front of a job's merge.
_PERIODIC = {"expires": IDLEGRID_SWEEP_SECONDS}
CELERY_BEAT_SCHEDULE = {
    "expire-leases": {"task": "workunits.expire_leases", "schedule": timedelta(seconds=IDLEGRID_SWEEP_SECONDS),
                      "options": _PERIODIC},
    "sweep": {"task": "workunits.sweep", "schedule": timedelta(seconds=IDLEGRID_SWEEP_SECONDS), "options": _PERIODIC},
    "purge-idempotency-keys": {"task": "api.purge_idempotency_keys", "schedule": timedelta(hours=1),
                               "options": {"expires": 3600}},
}

# --- Idlegrid -------------------------------------------------------------------------------------
IDLEGRID_ARTIFACT_DIR = Path(env("IDLEGRID_ARTIFACT_DIR") or VAR_DIR / "artifacts").resolve()

# --- artifact storage (marketplace/artifacts/storage.py) -------------------------------------------
# filesystem: files under IDLEGRID_ARTIFACT_DIR, one host (or a shared mount). s3: an S3-compatible bucket
# (AWS, MinIO, Ceph RGW...), what web and Celery on several hosts need. Without an access key, boto3's own
# chain applies (AWS_* variables, an instance or task role).
IDLEGRID_STORAGE = env("IDLEGRID_STORAGE") or "filesystem"
if IDLEGRID_STORAGE not in {"filesystem", "s3"}:
    raise ImproperlyConfigured(f"IDLEGRID_STORAGE must be filesystem or s3, got {IDLEGRID_STORAGE!r}")
IDLEGRID_S3_BUCKET = env("IDLEGRID_S3_BUCKET") or ""
if IDLEGRID_STORAGE == "s3" and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", IDLEGRID_S3_BUCKET):
    raise ImproperlyConfigured(f"IDLEGRID_S3_BUCKET must name a bucket (3-63 of a-z 0-9 . -) with IDLEGRID_STORAGE=s3, "
                               f"got {IDLEGRID_S3_BUCKET!r}")
# Keys are <prefix>ab/cd/<sha256>: a prefix such as "idlegrid/artifacts/" shares a bucket with other things.
IDLEGRID_S3_PREFIX = env("IDLEGRID_S3_PREFIX") or ""
if IDLEGRID_S3_PREFIX and (not re.fullmatch(r"([A-Za-z0-9_.-]+/)+", IDLEGRID_S3_PREFIX) or ".." in IDLEGRID_S3_PREFIX):
    raise ImproperlyConfigured(f"IDLEGRID_S3_PREFIX must be folder names each ending in / (a/b/), got {IDLEGRID_S3_PREFIX!r}")
IDLEGRID_S3_ENDPOINT_URL = env("IDLEGRID_S3_ENDPOINT_URL") or None  # unset: AWS itself
if IDLEGRID_S3_ENDPOINT_URL and not re.fullmatch(r"https?://[^\s/]+/?", IDLEGRID_S3_ENDPOINT_URL):
    raise ImproperlyConfigured(f"IDLEGRID_S3_ENDPOINT_URL must be http(s)://host[:port], got {IDLEGRID_S3_ENDPOINT_URL!r}")
IDLEGRID_S3_REGION = env("IDLEGRID_S3_REGION") or None
IDLEGRID_S3_ACCESS_KEY_ID = env("IDLEGRID_S3_ACCESS_KEY_ID") or None  # or IDLEGRID_S3_ACCESS_KEY_ID_FILE
IDLEGRID_S3_SECRET_ACCESS_KEY = env("IDLEGRID_S3_SECRET_ACCESS_KEY") or None  # or ..._FILE
if bool(IDLEGRID_S3_ACCESS_KEY_ID) != bool(IDLEGRID_S3_SECRET_ACCESS_KEY):
    raise ImproperlyConfigured("IDLEGRID_S3_ACCESS_KEY_ID and IDLEGRID_S3_SECRET_ACCESS_KEY go together (or neither: boto3's chain)")
# path: http://host/bucket/key (MinIO and most self-hosted servers); virtual: http://bucket.host/key.
IDLEGRID_S3_ADDRESSING_STYLE = env("IDLEGRID_S3_ADDRESSING_STYLE") or "auto"
if IDLEGRID_S3_ADDRESSING_STYLE not in {"auto", "path", "virtual"}:
    raise ImproperlyConfigured(f"IDLEGRID_S3_ADDRESSING_STYLE must be auto, path or virtual, got {IDLEGRID_S3_ADDRESSING_STYLE!r}")
# Uploads are spooled here while they are hashed (the key is known at the end), and local_path copies
# objects here for the readers that need a file: local disk, never the shared mount or the bucket.
IDLEGRID_STORAGE_TMP_DIR = Path(env("IDLEGRID_STORAGE_TMP_DIR") or VAR_DIR / "tmp").resolve()
# The Ed25519 keys that sign work units (marketplace/core/signing.py): private keys in files, never in
# the database; every web and Celery process must see the same directory.
IDLEGRID_SIGNING_KEY_DIR = Path(env("IDLEGRID_SIGNING_KEY_DIR") or VAR_DIR / "keys").resolve()
IDLEGRID_MAX_ARTIFACT_BYTES = envint("IDLEGRID_MAX_ARTIFACT_BYTES", 256 * 1024 * 1024, low=1024)
# Storage per person: the bytes of the artifacts they hold (uploads, their jobs' outputs and rounds), each
# counted once; an API upload past it is refused (413 quota_exceeded) and stores nothing. 10 GiB holds
# forty uploads at the per-upload limit above; devices' outputs are not counted (docs/api/artifacts.md).
IDLEGRID_ARTIFACT_QUOTA_BYTES = envint("IDLEGRID_ARTIFACT_QUOTA_BYTES", 10 * 1024**3, low=1024)
# An artifact nothing references is collected only this long after its bytes were last stored: a device's
# output waits at most a lease (IDLEGRID_LEASE_SECONDS plus the unit's time limit) for its report, and a
# day covers an upload made for a job that is submitted later the same day (marketplace/jobs/artifacts.py).
IDLEGRID_ARTIFACT_GC_GRACE_SECONDS = envint("IDLEGRID_ARTIFACT_GC_GRACE_SECONDS", 86_400, low=3600)
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
# Units one validation judges together (marketplace/workunits/verification_batch.py): its statements are per
# batch, not per unit, so a burst of reports costs a few batches. bench/pipeline.py measures the rate.
IDLEGRID_VALIDATE_BATCH = envint("IDLEGRID_VALIDATE_BATCH", 500, low=1, high=10_000)

# --- the lease policy (marketplace/workunits/leasing.py, docs/design.md "Lease policy") --------------
# Leases a device may hold at once, whatever it asks per request: a device trusted for nothing on its
# hardware class (a new device, a new Sybil identity) holds IDLEGRID_PROBATION_LEASES (BOINC's quota for
# new hosts: every unit it takes costs a replica); a trusted one up to IDLEGRID_MAX_LEASES.
IDLEGRID_PROBATION_LEASES = envint("IDLEGRID_PROBATION_LEASES", 1, low=1, high=1000)
IDLEGRID_MAX_LEASES = envint("IDLEGRID_MAX_LEASES", 64, low=1, high=10_000)
# A batch is drawn at random from the oldest this-many replicas a device may take (at least 4 per unit it
# asks for), so that who leases next cannot predict or steer which units it shares with whom; 1 leases
# strictly oldest first.
IDLEGRID_LEASE_DRAW_WINDOW = envint("IDLEGRID_LEASE_DRAW_WINDOW", 32, low=1, high=100_000)
# An agent that reports no capabilities (one older than capability matching) is matched as a CPU device
# with this much memory for a unit, running the kinds agents shipped then: it keeps every unit of a job
# with the default limits (unit_memory_mb 2048) and never gets a cuda unit or a larger one.
IDLEGRID_UNREPORTED_MEMORY_MB = envint("IDLEGRID_UNREPORTED_MEMORY_MB", 2048, low=0, high=1 << 24)
# A lease lives at most the unit's time limit plus this, however often it is renewed: a device cannot
# sit on a unit by heartbeating it.
IDLEGRID_LEASE_GRACE_SECONDS = envint("IDLEGRID_LEASE_GRACE_SECONDS", 60, low=1, high=86_400)
# A device that gives up on a unit (`fail`) leases nothing for this long and starts its trust run again.
IDLEGRID_GIVE_UP_COOLDOWN_SECONDS = envint("IDLEGRID_GIVE_UP_COOLDOWN_SECONDS", 60, low=0, high=86_400)
# A unit fails its job only when devices of this many distinct owners with validated work elsewhere gave up
# on it or let its lease expire (or three times as many owners of any kind): one owner, or a handful of
# fresh accounts that never computed anything right, can never fail someone else's job. Found by the
# adversary suite (tests/e2e/test_adversaries.py): four hostile accounts counted alone failed two jobs.
IDLEGRID_GIVE_UP_OWNERS = envint("IDLEGRID_GIVE_UP_OWNERS", 3, low=2, high=100)
# Software facts of a device (torch, environment) may change its hardware class at most this often a day;
# its CPU facts may not change at all (docs/protocol.md, "Hardware facts").
IDLEGRID_HARDWARE_CHANGES_PER_DAY = envint("IDLEGRID_HARDWARE_CHANGES_PER_DAY", 4, low=1, high=1000)

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
# Work the platform orders itself (known-answer copies, re-verification past a job's escrow) is paid at
# this reference price out of the verification budget (`manage.py verification_budget_fund`), never at a
# submitter's price; with the budget spent, the platform issues no such work (docs/ledger.md).
IDLEGRID_VERIFICATION_PRICE = envint("IDLEGRID_VERIFICATION_PRICE", 10**15, low=0, high=10**36)
# A decided unit is copied as a known answer at most this many times.
IDLEGRID_KNOWN_ANSWER_MAX_COPIES = envint("IDLEGRID_KNOWN_ANSWER_MAX_COPIES", 3, low=1, high=100)
IDLEGRID_WALLET_CHALLENGE_SECONDS = envint("IDLEGRID_WALLET_CHALLENGE_SECONDS", 600, low=10, high=86_400)
IDLEGRID_CHAIN_START_BLOCK = envint("IDLEGRID_CHAIN_START_BLOCK", 0)  # the deployment block: deposits are read from it
IDLEGRID_CHAIN_GAS_PRICE_WEI = envint("IDLEGRID_CHAIN_GAS_PRICE_WEI", 0) or None  # unset: the node's fee market
CELERY_BEAT_SCHEDULE["collect-artifacts"] = {"task": "jobs.collect_artifacts", "schedule": timedelta(hours=1),
                                             "options": {"expires": 3600}}
CELERY_BEAT_SCHEDULE["ledger-sweep"] = {"task": "ledger.sweep", "schedule": timedelta(seconds=max(60, IDLEGRID_SWEEP_SECONDS)),
                                        "options": {"expires": max(60, IDLEGRID_SWEEP_SECONDS)}}
if IDLEGRID_CHAIN_RPC_URL and IDLEGRID_CHAIN_CONTRACT:
    CELERY_BEAT_SCHEDULE.update({
        "ledger-settle-epoch": {"task": "ledger.settle_epoch", "schedule": timedelta(seconds=IDLEGRID_EPOCH_SECONDS)},
        "ledger-follow-deposits": {"task": "ledger.follow_deposits", "schedule": timedelta(seconds=15)},
        "ledger-reconcile-chain": {"task": "ledger.reconcile_chain", "schedule": timedelta(seconds=IDLEGRID_EPOCH_SECONDS)},
    })

# --- the results archive (marketplace/workunits/archive.py) ------------------------------------------
# A finished job's results leave the hot table (workunits_result, where leases and reports run) once the job
# ended this long ago and every earning they made is settled. At least the audit window: a ban re-verifies
# the valid results of that window, and a held earning is settled by joining its result. The default adds
# a week so the windows that read recent results (price quotes, network figures: a day) see them all too.
IDLEGRID_ARCHIVE_AFTER_SECONDS = envint("IDLEGRID_ARCHIVE_AFTER_SECONDS", IDLEGRID_AUDIT_WINDOW_SECONDS + 7 * 86_400,
                                        low=1)
if IDLEGRID_ARCHIVE_AFTER_SECONDS < IDLEGRID_AUDIT_WINDOW_SECONDS:
    raise ImproperlyConfigured(f"IDLEGRID_ARCHIVE_AFTER_SECONDS ({IDLEGRID_ARCHIVE_AFTER_SECONDS}) must be at least "
                               f"IDLEGRID_AUDIT_WINDOW_SECONDS ({IDLEGRID_AUDIT_WINDOW_SECONDS})")
# One run moves at most BATCHES transactions of BATCH rows each: each transaction is short (it locks its own
# rows only, SKIP LOCKED), and a run ends well inside its period however large the backlog.
IDLEGRID_ARCHIVE_BATCH = envint("IDLEGRID_ARCHIVE_BATCH", 1000, low=1, high=10_000)
IDLEGRID_ARCHIVE_BATCHES = envint("IDLEGRID_ARCHIVE_BATCHES", 50, low=1, high=10_000)
IDLEGRID_ARCHIVE_SECONDS = envint("IDLEGRID_ARCHIVE_SECONDS", 60, low=1, high=86_400)
CELERY_BEAT_SCHEDULE["results-archive"] = {"task": "workunits.archive_results",
                                           "schedule": timedelta(seconds=IDLEGRID_ARCHIVE_SECONDS),
                                           "options": {"expires": IDLEGRID_ARCHIVE_SECONDS}}

# --- webhooks (marketplace/webhooks, docs/api/webhooks.md) ----------------------------------------------
# Receivers are the submitters' to choose: private, loopback, link-local and other non-public addresses are
# refused (SSRF, marketplace/webhooks/targets.py) unless this allows them (tests, the demo's loopback receivers).
IDLEGRID_WEBHOOKS_ALLOW_PRIVATE = envbool("IDLEGRID_WEBHOOKS_ALLOW_PRIVATE", False)
# Plain http:// receivers: refused in production unless allowed here (signatures do not hide the payload).
IDLEGRID_WEBHOOKS_ALLOW_HTTP = envbool("IDLEGRID_WEBHOOKS_ALLOW_HTTP", not IDLEGRID_PRODUCTION)
IDLEGRID_WEBHOOKS_MAX_ENDPOINTS = envint("IDLEGRID_WEBHOOKS_MAX_ENDPOINTS", 20, low=1, high=1000)
# One attempt, from connecting to the last byte read, as a whole (Svix and Stripe allow about 15 s).
IDLEGRID_WEBHOOKS_TIMEOUT_SECONDS = envint("IDLEGRID_WEBHOOKS_TIMEOUT_SECONDS", 10, low=1, high=30)
# job.progress goes out at most this often per job (and only when more units are decided than last time).
IDLEGRID_WEBHOOKS_PROGRESS_SECONDS = envint("IDLEGRID_WEBHOOKS_PROGRESS_SECONDS", 30, low=1, high=86_400)
# After a rotation the previous secret signs too for this long: a day, the retry schedule's own span.
IDLEGRID_WEBHOOKS_ROTATION_GRACE_SECONDS = envint("IDLEGRID_WEBHOOKS_ROTATION_GRACE_SECONDS", 86_400, low=0,
                                                  high=30 * 86_400)
# Deliveries run on their own Celery queue, so slow receivers never hold the workers that split and merge
# jobs: a worker must consume it (`celery worker -Q webhooks`; docker/compose.yaml runs one for it).
IDLEGRID_WEBHOOKS_QUEUE = env("IDLEGRID_WEBHOOKS_QUEUE") or "webhooks"
if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", IDLEGRID_WEBHOOKS_QUEUE):
    raise ImproperlyConfigured(f"IDLEGRID_WEBHOOKS_QUEUE must be a queue name (A-Z a-z 0-9 _ . -), got {IDLEGRID_WEBHOOKS_QUEUE!r}")
# Events, deliveries and attempts are kept this long (readable and replayable through the API), then purged
# hourly; an event still being delivered is kept until its delivery ends.
IDLEGRID_WEBHOOKS_RETENTION_DAYS = envint("IDLEGRID_WEBHOOKS_RETENTION_DAYS", 30, low=2, high=3650)
CELERY_TASK_ROUTES = {"webhooks.deliver": {"queue": IDLEGRID_WEBHOOKS_QUEUE}}
CELERY_BEAT_SCHEDULE["webhooks-sweep"] = {"task": "webhooks.sweep", "schedule": timedelta(seconds=IDLEGRID_SWEEP_SECONDS),
                                          "options": _PERIODIC}
CELERY_BEAT_SCHEDULE["webhooks-purge"] = {"task": "webhooks.purge", "schedule": timedelta(hours=1),
                                          "options": {"expires": 3600}}

# --- REST -----------------------------------------------------------------------------------------
# Request rates per throttle scope (marketplace/api/throttling.py), counted per device for device requests,
# per person for people and per client address for anonymous ones. The defaults sit well above what an
# honest agent sends (worker_agent/agent.py): idle, it polls every 5 s (--poll); busy, one lease per batch of
# 4 units and one upload and one report per unit, so 1200/minute is 20 units a second from one device; it
# heartbeats every lease_seconds/3, at most 90/minute with the shortest lease allowed (2 s).
# IDLEGRID_THROTTLE_SCALE multiplies every rate, for benchmarks that drive one device far faster than that.
IDLEGRID_THROTTLE_SCALE = envint("IDLEGRID_THROTTLE_SCALE", 1, low=1, high=1_000_000)
_THROTTLE_RATES = {
    "enroll": envrate("IDLEGRID_ENROLL_RATE", "30/minute"),  # per address
    "token": envrate("IDLEGRID_TOKEN_RATE", "10/minute"),  # logins (password guesses), per address
    "lease": envrate("IDLEGRID_LEASE_RATE", "600/minute"),
    "heartbeat": envrate("IDLEGRID_HEARTBEAT_RATE", "120/minute"),
    "fail": envrate("IDLEGRID_FAIL_RATE", "120/minute"),
    "report": envrate("IDLEGRID_REPORT_RATE", "1200/minute"),
    "upload": envrate("IDLEGRID_UPLOAD_RATE", "1200/minute"),  # devices and people alike
    "job_create": envrate("IDLEGRID_JOB_CREATE_RATE", "60/minute"),
    "wallet": envrate("IDLEGRID_WALLET_RATE", "20/minute"),  # challenges, links and cancels together
    # Webhook tests and replays, together: each makes us POST to a URL the caller chose (no amplifier for floods).
    "webhook_send": envrate("IDLEGRID_WEBHOOK_SEND_RATE", "30/minute"),
}
# Behind N proxies that each append to X-Forwarded-For, the client is the Nth address from the right. 0 (the
# default) keys anonymous requests on REMOTE_ADDR alone; DRF's own default (None) keys on the whole
# X-Forwarded-For header when there is one, which the client writes: a new value per guess was a new counter.
IDLEGRID_NUM_PROXIES = envint("IDLEGRID_NUM_PROXIES", 0, low=0, high=10)
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "marketplace.api.authentication.ApiTokenAuthentication",  # people's API tokens (knox), last use kept
        "rest_framework.authentication.SessionAuthentication",  # the admin
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Lists page by cursor (marketplace/api/pagination.py) and filter with django-filter FilterSets.
    "DEFAULT_PAGINATION_CLASS": "marketplace.api.pagination.IdCursorPagination",
    # OPTIONS names the view and its media types; the bodies are described by /api/schema/ (api/metadata.py).
    "DEFAULT_METADATA_CLASS": "marketplace.api.metadata.ViewMetadata",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "EXCEPTION_HANDLER": "marketplace.api.exception_handler.handle",
    # Every JSON body is parsed with limits on size, depth and count (marketplace/api/parsers.py).
    "DEFAULT_PARSER_CLASSES": ["marketplace.api.parsers.BoundedJSONParser"],
    "UNAUTHENTICATED_USER": None,
    # Throttles every view that names a `throttle_scope`; the others pass untouched (no cache round trip).
    "DEFAULT_THROTTLE_CLASSES": ["marketplace.api.throttling.ScopedThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        scope: f"{int(rate.partition('/')[0]) * IDLEGRID_THROTTLE_SCALE}/{rate.partition('/')[2]}"
        for scope, rate in _THROTTLE_RATES.items()
    },
    "NUM_PROXIES": IDLEGRID_NUM_PROXIES,
}

# --- people: passwords and API tokens --------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# API tokens (django-rest-knox): only a SHA-512 digest is stored; each expires after the TTL (no sliding
# renewal: a stolen token dies on schedule however much it is used). A login past the per-person limit
# revokes that person's oldest token (marketplace/accounts/services.py).
IDLEGRID_TOKEN_TTL_SECONDS = envint("IDLEGRID_TOKEN_TTL_SECONDS", 30 * 86_400, low=60, high=366 * 86_400)
IDLEGRID_TOKENS_PER_PERSON = envint("IDLEGRID_TOKENS_PER_PERSON", 20, low=1, high=1000)
REST_KNOX = {
    "TOKEN_TTL": timedelta(seconds=IDLEGRID_TOKEN_TTL_SECONDS),
    "TOKEN_LIMIT_PER_USER": IDLEGRID_TOKENS_PER_PERSON,
    "AUTO_REFRESH": False,
    "AUTH_HEADER_PREFIX": "Token",
}
# A new payout address replacing an active one takes effect this long after it was asked for (with the
# password), while payouts keep going to the old one and the person is told by email: a thief who got
# the password cannot redirect earnings before the owner can cancel (docs/ledger.md, "Wallets").
# 0 makes a replacement immediate, as the first address always is.
IDLEGRID_WALLET_CHANGE_DELAY_SECONDS = envint("IDLEGRID_WALLET_CHANGE_DELAY_SECONDS", 48 * 3600, low=0, high=90 * 86_400)

# --- cache (throttle counters) ---------------------------------------------------------------------
# Shared by every web process, so a limit holds however many workers and nodes answer. Redis when
# IDLEGRID_CACHE_URL names one, else the broker's Redis (Celery's keys are "celery", "_kombu.*", "unacked*":
# ours carry KEY_PREFIX). Never call cache.clear() on a shared Redis: Django's RedisCache clears by FLUSHDB.
# The embedded default is Django's file-based cache: every process on the machine shares the folder.
# Not the database cache: on SQLite each count would take the one write lock that lease and report
# queue for (IMMEDIATE transactions), and its every write runs a COUNT(*) over the table to cull.
IDLEGRID_CACHE_URL = env("IDLEGRID_CACHE_URL") or (CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) else None)
if IDLEGRID_CACHE_URL:
    if not IDLEGRID_CACHE_URL.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured(f"IDLEGRID_CACHE_URL must be redis://, rediss:// or unix://, got {IDLEGRID_CACHE_URL!r}")
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": IDLEGRID_CACHE_URL,
                          "KEY_PREFIX": env("IDLEGRID_CACHE_KEY_PREFIX") or "idlegrid"}}
else:
    # One small file per (scope, client); Django culls a random third past MAX_ENTRIES, which would forget
    # live counters, so the cap is far above the clients one machine serves.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                          "LOCATION": str(private_dir(VAR_DIR / "cache")), "OPTIONS": {"MAX_ENTRIES": 50_000}}}

# --- email (password resets, address verification, the payout-address change notice) -------------------
# SMTP when EMAIL_HOST is set; else every message is a file under var/mail (the embedded default: a
# newcomer reads the reset link there), or printed by the web process with IDLEGRID_EMAIL=console.
EMAIL_HOST = env("EMAIL_HOST") or ""
EMAIL_PORT = envint("EMAIL_PORT", 587, low=1, high=65_535)
EMAIL_HOST_USER = env("EMAIL_HOST_USER") or ""
EMAIL_HOST_PASSWORD = env("EMAIL_HOST_PASSWORD") or ""  # or EMAIL_HOST_PASSWORD_FILE
EMAIL_USE_TLS = envbool("EMAIL_USE_TLS", True)
EMAIL_USE_SSL = envbool("EMAIL_USE_SSL", False)
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ImproperlyConfigured("EMAIL_USE_TLS and EMAIL_USE_SSL cannot both be true (STARTTLS or TLS from the start)")
EMAIL_TIMEOUT = envint("EMAIL_TIMEOUT", 10, low=1, high=300)
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL") or "Idlegrid <idlegrid@localhost>"
_email_local = env("IDLEGRID_EMAIL") or "file"
if _email_local not in ("file", "console"):
    raise ImproperlyConfigured(f"IDLEGRID_EMAIL must be file or console (SMTP: set EMAIL_HOST), got {_email_local!r}")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
elif _email_local == "console":  # every message printed on the web process's output
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
else:
    EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    EMAIL_FILE_PATH = str(private_dir(VAR_DIR / "mail"))

# --- the portal and its accounts (marketplace/portal, django-allauth) -------------------------------
# Sign up, log in, log out and password reset by email, through allauth; sessions for the portal, tokens
# for the API (the same accounts). Logging in takes the username or the email address. Email addresses
# are asked for (a password reset needs one) and verified optionally: a link is mailed, nothing waits on it.
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",  # the API's username + password login, the admin
    "allauth.account.auth_backends.AuthenticationBackend",
]
ACCOUNT_LOGIN_METHODS = {"username", "email"}
ACCOUNT_FORMS = {"login": "marketplace.portal.forms.LoginForm"}
ACCOUNT_SIGNUP_FIELDS = ["username*", "email*", "password1*", "password2*"]
ACCOUNT_EMAIL_VERIFICATION = "optional"
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_LOGOUT_ON_PASSWORD_CHANGE = False
ACCOUNT_LOGIN_ON_PASSWORD_RESET = False
ACCOUNT_DEFAULT_HTTP_PROTOCOL = "https" if IDLEGRID_PRODUCTION else "http"
# allauth's own rate limits (sign-up, login failures, reset mails) count in the shared cache above.
ACCOUNT_RATE_LIMITS = {"signup": "20/m/ip", "login_failed": "10/m/ip,5/5m/key", "reset_password": "20/m/ip,5/m/key"}
LOGIN_URL = "account_login"
LOGIN_REDIRECT_URL = "portal:home"
ACCOUNT_LOGOUT_REDIRECT_URL = "portal:landing"
ACCOUNT_SIGNUP_REDIRECT_URL = "portal:home"
# The payout token as people see it: amounts are stored in base units and shown in tokens, with the
# base units on hover (TestToken "IGT" locally, 18 decimals like most ERC-20s).
IDLEGRID_TOKEN_SYMBOL = env("IDLEGRID_TOKEN_SYMBOL") or "IGT"
IDLEGRID_TOKEN_DECIMALS = envint("IDLEGRID_TOKEN_DECIMALS", 18, low=0, high=36)
# A device that has made a request within this long counts as online (the landing page's figures, the
# devices page).
IDLEGRID_DEVICE_ONLINE_SECONDS = envint("IDLEGRID_DEVICE_ONLINE_SECONDS", 120, low=10, high=86_400)
# Live views poll (htmx `every Ns`): no web worker is held per viewer between polls.
IDLEGRID_PORTAL_POLL_SECONDS = envint("IDLEGRID_PORTAL_POLL_SECONDS", 2, low=1, high=300)

# --- security and HTTPS ---------------------------------------------------------------------------
# Secure by default with IDLEGRID_PRODUCTION=true (`manage.py check --deploy` passes clean), off otherwise:
# the demo and the tests serve plain HTTP on loopback. Each can be set on its own.
SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", IDLEGRID_PRODUCTION)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # health checks probe the web process itself, over plain HTTP
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 31_536_000 if IDLEGRID_PRODUCTION else 0, low=0, high=2 * 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", IDLEGRID_PRODUCTION)
SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", IDLEGRID_PRODUCTION)
SESSION_COOKIE_SECURE = envbool("SESSION_COOKIE_SECURE", IDLEGRID_PRODUCTION)
CSRF_COOKIE_SECURE = envbool("CSRF_COOKIE_SECURE", IDLEGRID_PRODUCTION)
SECURE_CONTENT_TYPE_NOSNIFF = envbool("SECURE_CONTENT_TYPE_NOSNIFF", True)
# TLS ends at a proxy in front: it tells Django the scheme in this header, and must overwrite a client's copy.
_proxy_ssl_header = env("IDLEGRID_PROXY_SSL_HEADER") or ""
if _proxy_ssl_header:
    if not re.fullmatch(r"[A-Za-z0-9-]+", _proxy_ssl_header):
        raise ImproperlyConfigured(f"IDLEGRID_PROXY_SSL_HEADER must be a header name such as X-Forwarded-Proto, got {_proxy_ssl_header!r}")
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + _proxy_ssl_header.upper().replace("-", "_"), "https")

SPECTACULAR_SETTINGS = {
    "TITLE": "Idlegrid API",
    "DESCRIPTION": "Submit AI jobs, follow them, download results; agents lease units and report signed results.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Every operation's error answers, Idempotency-Key on POSTs, RateLimit-* and Retry-After on throttled ones
    # (marketplace/api/schema.py), after drf-spectacular's own enum hook.
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "marketplace.api.schema.postprocess"],
    "ENUM_NAME_OVERRIDES": {
        "ErrorCode": "marketplace.api.schema.ALL_CODES",
        "WebhookDeliveryStateEnum": "marketplace.webhooks.models.Delivery.State",
        "DeviceTypeEnum": "worker_agent.wire.DEVICE_TYPES",  # a job spec's device and a capabilities' device_type
    },
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = private_dir(VAR_DIR / "static")
# Served by whitenoise straight from the apps' static folders (Swagger UI and admin work offline,
# with no collectstatic step); plain storage, since the manifest variant breaks test servers.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# Artifacts and keys are read lazily by their modules; made here so that nothing under the var dir is ever
# created with the umask's mode.
for _folder in (IDLEGRID_ARTIFACT_DIR, IDLEGRID_SIGNING_KEY_DIR, IDLEGRID_STORAGE_TMP_DIR):
    private_dir(_folder)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL") or "INFO"},
}
