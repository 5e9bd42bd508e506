"""Request rates per scope, counted in the shared cache (settings: REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]).

A view opts in with `throttle_scope = "<scope>"`. Who is counted: the device for device requests, the person
for people, and for anonymous requests the client address DRF's `get_ident` gives under NUM_PROXIES
(IDLEGRID_NUM_PROXIES: 0 means REMOTE_ADDR alone, so a forged X-Forwarded-For changes nothing).

How: a sliding window estimated from two fixed windows, this one's count plus the previous one's weighted
by how much of it the sliding window still covers (the estimate Cloudflare describes for its rate
limiting). Three numbers per (scope, client) in one cache entry, whatever the rate: DRF's
SimpleRateThrottle keeps one timestamp per request instead and rewrites the whole list every time, 1200
of them at report's default rate, more under IDLEGRID_THROTTLE_SCALE.

On Redis (the production cache) the check and the count are one Lua script: one round trip per request,
atomic, so concurrent requests of one client are each counted. Elsewhere (the embedded file cache) the
count is read, then written, as DRF's throttles do: requests of one client in flight at the same moment can
count once between them, so a client gets past the rate by at most its concurrency (the web server's
workers). Either way refused requests are not counted: a client that waits out Retry-After gets in.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.core.signals import setting_changed
from django.dispatch import receiver
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

from marketplace.workers.models import Device


def rate_of(scope: str) -> tuple[int, int]:
    """(requests allowed, window in seconds) of a scope; its rate is checked at settings load (envrate)."""
    count, _, period = api_settings.DEFAULT_THROTTLE_RATES[scope].partition("/")
    return int(count), settings.RATE_PERIODS[period]


# The IETF httpapi draft's fields (draft-ietf-httpapi-ratelimit-headers), on every answer of a throttled
# view: the rate's request count, what is left of it now, and seconds until that grows (docs/api/errors.md).
LIMIT_HEADER, REMAINING_HEADER, RESET_HEADER = "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"
POLICY_HEADER = "RateLimit-Policy"  # "<limit>;w=<window seconds>"


@dataclass(frozen=True)
class RateState:
    limit: int
    window: int
    remaining: int
    reset: int

    def headers(self) -> dict[str, str]:
        return {LIMIT_HEADER: str(self.limit), REMAINING_HEADER: str(self.remaining), RESET_HEADER: str(self.reset),
                POLICY_HEADER: f"{self.limit};w={self.window}"}


def _stash(request, state: RateState) -> None:
    # On Django's request, which the middleware below sees: DRF's Request wraps it.
    getattr(request, "_request", request).idlegrid_rate = state


class RateLimitHeadersMiddleware:
    """Adds the RateLimit-* fields to the answer of a request a ScopedThrottle counted (or refused)."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        state = getattr(request, "idlegrid_rate", None)
        if state is not None:
            for name, value in state.headers().items():
                response[name] = value
        return response


