"""Request rate limits for the endpoints that guess-proof credentials: login, the device flow, tokens.

A token bucket per key (a client IP, an email, a user): ``burst`` requests at once, then one every
``per`` seconds. In process and in memory: with several control-plane replicas each enforces its own
limit, which still bounds guessing to (replicas x rate). Time is an input (``clock``), so tests drive it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from control_plane.config import Settings
from control_plane.errors import TooManyRequests

_MAX_KEYS = 100_000  # an attacker rotating keys must not grow memory without bound


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBucket:
    """``take(key)`` spends one token of ``key``'s bucket; returns 0 when allowed, else the seconds until
    the next token."""

    def __init__(self, burst: int, per: float, clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or per <= 0:
            raise ValueError("a rate limit needs burst >= 1 and per > 0")
        self.burst = burst
        self.per = per
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()  # sync endpoints run in worker threads

    def take(self, key: str) -> float:
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= _MAX_KEYS:
                    self._prune(now)
                bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), updated=now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) / self.per)
            bucket.updated = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) * self.per

    def _prune(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.updated) / self.per >= self.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= _MAX_KEYS:  # still full: forget the oldest half
            for key in sorted(self._buckets, key=lambda k: self._buckets[k].updated)[: _MAX_KEYS // 2]:
                del self._buckets[key]


class RateLimits:
    """The platform's limits, one bucket family per kind of endpoint (``Settings.rate_limit_*``)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        burst, per = settings.rate_limit_login
        self.login_ip = TokenBucket(burst, per, clock)
        # Per account too: a password guesser spread over many IPs still gets half the burst.
        self.login_email = TokenBucket(max(1, burst // 2), per, clock)
        self.device = TokenBucket(*settings.rate_limit_device, clock=clock)
        self.tokens = TokenBucket(*settings.rate_limit_tokens, clock=clock)

    @staticmethod
    def check(bucket: TokenBucket, key: str, what: str) -> None:
        """Raise :class:`TooManyRequests` (429, ``Retry-After``) when ``key`` is over ``bucket``'s rate."""
        wait = bucket.take(key)
        if wait > 0:
            raise TooManyRequests(
                f"Too many {what} from this client.",
                retry_after=wait,
                hint=f"Wait {max(1, round(wait))} s, then try again.",
            )
