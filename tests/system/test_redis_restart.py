"""Redis stopped and restarted under queued jobs: a private redis-server (own port and temp dir, AOF on,
fsync always), an API process pointed at it, then a train worker.

While Redis is away the API answers 503 ``store_unavailable`` within 2 s (refused connections, and a
Redis that accepts connections but does not answer); it recovers by itself when Redis is back; no
queued or finished job is lost, and the queued ones' messages survive and run.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.serve import redis_answers
from tests.conftest import ROOT, free_port, tiny_job, wait_for
from tests.faults import Cluster, cluster_env

API_BOUND_S = 2.0


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port, self.dir = free_port(), workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=(self.dir / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not redis_answers(self.url):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    if server.proc and server.proc.poll() is None:
        server.signal(signal.SIGCONT)
        server.kill()


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, service_env: dict[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("restart")
    env = cluster_env(service_env, tmp, FTAAS_REDIS_URL=redis_server.url)
    subprocess.run([sys.executable, "-m", "worker.models", "tiny-gemma"], env=env, cwd=ROOT, check=True)
    (tmp / "logs").mkdir()
    with Cluster(env, tmp / "logs") as c:
        c.api()
        yield c


def _timed(client: httpx.Client, method: str, path: str, **kw: Any) -> tuple[httpx.Response, float]:
    t = time.monotonic()
    resp = client.request(method, path, **kw)
    return resp, time.monotonic() - t


def _shown(path: str) -> str:
    return re.sub("job_[0-9a-f]+", "{id}", path)


def _queue_depth(client: httpx.Client) -> int:
    text = client.get("/metrics").text
    match = re.search(r'^ftaas_queue_depth\{queue="train"\} (\d+)', text, re.M)
    assert match, text
    return int(float(match.group(1)))


def test_jobs_survive_a_redis_restart_and_the_api_answers_503_meanwhile(
        redis_server: RedisServer, cluster: Cluster, quotes: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=cluster.url, timeout=30) as api:
        queued = [api.post("/jobs", json=tiny_job(quotes[:8], max_steps=1)).json()["id"] for _ in range(3)]
        finished = api.post("/jobs", json=tiny_job(quotes[:8], max_steps=1)).json()["id"]
        assert api.post(f"/jobs/{finished}/cancel").json()["status"] == "cancelled"
        before = {j["id"]: j for j in api.get("/jobs", params={"limit": 100}).json()["data"]}
        assert _queue_depth(api) == 4, "the cancelled job's message is still queued (dropped when consumed)"

        checks = [("GET", f"/jobs/{queued[0]}", {}), ("GET", "/jobs", {}),
                  ("POST", "/jobs", {"json": tiny_job(quotes[:8], max_steps=1)}), ("GET", "/readyz", {})]

        redis_server.signal(signal.SIGSTOP)  # connected but silent: a hung or partitioned Redis
        try:
            for method, path, kw in checks[:3]:
                resp, took = _timed(api, method, path, **kw)
                print(f"Redis hung: {method} {_shown(path)} -> {resp.status_code} in {took:.2f} s")
                assert resp.status_code == 503 and resp.json()["error"]["code"] == "store_unavailable", resp.text
                assert took < API_BOUND_S
        finally:
            redis_server.signal(signal.SIGCONT)

        redis_server.kill()  # SIGKILL: only what the AOF holds survives
        for method, path, kw in checks:
            resp, took = _timed(api, method, path, **kw)
            print(f"Redis down: {method} {_shown(path)} -> {resp.status_code} in {took:.2f} s")
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] in ("store_unavailable", "not_ready")
            assert took < API_BOUND_S

        redis_server.start()
        resp, took = _timed(api, "GET", "/jobs", params={"limit": 100})
        assert resp.status_code == 200, "recovered without a restart of the API"
        after = {j["id"]: j for j in resp.json()["data"]}
        assert after == before, "every queued and finished job is there, unchanged"
        assert _queue_depth(api) == 4, "and so are their messages"
        again = api.post("/jobs", json=tiny_job(quotes[:8], max_steps=1))
        assert again.status_code == 202, again.text

        cluster.worker("w")  # the queued jobs run now
        first = wait_for(api, queued[0], timeout=300)
        assert first["status"] == "succeeded", first["error"]
        for job_id in [*queued[1:], again.json()["id"]]:  # the others need no training to prove the point
            api.post(f"/jobs/{job_id}/cancel")
            assert wait_for(api, job_id, timeout=300)["status"] in ("cancelled", "succeeded")
