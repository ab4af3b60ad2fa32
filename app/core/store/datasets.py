"""DatasetStore: uploaded datasets' metadata, the tenants' dataset indexes and the jobs that train on them."""

from __future__ import annotations

import json
from typing import Any

import redis

from app.core.store.base import _Store

# KEYS: dataset key, its jobs set, the dataset index. ARGV: prefix, id.
# Returns {1} when deleted, {-1} for an unknown dataset, {0, job ids...} while queued or running jobs use it.
_DELETE_DATASET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local busy = {0}
for _, job in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local s = redis.call('HGET', ARGV[1] .. ':job:' .. job, 'status')
  if s == 'queued' or s == 'running' then table.insert(busy, job) end
end
if #busy > 1 then return busy end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return {1}
"""

# KEYS: dataset key, its jobs set. ARGV: job id. Links only while the dataset exists: 1 when linked, else 0.
_LINK_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""


class DatasetStore(_Store):
    """Metadata of uploaded datasets and the jobs that use them; the rows live in the dataset folder."""

    def __init__(self, client: redis.Redis, prefix: str = "ftaas") -> None:
        super().__init__(client, prefix)
        self._delete = client.register_script(_DELETE_DATASET)
        self._link = client.register_script(_LINK_JOB)

    def _key(self, ds_id: str) -> str:
        return f"{self.p}:dataset:{ds_id}"

    def create(self, ds_id: str, meta: dict[str, Any]) -> None:
        """Record an upload; ``meta["tenant"]`` (when set) owns it and lists it."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self._key(ds_id), json.dumps(meta))
            pipe.zadd(f"{self.p}:datasets", {ds_id: 0})
            if meta.get("tenant"):
                pipe.zadd(f"{self.p}:tenant:{meta['tenant']}:datasets", {ds_id: 0})
            pipe.execute()

    def get(self, ds_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._key(ds_id))
        return json.loads(raw) if raw else None  # type: ignore[arg-type]

    def page(self, limit: int, after: str | None = None,
             tenant: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; ``after`` is the last id of the previous page; ``tenant``: only its uploads."""
        index = f"{self.p}:tenant:{tenant}:datasets" if tenant is not None else f"{self.p}:datasets"
        ids: list[str] = self.r.zrevrangebylex(  # type: ignore[assignment]
            index, f"({after}" if after else "+", "-", start=0, num=limit + 1)
        raws: list[str | None] = self.r.mget([self._key(i) for i in ids[:limit]]) if ids else []  # type: ignore[assignment]
        return [json.loads(raw) for raw in raws if raw], len(ids) > limit

    def link_job(self, ds_id: str, job_id: str) -> bool:
        """Record that ``job_id`` trains on the dataset; False when the dataset no longer exists."""
        return bool(self._link(keys=[self._key(ds_id), f"{self._key(ds_id)}:jobs"], args=[job_id]))

    def used_by(self, ds_id: str, job_id: str) -> bool:
        """Whether the API linked ``job_id`` to the dataset: it checked the job's caller owns it first."""
        return bool(self.r.sismember(f"{self._key(ds_id)}:jobs", job_id))

    def delete(self, ds_id: str) -> tuple[bool, list[str]]:
        """Delete the metadata unless a queued or running job uses the dataset, atomically.

        Returns (deleted, the ids of the jobs in the way); (False, []) for an unknown dataset.
        """
        key = self._key(ds_id)
        meta = self.get(ds_id)
        reply = self._delete(keys=[key, f"{key}:jobs", f"{self.p}:datasets"], args=[self.p, ds_id])
        if reply[0] == 1 and meta and meta.get("tenant"):  # type: ignore[index]
            self.r.zrem(f"{self.p}:tenant:{meta['tenant']}:datasets", ds_id)
        return reply[0] == 1, [str(j) for j in reply[1:]]  # type: ignore[index]