class ScopedThrottle(BaseThrottle):
    def __init__(self) -> None:
        self.wait_seconds: float | None = None

    def allow_request(self, request, view) -> bool:
        scope = getattr(view, "throttle_scope", None)
        # A view whose path also serves reads names them: a list must not spend the upload or submission budget.
        if not scope or request.method in getattr(view, "throttle_exempt_methods", ()):
            return True
        limit, window = rate_of(scope)
        key = f"throttle:{scope}:{self.client(request)}"
        now = time.time()
        slot = int(now // window)
        elapsed = now - slot * window
        redis_client = _redis()
        if redis_client is not None:
            allowed, current, previous = _count_on_redis(redis_client, key, now=now, window=window, limit=limit)
            estimate = current + previous * (1 - elapsed / window)
        else:
            current, previous = _counts(cache.get(key), slot)
            estimate = current + previous * (1 - elapsed / window)
            allowed = estimate + 1 <= limit
            if allowed:
                # Kept until the end of the next window, where this window's count is still the previous one.
                cache.set(key, (slot, current + 1, previous), timeout=math.ceil(2 * window - elapsed))
        if not allowed:
            self.wait_seconds = _wait(current, previous, limit=limit, window=window, elapsed=elapsed)
            _stash(request, RateState(limit, window, 0, math.ceil(max(self.wait_seconds, 1.0))))
            return False
        remaining = max(0, math.floor(limit - estimate - 1))
        # Until the fixed window ends (the estimate falls from then on); when nothing is left, until one more fits.
        reset = math.ceil(window - elapsed) if remaining else math.ceil(
            max(_wait(current + 1, previous, limit=limit, window=window, elapsed=elapsed), 1.0))
        _stash(request, RateState(limit, window, remaining, reset))
        return True

    def client(self, request) -> str:
        if isinstance(request.auth, Device):
            return f"device:{request.auth.pk}"
        if request.user is not None and request.user.is_authenticated:
            return f"user:{request.user.pk}"
        return f"addr:{self.get_ident(request)}"

    def wait(self) -> float | None:
        # At least a second: DRF sends Retry-After only when the wait it rounds up is not 0.
        return None if self.wait_seconds is None else max(self.wait_seconds, 1.0)


# The same estimate as the Python path above, checked and counted in one step on the Redis server: a hash
# of (slot, this window's count, the previous one's), kept until the end of the next window. Returns
# (allowed, this window's count, the previous window's), both before this request.
_COUNT_SCRIPT = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local slot = math.floor(now / window)
local elapsed = now - slot * window
local stored = redis.call('HMGET', KEYS[1], 's', 'c', 'p')
local s, c = tonumber(stored[1]), tonumber(stored[2]) or 0
local current, previous = 0, 0
if s == slot then current, previous = c, tonumber(stored[3]) or 0 elseif s == slot - 1 then previous = c end
if current + previous * (1 - elapsed / window) + 1 > limit then return {0, current, previous} end
redis.call('HSET', KEYS[1], 's', slot, 'c', current + 1, 'p', previous)
redis.call('EXPIRE', KEYS[1], math.ceil(2 * window - elapsed))
return {1, current, previous}
"""
_redis_state: dict[str, object] = {}


def _redis():
    """A Redis client of the cache's server when the cache is Redis (else None), made once per process.
    Django's RedisCache builds a client object for every call (copying redis-py's response callbacks,
    0.4 ms each, two per request); this one is kept, and redis-py's pool reconnects after a fork."""
    if "client" not in _redis_state:
        client = None
        options = settings.CACHES["default"]
        if options["BACKEND"] == "django.core.cache.backends.redis.RedisCache":
            import redis

            location = options["LOCATION"]
            client = redis.Redis.from_url(location if isinstance(location, str) else location[0])
            _redis_state["prefix"] = options.get("KEY_PREFIX") or ""
            _redis_state["script"] = client.register_script(_COUNT_SCRIPT)
        _redis_state["client"] = client
    return _redis_state["client"]


@receiver(setting_changed)
def _forget_redis(*, setting: str, **kwargs) -> None:
    if setting == "CACHES":  # tests switch the cache backend
        _redis_state.clear()


def _count_on_redis(client, key: str, *, now: float, window: int, limit: int) -> tuple[bool, int, int]:
    script = _redis_state["script"]
    allowed, current, previous = script(keys=[f"{_redis_state['prefix']}:{key}"], args=[repr(now), window, limit],
                                        client=client)
    return bool(allowed), int(current), int(previous)


def _counts(state: object, slot: int) -> tuple[int, int]:
    """(this window's count, the previous window's) from the stored (slot, count, previous count)."""
    if not (isinstance(state, tuple) and len(state) == 3 and all(isinstance(n, int) for n in state)):
        return 0, 0
    stored_slot, count, before = state
    if stored_slot == slot:
        return count, before
    if stored_slot == slot - 1:
        return 0, count
    return 0, 0


def _wait(current: int, previous: int, *, limit: int, window: int, elapsed: float) -> float:
    """Seconds until one more request fits under the estimate: in this window once the previous window's
    weight has fallen far enough, else in the next one, where this window's count is the one that decays."""
    if current + 1 <= limit and previous:
        at = window * (1 - (limit - 1 - current) / previous)
        if at < window:
            return max(at - elapsed, 0.0)
    later = window * max(0.0, 1 - (limit - 1) / current) if current else 0.0
    return window - elapsed + later
