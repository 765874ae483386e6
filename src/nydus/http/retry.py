"""The retry policy shared by the HTTP clients: which answers are worth repeating, how long to
wait (exponential backoff with jitter, or the server's ``Retry-After``), and how often.

``retry_limit`` in the backend configs counts *extra* attempts. Upstream's default 0 means no
retries; here 0 means :data:`DEFAULT_RETRIES` (:func:`effective_retries`), because a lazily
loaded file system should ride out one 503 or reset.

Threading: a policy is immutable; :class:`Attempts` (one request's budget) belongs to one thread.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RetryPolicy", "Attempts", "parse_retry_after", "DEFAULT_RETRIES", "effective_retries"]

log = logging.getLogger("nydus.http")

DEFAULT_RETRIES = 3


def effective_retries(retry_limit: int) -> int:
    """Retries for a configured ``retry_limit`` (0, the default, means DEFAULT_RETRIES)."""
    return retry_limit if retry_limit > 0 else DEFAULT_RETRIES


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    """``limit`` extra attempts on transport errors and on the ``statuses``; the n-th wait is
    ``backoff * 2**(n-1)`` (at most ``max_backoff``) times a jitter in [0.5, 1), or the
    server's ``Retry-After`` (at most ``max_retry_after``)."""

    limit: int = DEFAULT_RETRIES
    statuses: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})
    backoff: float = 0.2
    max_backoff: float = 5.0
    max_retry_after: float = 30.0
    sleep: Callable[[float], None] = time.sleep

    def attempts(self) -> Attempts:
        return Attempts(self)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        base = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return float(base * (0.5 + random.random() / 2))


class Attempts:
    """The retry budget of one request: :meth:`take` one, then :meth:`wait`."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.policy.limit:
            return False
        self.used += 1
        return True

    def wait(self, retry_after: float | None, why: str) -> None:
        delay = self.policy.delay(self.used, retry_after)
        log.info("retry %d/%d in %.2fs: %s", self.used, self.policy.limit, delay, why)
        if delay > 0:
            self.policy.sleep(delay)
