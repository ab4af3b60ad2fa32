"""JobStore: a job's record, status transitions (``_UPDATE``), events, metric series and leases (fencing)."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from app.core.jobs import TERMINAL_STATUSES
from app.core.store.ops import OpsCounters
from app.core.store.tenants import TenantQuotas
from app.core.webhooks import terminal_event

LEGAL_FROM: dict[str, tuple[str, ...]] = {
    "running": ("queued",),
    "succeeded": ("running",),
    "failed": ("queued", "running"),
    "cancelled": ("queued", "running"),
    "queued": ("running",),  # requeue: see requeue_lost / requeue_preempted
}

EVENTS_MAXLEN = 2000
METRICS_MAXLEN = 20_000

# KEYS: job hash, its event stream, its metrics list. ARGV: prefix, id, allowed current statuses (csv),
# new status ('' = keep), event type ('' = none), event time, event data (JSON), metric point (JSON or ''),
# lease guard ('' = none; '-' = KEYS[4], the job's lease, must not exist; else the hash's ``owner`` must
# equal it), webhook event id and body ('' = none: see app/core/webhooks.py), then field/value pairs.
# A job leaving ``running`` drops its owner and that owner's lease. A terminal change (the caller passes
# an event body only then) also puts one delivery per webhook endpoint of the job's tenant into the
# outbox (app/core/store/webhooks.py), in this same atomic step: no terminal status without its deliveries.
# The event is written in the same step as the change it reports, so a reader
# that sees a finished job has seen its last event too.
# Returns {1, old_status} when applied, {0, current_status} when not, {0, false} for an unknown job.
_UPDATE = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, false} end
local ok = false
for s in string.gmatch(ARGV[3], '[^,]+') do if s == cur then ok = true end end
if not ok then return {0, cur} end
if ARGV[9] == '-' then
  if redis.call('EXISTS', KEYS[4]) == 1 then return {0, cur} end
elseif ARGV[9] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[9] then
  return {0, cur}
end
if #ARGV > 11 then redis.call('HSET', KEYS[1], unpack(ARGV, 12)) end
if cur == 'running' and ARGV[4] ~= '' and ARGV[4] ~= cur then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner and redis.call('GET', KEYS[4]) == owner then redis.call('DEL', KEYS[4]) end
  redis.call('HDEL', KEYS[1], 'owner')
end
if ARGV[4] ~= '' and ARGV[4] ~= cur then
  redis.call('HSET', KEYS[1], 'status', ARGV[4])
  redis.call('ZREM', ARGV[1] .. ':jobs:' .. cur, ARGV[2])
  redis.call('ZADD', ARGV[1] .. ':jobs:' .. ARGV[4], 0, ARGV[2])
  local tenant = ARGV[11] ~= '' and redis.call('HGET', KEYS[1], 'tenant')
  if tenant then
    for _, wid in ipairs(redis.call('SMEMBERS', ARGV[1] .. ':tenant:' .. tenant .. ':webhooks')) do
      local did = ARGV[10] .. ':' .. wid
      redis.call('HSET', ARGV[1] .. ':webhooks:delivery:' .. did, 'webhook', wid, 'event', ARGV[10],
                 'job', ARGV[2], 'body', ARGV[11], 'attempts', 0)
      redis.call('ZADD', ARGV[1] .. ':webhooks:outbox', ARGV[6], did)
    end
  end
end
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV_EVENTS_MAXLEN, '*', 'type', ARGV[5], 'time', ARGV[6], 'data', ARGV[7])
end
if ARGV[8] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[8])
  redis.call('LTRIM', KEYS[3], -ARGV_METRICS_MAXLEN, -1)
end
return {1, cur}
""".replace("ARGV_EVENTS_MAXLEN", str(EVENTS_MAXLEN)).replace("ARGV_METRICS_MAXLEN", str(METRICS_MAXLEN))

