"""Service-wide operations metrics: jobs per status, Celery queue depths, ``P:stats`` counters, recent points."""

from __future__ import annotations

import json
from typing import Any

from app.core.store.base import _Store


class OpsCounters(_Store):
    """Part of JobStore: reads across jobs and queues for /metrics, and the ``P:stats`` counters."""

    def status_counts(self, statuses: tuple[str, ...]) -> dict[str, int]:
        """The size of each per-status index (``ZCARD P:jobs:<status>``)."""
        with self.r.pipeline(transaction=False) as pipe:
            for s in statuses:
                pipe.zcard(f"{self.p}:jobs:{s}")
            return dict(zip(statuses, (int(n) for n in pipe.execute()), strict=True))

    def queue_depths(self, keyprefix: str, queues: tuple[str, ...]) -> dict[str, int]:
        """Messages waiting in each Celery queue (not those a worker has taken), priority lists included."""
        with self.r.pipeline(transaction=False) as pipe:
            for q in queues:
                for key in _celery_queue_keys(keyprefix, q):
                    pipe.llen(key)
            lengths = iter(pipe.execute())
        return {q: sum(int(next(lengths)) for _ in _celery_queue_keys(keyprefix, q)) for q in queues}

    def latest_points(self, job_ids: list[str], n: int) -> dict[str, list[dict[str, Any]]]:
        """The last ``n`` points of each job's metric series, oldest first."""
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.lrange(f"{self.p}:job:{job_id}:metrics", -n, -1)
            return {j: [json.loads(x) for x in raw] for j, raw in zip(job_ids, pipe.execute(), strict=True)}

    def incr_stat(self, name: str, by: int = 1) -> int:
        """Add to a service-wide counter in ``P:stats``."""
        return int(self.r.hincrby(f"{self.p}:stats", name, by))  # type: ignore[arg-type]

    def stats(self) -> dict[str, int]:
        raw: dict[str, str] = self.r.hgetall(f"{self.p}:stats")  # type: ignore[assignment]
        return {k: int(v) for k, v in raw.items()}


def _celery_queue_keys(keyprefix: str, queue: str) -> list[str]:
    """kombu's Redis transport: one list per priority step, the bare name for priority 0."""
    return [f"{keyprefix}{queue}", *(f"{keyprefix}{queue}\x06\x16{pri}" for pri in (3, 6, 9))]

