"""WebhookStore: tenants' webhook endpoints and the delivery outbox.

The outbox is written by the job store's transition script (jobs.py ``_UPDATE``), in the same atomic step
as a job's terminal status: a job cannot end without its pending deliveries being recorded, and a
delivery cannot be recorded for a status change that did not happen. This module owns the rest of the
outbox's life: claiming due entries (``_CLAIM``, atomic, so several API processes never send one entry at
the same time), rescheduling after a failed attempt, and dropping an entry once delivered or given up.
Entries live in Redis until then, so a restarted API carries on where the old one stopped.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from app.core.ids import new_id
from app.core.store.base import _Store

#: Delivered or given-up deliveries are kept this long for inspection, then expire.
DELIVERY_TTL_S = 7 * 24 * 3600

# KEYS: the outbox. ARGV: now, claim seconds, most entries, the delivery hash prefix (``P:webhooks:delivery:``).
# Takes the due entries (score <= now), moves each one's score to now + claim seconds (another loop will
# not take it meanwhile; if this process dies mid-attempt the entry is due again then) and counts the
# attempt. Returns {delivery id, attempt number, ...}.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, d in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), d)
  out[#out + 1] = d
  out[#out + 1] = redis.call('HINCRBY', ARGV[4] .. d, 'attempts', 1)
end
return out
"""


class WebhookStore(_Store):
    """``P:webhook:<id>``, ``P:webhooks``, ``P:tenant:<t>:webhooks``, ``P:webhooks:outbox`` and
    ``P:webhooks:delivery:<delivery id>`` (the outbox entries are created by jobs.py ``_UPDATE``)."""

    def __init__(self, client: redis.Redis, prefix: str = "ftaas") -> None:
        super().__init__(client, prefix)
        self._claim = client.register_script(_CLAIM)

    @property
    def outbox(self) -> str:
        return f"{self.p}:webhooks:outbox"

    def _key(self, webhook_id: str) -> str:
        return f"{self.p}:webhook:{webhook_id}"

    def _delivery(self, delivery_id: str) -> str:
        return f"{self.p}:webhooks:delivery:{delivery_id}"

    # -- endpoints --------------------------------------------------------------------------------
    def create(self, tenant: str, url: str, secret: str) -> dict[str, Any]:
        """Record an endpoint of ``tenant``; the record (with its secret)."""
        webhook_id = new_id("wh")
        record = {"id": webhook_id, "url": url, "secret": secret, "tenant": tenant, "created_at": time.time()}
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(webhook_id), mapping=record)  # type: ignore[arg-type]
            pipe.sadd(f"{self.p}:tenant:{tenant}:webhooks", webhook_id)
            pipe.zadd(f"{self.p}:webhooks", {webhook_id: 0})
            pipe.execute()
        return record

    def get(self, webhook_id: str) -> dict[str, Any] | None:
        raw: dict[str, str] = self.r.hgetall(self._key(webhook_id))  # type: ignore[assignment]
        return _record(raw) if raw else None

    def count(self, tenant: str) -> int:
        return int(self.r.scard(f"{self.p}:tenant:{tenant}:webhooks"))  # type: ignore[arg-type]

    def endpoints(self, tenant: str | None) -> list[dict[str, Any]]:
        """Oldest first: ``tenant``'s endpoints, or every tenant's (None)."""
        if tenant is None:
            ids: list[str] = self.r.zrange(f"{self.p}:webhooks", 0, -1)  # type: ignore[assignment]
        else:
            ids = sorted(self.r.smembers(f"{self.p}:tenant:{tenant}:webhooks"))  # type: ignore[arg-type]
        with self.r.pipeline(transaction=False) as pipe:
            for webhook_id in ids:
                pipe.hgetall(self._key(webhook_id))
            return [_record(raw) for raw in pipe.execute() if raw]

    def delete(self, webhook_id: str) -> bool:
        """Remove the endpoint; its pending deliveries are dropped by the delivery loop when it meets them."""
        found = self.get(webhook_id)
        if found is None:
            return False
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(webhook_id))
            pipe.srem(f"{self.p}:tenant:{found['tenant']}:webhooks", webhook_id)
            pipe.zrem(f"{self.p}:webhooks", webhook_id)
            pipe.execute()
        return True

    # -- the outbox -----------------------------------------------------------------------------
    def claim(self, now: float, claim_s: float, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` due deliveries as (delivery id, attempt number), each held for ``claim_s``."""
        flat = self._claim(keys=[self.outbox], args=[now, claim_s, limit, self._delivery("")])
        return [(str(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    def delivery(self, delivery_id: str) -> dict[str, str]:
        """The entry's hash: ``webhook``, ``event`` (the event id), ``job``, ``body`` (the JSON sent),
        ``attempts``; after attempts also ``last_error``, ``status`` (``delivered`` | ``given_up``)."""
        return self.r.hgetall(self._delivery(delivery_id))  # type: ignore[return-value]

    def retry_at(self, delivery_id: str, when: float, error: str) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self._delivery(delivery_id), "last_error", error)
            pipe.zadd(self.outbox, {delivery_id: when}, xx=True)
            pipe.execute()

    def finish(self, delivery_id: str, status: str, error: str = "") -> None:
        """Out of the outbox for good: ``delivered`` or ``given_up``; the entry expires later."""
        key = self._delivery(delivery_id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.zrem(self.outbox, delivery_id)
            pipe.hset(key, mapping={"status": status, "last_error": error})
            pipe.expire(key, DELIVERY_TTL_S)
            pipe.execute()

    def pending(self) -> int:
        return int(self.r.zcard(self.outbox))  # type: ignore[arg-type]


def _record(raw: dict[str, str]) -> dict[str, Any]:
    return {"id": raw["id"], "url": raw["url"], "secret": raw["secret"], "tenant": raw["tenant"],
            "created_at": float(raw["created_at"])}