# KEYS: a job's lease, the job hash. ARGV: token, TTL in ms, 'renew' | 'release'.
# renew: while the hash names the token as owner, (re)set the lease; returns 1, else 0 (the job is no
# longer this worker's). release: delete the lease if the token holds it.
_RENEW = """
if ARGV[3] == 'release' then
  if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if redis.call('HGET', KEYS[2], 'owner') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class JobStore(TenantQuotas, OpsCounters):
    """Every ``P:job:<id>*``, ``P:jobs*`` and ``P:tenant:<t>:jobs`` key; quotas and ops metrics come from the bases."""

    def __init__(self, client: redis.Redis, prefix: str = "ftaas") -> None:
        super().__init__(client, prefix)
        self._update = client.register_script(_UPDATE)
        self._renew = client.register_script(_RENEW)
        self.guard = ""  # the lease token every write of this store is fenced by ('' = none: the API)

    def _key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    # -- leases (app/core/lease.py) ---------------------------------------------------------------
    def leased(self, token: str) -> JobStore:
        """This store for the worker holding ``token``: its writes apply only while it owns the job."""
        view = JobStore(self.r, self.p)
        view.guard = token
        return view

    def claim(self, job_id: str, token: str, ttl_s: float, worker: str = "") -> int | None:
        """Start a queued job under a new lease; returns the attempt number, or None when the job is not
        queued or another worker's lease on it is alive (a duplicate or redelivered message)."""
        lease = f"{self._key(job_id)}:lease"
        if not self.r.set(lease, token, nx=True, px=int(ttl_s * 1000)):
            return None
        attempts, preempted, started = self.r.hmget(self._key(job_id), ["attempts", "preempted", "started_at"])
        # a resume after SIGTERM continues the same attempt: a deploy is not the job's fault
        attempt = int(attempts or 0) + (0 if preempted == "1" and attempts else 1)
        fields = {"attempts": attempt, "owner": token, "preempted": "", "started_at": started or time.time()}
        if self._apply(job_id, ("queued",), "running", fields,
                       ("started", {"attempt": attempt, "worker": worker}), guard="")[0]:
            return attempt
        self._renew(keys=[lease, self._key(job_id)], args=[token, 0, "release"])
        return None

    def renew_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        """Extend the lease (or take it again if it lapsed while nobody else took the job); False once
        the job is no longer this token's (requeued by the reaper, or finished)."""
        return bool(self._renew(keys=[f"{self._key(job_id)}:lease", self._key(job_id)],
                                args=[token, int(ttl_s * 1000), "renew"]))

    def owns(self, job_id: str, token: str) -> bool:
        return self.r.hget(self._key(job_id), "owner") == token

    def lost_jobs(self) -> list[str]:
        """Running jobs whose lease has expired: their worker is gone."""
        ids = self.running_ids()
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(f"{self._key(job_id)}:lease")
            return [j for j, alive in zip(ids, pipe.execute(), strict=True) if not alive]

    def requeue_lost(self, job_id: str, max_attempts: int) -> str | None:
        """A running job with no live lease: ``queued`` again to resume (the caller re-sends its task),
        ``failed`` with ``worker_lost`` after ``max_attempts`` starts, or ``cancelled`` if that was asked.
        Returns the new status, or None when the job was not lost (any more)."""
        attempts, cancel = self.r.hmget(self._key(job_id), ["attempts", "cancel_requested"])
        n = int(attempts or 0)
        done: dict[str, Any] = {"finished_at": time.time()}
        fields: dict[str, Any]
        event: tuple[str, dict[str, Any]]
        if cancel == "1":
            new, fields, event = "cancelled", done, ("cancelled", {"reason": "worker_lost"})
        elif n >= max_attempts:
            error = {"code": "worker_lost", "message": f"the worker running this job was lost {n} times "
                     f"(max_attempts {max_attempts}); the job may need more memory or time than a worker has"}
            new, fields, event = "failed", done | {"error": error}, ("failed", {"error": error})
        else:
            new, fields, event = "queued", {}, ("requeued", {"reason": "worker_lost", "attempt": n})
        return new if self._apply(job_id, ("running",), new, fields, event, guard="-")[0] else None

    def requeue_preempted(self, job_id: str, step: int) -> bool:
        """The worker was stopped (SIGTERM) and checkpointed at ``step``: ``queued`` again to resume.
        Fenced by this store's lease token."""
        return self._apply(job_id, ("running",), "queued", {"preempted": 1},
                           ("requeued", {"reason": "preempted", "step": step}))[0]

    # -- writes ---------------------------------------------------------------------------------
    def create(self, job_id: str, payload: dict[str, Any], public_request: dict[str, Any],
               total_steps: int, dataset_stats: dict[str, Any] | None = None, tenant: str | None = None) -> None:
        """Write the record (status ``queued``) and its first event before its task is enqueued."""
        now = time.time()
        progress = {"step": 0, "total_steps": total_steps, "fraction": 0.0, "eta_seconds": None, "phase": "queued",
                    "phase_progress": None}
        record: dict[str, Any] = {"status": "queued", "created_at": now, "name": payload.get("name") or "",
                  "request": json.dumps(public_request), "progress": json.dumps(progress)}
        if dataset_stats:
            record["dataset_stats"] = json.dumps(dataset_stats)
        if tenant:
            record["tenant"] = tenant
        with self.r.pipeline(transaction=True) as pipe:
            pipe.set(f"{self._key(job_id)}:payload", json.dumps(payload))
            pipe.hset(self._key(job_id), mapping=record)  # type: ignore[arg-type]
            pipe.xadd(f"{self._key(job_id)}:events", {"type": "queued", "time": now,
                                                      "data": json.dumps({"dataset_stats": dataset_stats})})
            pipe.zadd(f"{self.p}:jobs", {job_id: 0})
            pipe.zadd(f"{self.p}:jobs:queued", {job_id: 0})
            if tenant:
                pipe.zadd(f"{self.p}:tenant:{tenant}:jobs", {job_id: 0})
            pipe.execute()

    def _apply(self, job_id: str, allowed: tuple[str, ...], new_status: str, fields: dict[str, Any],
               event: tuple[str, dict[str, Any]] | None = None,
               metric: dict[str, Any] | None = None, guard: str | None = None) -> tuple[bool, str | None]:
        flat: list[Any] = []
        for k, v in fields.items():
            flat += [k, json.dumps(v) if isinstance(v, dict | list) else v]
        kind, data = event or ("", {})
        key, now = self._key(job_id), time.time()
        hook_id, hook_body = terminal_event(job_id, new_status, now) if new_status in TERMINAL_STATUSES else ("", "")
        applied, cur = self._update(
            keys=[key, f"{key}:events", f"{key}:metrics", f"{key}:lease"],
            args=[self.p, job_id, ",".join(allowed), new_status, kind, now, json.dumps(data),
                  json.dumps(metric) if metric else "", guard if guard is not None else self.guard,
                  hook_id, hook_body, *flat])
        return bool(applied), cur or None

    def transition(self, job_id: str, new_status: str, **fields: Any) -> tuple[bool, str | None]:
        """Move to ``new_status`` if legal from the current one; returns (applied, status before).

        The event named after the new status (``running`` is reported as ``started``) goes with it.
        """
        if new_status in TERMINAL_STATUSES:
            fields.setdefault("finished_at", time.time())
        if new_status == "running":
            fields.setdefault("started_at", time.time())
        data: dict[str, Any] = {k: fields[k] for k in ("error", "adapter") if k in fields}
        event = ("started" if new_status == "running" else new_status, data)
        return self._apply(job_id, LEGAL_FROM[new_status], new_status, fields, event)

    def add_event(self, job_id: str, kind: str, data: dict[str, Any], metric: dict[str, Any] | None = None,
                  **fields: Any) -> bool:
        """Log an event of a running job, optionally with a metric point and record fields."""
        return self._apply(job_id, ("running",), "", fields, (kind, data), metric)[0]

    def start(self, job_id: str) -> bool:
        return self.transition(job_id, "running")[0]

    def fail(self, job_id: str, code: str, message: str) -> bool:
        return self.transition(job_id, "failed", error={"code": code, "message": message})[0]

    def report_progress(self, job_id: str, step: int, total_steps: int, eta_seconds: float | None,
                        metrics: dict[str, float], point: dict[str, Any] | None = None,
                        phase: dict[str, Any] | None = None) -> bool:
        """Record progress, the latest metrics and a point of the metric series, with a ``step`` event.
        ``phase``: the phase fields of the progress object (``phase``, ``phase_progress``), when known.

        Ignored unless the job is running.
        """
        progress = {"step": step, "total_steps": total_steps,
                    "fraction": round(min(step / total_steps, 1.0), 4), "eta_seconds": eta_seconds, **(phase or {})}
        fields: dict[str, Any] = {"progress": progress}
        if metrics:
            fields["metrics"] = metrics
        event = ("step", {"step": step, "total_steps": total_steps, "eta_seconds": eta_seconds, **(point or metrics)})
        return self._apply(job_id, ("running",), "", fields, event, point)[0]

    def report_phase(self, job_id: str, progress: dict[str, Any]) -> bool:
        """Record the job's progress object as its phase changes or advances (worker/train/phases.py), with a
        ``phase`` event: {phase, done, total, eta_seconds}. Ignored unless the job is running."""
        within = progress.get("phase_progress") or {}
        data = {"phase": progress.get("phase"), **within, "eta_seconds": progress.get("eta_seconds")}
        return self._apply(job_id, ("running",), "", {"progress": progress}, ("phase", data))[0]

    def request_cancel(self, job_id: str) -> tuple[bool, str | None]:
        """Cancel: a queued job ends at once; a running one is flagged and stops at its next step.

        Returns (accepted, status before); status is None for an unknown job.
        """
        applied, cur = self._apply(job_id, ("queued",), "cancelled", {"finished_at": time.time()},
                                   ("cancelled", {}))
        if not applied and cur == "running":
            applied, cur = self._apply(job_id, ("running",), "", {"cancel_requested": 1},
                                       ("cancel_requested", {}))
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

    def page(self, limit: int, after: str | None = None, status: str | None = None,
             tenant: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; ``after`` is the last id of the previous page; ``tenant``: only its jobs."""
        if tenant is not None:
            ids = self._tenant_ids(tenant, limit + 1, after, status)
        else:
            index = f"{self.p}:jobs:{status}" if status else f"{self.p}:jobs"
            ids = self.r.zrevrangebylex(  # type: ignore[assignment]
                index, f"({after}" if after else "+", "-", start=0, num=limit + 1)
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids[:limit]:
                pipe.hgetall(self._key(job_id))
            raws = pipe.execute()
        return [_record(i, raw) for i, raw in zip(ids, raws, strict=False) if raw], len(ids) > limit

    def _tenant_ids(self, tenant: str, n: int, after: str | None, status: str | None) -> list[str]:
        """Up to ``n`` ids of the tenant's jobs older than ``after``, in ``status`` when given: the
        tenant's index is read newest first, in chunks, and filtered by each job's status."""
        index, cursor = f"{self.p}:tenant:{tenant}:jobs", f"({after}" if after else "+"
        found: list[str] = []
        while len(found) < n:
            chunk: list[str] = self.r.zrevrangebylex(index, cursor, "-", start=0, num=200)  # type: ignore[assignment]
            if status is None:
                found += chunk
            elif chunk:
                with self.r.pipeline(transaction=False) as pipe:
                    for job_id in chunk:
                        pipe.hget(self._key(job_id), "status")
                    found += [j for j, s in zip(chunk, pipe.execute(), strict=True) if s == status]
            if len(chunk) < 200:
                break
            cursor = f"({chunk[-1]}"
        return found[:n]

    def rewind_metrics(self, job_id: str, step: int) -> int:
        """A job resumed from its checkpoint at ``step`` trains the later steps again: drop their points
        (written before the worker was lost) so the series holds each step once. Returns how many went."""
        key = f"{self._key(job_id)}:metrics"
        with self.r.pipeline() as pipe:  # WATCH: a concurrent append makes the swap retry
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.lrange(key, 0, -1)
                    keep = [x for x in raw if json.loads(x).get("step", 0) <= step]  # type: ignore[union-attr]
                    if len(keep) == len(raw):  # type: ignore[arg-type]
                        return 0
                    pipe.multi()
                    pipe.delete(key)
                    if keep:
                        pipe.rpush(key, *keep)
                    pipe.execute()
                    return len(raw) - len(keep)  # type: ignore[arg-type]
                except redis.WatchError:
                    continue

    def metric_series(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(f"{self._key(job_id)}:metrics", 0, -1)]  # type: ignore[union-attr]

    def events(self, job_id: str, after: str | None = None, limit: int = 100,
               block_ms: int | None = None) -> list[dict[str, Any]]:
        """Events after the stream id ``after`` (oldest first); with ``block_ms``, wait for new ones."""
        key = f"{self._key(job_id)}:events"
        if block_ms is not None:
            reply: Any = self.r.xread({key: after or "0-0"}, count=limit, block=block_ms)
            entries = reply[0][1] if reply else []
        else:
            entries = self.r.xrange(key, f"({after}" if after else "-", "+", count=limit)  # type: ignore[assignment]
        return [{"id": eid, "type": f["type"], "time": float(f["time"]), "data": json.loads(f["data"]) or {}}
                for eid, f in entries]

    def ping(self) -> bool:
        return bool(self.r.ping())

    def running_ids(self) -> list[str]:
        return self.r.zrange(f"{self.p}:jobs:running", 0, -1)  # type: ignore[return-value]


def _record(job_id: str, raw: dict[str, str]) -> dict[str, Any]:
    def num(k: str) -> float | None:
        return float(raw[k]) if raw.get(k) else None

    def obj(k: str) -> Any:
        return json.loads(raw[k]) if raw.get(k) else None

    progress = obj("progress")
    if progress is not None and raw["status"] == "queued":  # also a job requeued after a worker was lost
        progress |= {"phase": "queued", "phase_progress": None, "eta_seconds": None}
    return {
        "id": job_id, "name": raw.get("name") or None, "status": raw["status"],
        "created_at": num("created_at"), "started_at": num("started_at"), "finished_at": num("finished_at"),
        "progress": progress, "metrics": obj("metrics") or {}, "request": obj("request"),
        "error": obj("error"), "adapter": raw.get("adapter") or None,
        "cancel_requested": raw.get("cancel_requested") == "1", "attempts": int(raw.get("attempts") or 0),
        "dataset_stats": obj("dataset_stats"), "evaluation": obj("evaluation"),
        "tenant": raw.get("tenant") or None,
    }

