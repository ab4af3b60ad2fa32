"""The job store: the one module that owns every Redis key and every job status transition.

Keys (``P`` is ``settings.redis_prefix``):
  ``P:job:<id>``          hash: status, times, public request, progress, metrics, error, adapter
  ``P:job:<id>:payload``  the full accepted request (inline rows included), read by the worker
  ``P:jobs``              sorted set of every job id (score 0, ordered by id = by creation time)
  ``P:jobs:<status>``     the same, one per status, for filtered listing

Job records have no TTL: nothing a user made disappears on its own.
Transitions run as one Lua script, so only legal ones happen, atomically:
  queued -> running | cancelled | failed;  running -> succeeded | failed | cancelled.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any

import redis

from app.schemas import TERMINAL_STATUSES

LEGAL_FROM: dict[str, tuple[str, ...]] = {
    "running": ("queued",),
    "succeeded": ("running",),
    "failed": ("queued", "running"),
    "cancelled": ("queued", "running"),
}

# KEYS[1] job hash. ARGV: prefix, id, allowed current statuses (csv), new status ('' = keep), field/value pairs.
# Returns {1, old_status} when applied, {0, current_status} when not, {0, false} for an unknown job.
_UPDATE = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, false} end
local ok = false
for s in string.gmatch(ARGV[3], '[^,]+') do if s == cur then ok = true end end
if not ok then return {0, cur} end
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
if ARGV[4] ~= '' and ARGV[4] ~= cur then
  redis.call('HSET', KEYS[1], 'status', ARGV[4])
  redis.call('ZREM', ARGV[1] .. ':jobs:' .. cur, ARGV[2])
  redis.call('ZADD', ARGV[1] .. ':jobs:' .. ARGV[4], 0, ARGV[2])
end
return {1, cur}
"""


_last_us = 0
_id_lock = threading.Lock()


def new_job_id() -> str:
    """``job_`` + 13 hex digits of microseconds (strictly increasing in a process) + 9 random.

    Ids sort by creation time, so the job index needs no separate score.
    """
    global _last_us
    with _id_lock:
        _last_us = max(time.time_ns() // 1000, _last_us + 1)
        return f"job_{_last_us:013x}{secrets.token_hex(5)[:9]}"


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "ftaas") -> None:
        self.r = client
        self.p = prefix
        self._update = client.register_script(_UPDATE)

    @classmethod
    def from_url(cls, url: str, prefix: str = "ftaas") -> JobStore:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30
        )
        return cls(client, prefix)

    def _key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    # -- writes ---------------------------------------------------------------------------------
    def create(self, job_id: str, payload: dict[str, Any], public_request: dict[str, Any],
               total_steps: int) -> None:
        """Write the record (status ``queued``) before its task is enqueued."""
        now = time.time()
        progress = {"step": 0, "total_steps": total_steps, "fraction": 0.0, "eta_seconds": None}
        with self.r.pipeline(transaction=True) as pipe:
            pipe.set(f"{self._key(job_id)}:payload", json.dumps(payload))
            pipe.hset(self._key(job_id), mapping={
                "status": "queued", "created_at": now, "name": payload.get("name") or "",
                "request": json.dumps(public_request), "progress": json.dumps(progress),
            })
            pipe.zadd(f"{self.p}:jobs", {job_id: 0})
            pipe.zadd(f"{self.p}:jobs:queued", {job_id: 0})
            pipe.execute()

    def _apply(self, job_id: str, allowed: tuple[str, ...], new_status: str,
               fields: dict[str, Any]) -> tuple[bool, str | None]:
        flat: list[Any] = []
        for k, v in fields.items():
            flat += [k, json.dumps(v) if isinstance(v, dict) else v]
        applied, cur = self._update(keys=[self._key(job_id)],
                                    args=[self.p, job_id, ",".join(allowed), new_status, *flat])
        return bool(applied), cur or None

    def transition(self, job_id: str, new_status: str, **fields: Any) -> tuple[bool, str | None]:
        """Move to ``new_status`` if legal from the current one; returns (applied, status before)."""
        if new_status in TERMINAL_STATUSES:
            fields.setdefault("finished_at", time.time())
        if new_status == "running":
            fields.setdefault("started_at", time.time())
        return self._apply(job_id, LEGAL_FROM[new_status], new_status, fields)

    def start(self, job_id: str) -> bool:
        return self.transition(job_id, "running")[0]

    def fail(self, job_id: str, code: str, message: str) -> bool:
        return self.transition(job_id, "failed", error={"code": code, "message": message})[0]

    def report_progress(self, job_id: str, step: int, total_steps: int, eta_seconds: float | None,
                        metrics: dict[str, float]) -> bool:
        """Record progress and the latest metrics; ignored unless the job is running."""
        progress = {"step": step, "total_steps": total_steps,
                    "fraction": round(min(step / total_steps, 1.0), 4), "eta_seconds": eta_seconds}
        fields: dict[str, Any] = {"progress": progress}
        if metrics:
            fields["metrics"] = metrics
        return self._apply(job_id, ("running",), "", fields)[0]

    def request_cancel(self, job_id: str) -> tuple[bool, str | None]:
        """Cancel: a queued job ends at once; a running one is flagged and stops at its next step.

        Returns (accepted, status before); status is None for an unknown job.
        """
        applied, cur = self._apply(job_id, ("queued",), "cancelled", {"finished_at": time.time()})
        if not applied and cur == "running":
            applied, cur = self._apply(job_id, ("running",), "", {"cancel_requested": 1})
        return applied, cur

    # -- reads ----------------------------------------------------------------------------------
    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self._key(job_id), "cancel_requested") == "1"

    def payload(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.get(f"{self._key(job_id)}:payload")
        return json.loads(raw) if raw else None  # type: ignore[arg-type]

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw: dict[str, str] = self.r.hgetall(self._key(job_id))  # type: ignore[assignment]
        return _record(job_id, raw) if raw else None

    def list(self, limit: int, after: str | None = None,
             status: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; ``after`` is the last id of the previous page."""
        index = f"{self.p}:jobs:{status}" if status else f"{self.p}:jobs"
        ids: list[str] = self.r.zrevrangebylex(  # type: ignore[assignment]
            index, f"({after}" if after else "+", "-", start=0, num=limit + 1)
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids[:limit]:
                pipe.hgetall(self._key(job_id))
            raws = pipe.execute()
        return [_record(i, raw) for i, raw in zip(ids, raws, strict=False) if raw], len(ids) > limit

    def ping(self) -> bool:
        return bool(self.r.ping())


def _record(job_id: str, raw: dict[str, str]) -> dict[str, Any]:
    def num(k: str) -> float | None:
        return float(raw[k]) if raw.get(k) else None

    def obj(k: str) -> Any:
        return json.loads(raw[k]) if raw.get(k) else None

    return {
        "id": job_id, "name": raw.get("name") or None, "status": raw["status"],
        "created_at": num("created_at"), "started_at": num("started_at"), "finished_at": num("finished_at"),
        "progress": obj("progress"), "metrics": obj("metrics") or {}, "request": obj("request"),
        "error": obj("error"), "adapter": raw.get("adapter") or None,
        "cancel_requested": raw.get("cancel_requested") == "1",
    }
