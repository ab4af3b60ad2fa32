"""The Redis client every store uses, and ``_Store``: a client plus the key prefix of every key it writes."""

from __future__ import annotations

from typing import Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def redis_client(url: str) -> redis.Redis:
    """Short timeouts: an unreachable Redis is an error (the API's 503) within 2 s, not a hung request.

    One immediate retry on a connection error (a pooled connection that a Redis restart closed), none
    on a timeout (redis-py's default retries 3 times with backoff: seconds). Worst cases: refused, at
    once; no answer to connect, 2 x 0.5 s; connected but silent, 1.5 s (> the 1 s XREAD block of the
    SSE stream). Measured in tests/system/test_redis_restart.py.
    """
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=0.5, socket_timeout=1.5,
                                health_check_interval=30,
                                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))


class _Store:
    """A Redis client and the key prefix every key of this package starts with (listed in its docstring)."""

    def __init__(self, client: redis.Redis, prefix: str = "ftaas") -> None:
        self.r = client
        self.p = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str = "ftaas") -> Self:
        return cls(redis_client(url), prefix)

