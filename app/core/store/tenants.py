"""Per-tenant quotas: the queued + running job cap (``_RESERVE``) and the generate rate window."""

from __future__ import annotations

import time

import redis

from app.core.store.base import _Store

# KEYS: the tenant's active set. ARGV: job prefix (``P:job:``), new job id, now, cap.
# Drops ended jobs (and reservations whose job was never written, after 60 s), then takes a slot
# for the new id unless the tenant already holds ``cap``. Returns 1 when taken, else 0.
_RESERVE = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local held = 0
for i = 1, #members, 2 do
  local s = redis.call('HGET', ARGV[1] .. members[i], 'status')
  if s == 'queued' or s == 'running' or (not s and tonumber(members[i + 1]) > tonumber(ARGV[3]) - 60) then
    held = held + 1
  else
    redis.call('ZREM', KEYS[1], members[i])
  end
end
if held >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return 1
"""


class TenantQuotas(_Store):
    """Part of JobStore: the keys ``P:tenant:<t>:active`` and ``P:tenant:<t>:generate:<n>``."""

    def __init__(self, client: redis.Redis, prefix: str = "ftaas") -> None:
        super().__init__(client, prefix)
        self._reserve = client.register_script(_RESERVE)

    def reserve_slot(self, tenant: str, job_id: str, cap: int) -> bool:
        """Take one of ``tenant``'s ``cap`` queued + running slots for a job about to be created."""
        return bool(self._reserve(keys=[f"{self.p}:tenant:{tenant}:active"],
                                  args=[f"{self.p}:job:", job_id, time.time(), cap]))

    def count_request(self, tenant: str, window_s: int) -> tuple[int, float]:
        """Count a generate request in the tenant's current fixed window: (count so far, seconds left)."""
        now = time.time()
        window = int(now // window_s)
        key = f"{self.p}:tenant:{tenant}:generate:{window}"
        with self.r.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, window_s + 1)
            count = int(pipe.execute()[0])
        return count, (window + 1) * window_s - now
