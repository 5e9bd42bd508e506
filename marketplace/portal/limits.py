"""The API's rates, held by the portal's pages too: a page must not be a cheaper way to do what the API
limits (guess a password, quote or submit jobs, upload). A fixed window per person and scope in the shared
cache; the API's throttle is a layer apart (DRF's), so the portal keeps its own count at the same rate."""

from __future__ import annotations

import time

from django.conf import settings
from django.core.cache import cache


def within_rate(scope: str, *, user_id: int, counter: str = "") -> bool:
    """Count one more request of `scope` (a key of DEFAULT_THROTTLE_RATES) for the person; False past its rate.
    `counter` names a count of its own at the scope's rate (checks as you type must not use up submissions)."""
    count, _, period = settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"][scope].partition("/")
    window = settings.RATE_PERIODS[period]
    key = f"portal:rate:{scope}:{counter}:{user_id}:{int(time.time() // window)}"
    cache.add(key, 0, timeout=window + 1)
    try:
        requests = cache.incr(key)
    except ValueError:  # expired between add and incr
        requests = 1
    return requests <= int(count)
