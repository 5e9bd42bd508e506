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
def probation_leases(settings):
    """Most tests lease several units to a fresh device to test leasing itself; the quota that holds a
    device on probation to one lease at a time has its own tests (workunits/test_lease_policy.py)."""
    settings.IDLEGRID_PROBATION_LEASES = 100


@pytest.fixture(autouse=True)
def lease_oldest_first(settings):
    """Tests say which unit a device gets: leases go strictly oldest first. The random draw that keeps
    colluders from steering which units they share has its own tests (workunits/test_lease_policy.py)."""
    settings.IDLEGRID_LEASE_DRAW_WINDOW = 1


@pytest.fixture
def verification_budget(db):
    """verification_budget(amount=10**21): fund the platform's verification budget (known-answer copies are
    made only while it can pay for them), through the audited service as an operator would."""
    import uuid

    from marketplace.ledger.grants import verification_budget_fund

    def fund(amount: int = 10**21):
        return verification_budget_fund(amount=amount, actor="tests", reason="test budget", idempotency_key=uuid.uuid4().hex)

    return fund


@pytest.fixture
def people(django_user_model):
    """Twelve people (person0 ... person11), for tests that need devices of many distinct owners."""
    return [django_user_model.objects.create_user(f"person{i}") for i in range(12)]


@pytest.fixture
def trusted_device(make_device):
    """trusted_device(owner): a device with a trusted record for inference (as if it had earned it)."""
    from django.utils import timezone

    from marketplace.workers.models import DeviceTrust

    def make(owner, **options):
        enrolled = make_device(owner, **options)
        DeviceTrust.objects.create(device=enrolled.device, kind="inference", hardware_class=enrolled.device.hardware_class,
                                   consecutive_valid=1000, trusted_since=timezone.now())
        return enrolled

    return make
