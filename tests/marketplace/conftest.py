import pytest
from django.core.cache import cache


@pytest.fixture(autouse=True)
def isolated(artifact_dir, enqueued):
    """Every marketplace test stores artifacts under its own tmp_path and sends no task to a broker;
    throttle counters (kept in the cache) start from zero."""
    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    # PBKDF2 costs ~0.4 s per persona; these tests check authorisation, not password hashing.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def signing_key_dir(settings, tmp_path):
    """The marketplace's unit-signing keys of this test live under its tmp_path, never under var/."""
    settings.IDLEGRID_SIGNING_KEY_DIR = tmp_path / "keys"
    return settings.IDLEGRID_SIGNING_KEY_DIR


@pytest.fixture(autouse=True)
def probation_batch(settings):
    """Most tests lease several units to a fresh device to test leasing itself; the quota that holds a
    device on probation to one unit per request has its own tests (workunits/test_trusted_confirmation.py)."""
    settings.IDLEGRID_PROBATION_BATCH = 100
