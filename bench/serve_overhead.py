"""What the API + Celery round trip adds to one /generate request, on the CPU with the real service.

Starts the API (uvicorn) and a generate worker (the commands ``make run`` uses) under a private Redis key
prefix, sends sequential requests (tiny-gemma, one prompt, 1 new token, so the engine's own time is small),
and splits each request's client-side wall time into: engine (submit to result inside the worker,
``timing.engine_ms``), queue (API enqueue to task start, ``timing.queue_ms``), return (task end to the
API holding the result: ``total_ms - queue_ms - engine_ms``), and HTTP (``wall - total_ms``). Prints p50/p95
of each and of the overhead (wall - engine), for JSON answers and for ``"stream": true``.

Usage: python bench/serve_overhead.py [--n 60]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.queue import GENERATE_QUEUE, worker_argv  # noqa: E402
from app.serve import api_argv, local  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def one(client: httpx.Client, stream: bool) -> dict[str, float]:
    body = {"prompt": "Quote: Be", "max_new_tokens": 1, "stream": stream}
    t = time.monotonic()
    if stream:
        timing = None
        with client.stream("POST", "/generate", json=body) as resp:
            kind = None
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "done":
                    timing = json.loads(line[6:])["timing"]
        assert timing is not None
    else:
        resp = client.post("/generate", json=body)
        assert resp.status_code == 200, resp.text
        timing = resp.json()["timing"]
    wall = (time.monotonic() - t) * 1000
    return {"wall": wall, "engine": timing["engine_ms"], "queue": timing["queue_ms"],
            "return": timing["total_ms"] - timing["queue_ms"] - timing["engine_ms"],
            "http": wall - timing["total_ms"], "overhead": wall - timing["engine_ms"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    a = ap.parse_args()
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
    prefix = f"ftaas-overhead-{secrets.token_hex(3)}"
    port = 18000 + secrets.randbelow(1000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTAAS_")} | {
        "FTAAS_REDIS_URL": url, "FTAAS_REDIS_PREFIX": prefix, "FTAAS_DATA_DIR": tempfile.mkdtemp(),
        "FTAAS_DEVICE": "cpu", "FTAAS_DEFAULT_BASE_MODEL": "tiny-gemma", "HF_HUB_OFFLINE": "1"}
    logs = Path(tempfile.mkdtemp(prefix="overhead-logs-"))
    procs = [subprocess.Popen(local(argv), env=env, cwd=ROOT, stdout=(logs / f"{i}.log").open("wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
             for i, argv in enumerate([api_argv("127.0.0.1", port), worker_argv(GENERATE_QUEUE)])]
    rows: dict[str, list[dict[str, float]]] = {}
    health: list[float] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if client.post("/generate", json={"prompt": "x", "max_new_tokens": 1}).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"service not up; logs in {logs}")
                time.sleep(0.5)
            for _ in range(a.n):
                t = time.monotonic()
                client.get("/healthz")
                health.append((time.monotonic() - t) * 1000)
            for stream in (False, True):
                for _ in range(5):
                    one(client, stream)
                rows["stream" if stream else "json"] = [one(client, stream) for _ in range(a.n)]
    finally:
        for p in procs:
            os.killpg(p.pid, 15)
        for p in procs:
            p.wait(30)
        r = redis.Redis.from_url(url)
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)
    print(f"\nOVERHEAD TABLE (CPU, {a.n} sequential requests each, tiny-gemma, 1 new token; ms)")
    print("| answer | part | p50 | p95 | mean |")
    print("|---|---|---|---|---|")
    print(f"| GET /healthz (the HTTP floor) | wall | {pct(health, 50):.1f} | {pct(health, 95):.1f} | "
          f"{statistics.mean(health):.1f} |")
    for name, rs in rows.items():
        for part in ("wall", "engine", "overhead", "queue", "return", "http"):
            xs = [r[part] for r in rs]
            print(f"| {name} | {part} | {pct(xs, 50):.1f} | {pct(xs, 95):.1f} | {statistics.mean(xs):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
