"""GenerationStore: streamed generate requests (``P:gen:<id>``) and the generate workers' serving reports."""

from __future__ import annotations

import json
from typing import Any

from app.core.store.base import _Store

GEN_TTL_S = 600
SERVING_TTL_S = 90


class GenerationStore(_Store):
    """Streamed generate requests (worker writes, API reads) and the generate workers' loaded adapters."""

    def push(self, gen_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Append events (type, data) to the request's stream in one round trip."""
        key = f"{self.p}:gen:{gen_id}"
        with self.r.pipeline(transaction=False) as pipe:
            for kind, data in events:
                pipe.xadd(key, {"type": kind, "data": json.dumps(data)})
            pipe.expire(key, GEN_TTL_S)
            pipe.execute()

    def read(self, gen_id: str, after: str, block_ms: int) -> list[tuple[str, str, dict[str, Any]]]:
        """(stream id, type, data) of the events after ``after`` ("0-0": from the start); waits up to block_ms."""
        reply: Any = self.r.xread({f"{self.p}:gen:{gen_id}": after}, count=500, block=block_ms)
        return [(eid, f["type"], json.loads(f["data"])) for eid, f in (reply[0][1] if reply else [])]

    def drop(self, gen_id: str) -> None:
        self.r.delete(f"{self.p}:gen:{gen_id}")

    def set_serving(self, worker: str, loaded: dict[str, Any]) -> None:
        self.r.set(f"{self.p}:serving:{worker}", json.dumps(loaded), ex=SERVING_TTL_S)

    def serving(self) -> dict[str, dict[str, Any]]:
        """Every live generate worker's last report, by worker name."""
        keys = sorted(self.r.scan_iter(f"{self.p}:serving:*", count=100))
        raws: list[str | None] = self.r.mget(keys) if keys else []  # type: ignore[assignment]
        start = len(f"{self.p}:serving:")
        return {k[start:]: json.loads(raw) for k, raw in zip(keys, raws, strict=True) if raw}

