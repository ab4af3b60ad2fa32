"""A real out-of-memory in a training job, memory returning after each job, and cancel freeing the worker.

One private train worker whose training processes are capped at FTAAS_TRAIN_MEMORY_LIMIT_MB
(RLIMIT_DATA), so a job that asks for too much memory fails inside the cap instead of pushing the
machine into swap or the kernel's OOM killer.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, tiny_job, wait_for
from tests.faults import Cluster, cluster_env, events, rss_kb

MEMORY_LIMIT_MB = 3072  # a tiny-gemma job needs about 1 GiB


@pytest.fixture(scope="module")
def oom(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("oom")
    env = cluster_env(service_env, tmp, FTAAS_TRAIN_MEMORY_LIMIT_MB=str(MEMORY_LIMIT_MB))
    subprocess.run([sys.executable, "-m", "worker.models", "tiny-gemma"], env=env, cwd=ROOT, check=True)
    (tmp / "logs").mkdir()
    with Cluster(env, tmp / "logs") as c:
        c.api()
        c.worker("w")
        yield c


@pytest.fixture(scope="module")
def api(oom: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=oom.url, timeout=30) as c:
        yield c


def _child_pid(api: httpx.Client, job_id: str) -> int:
    started = next(e for e in events(api, job_id) if e["type"] == "started")
    return int(started["data"]["worker"].rsplit(":", 1)[1])


def test_out_of_memory_fails_the_job_and_the_worker_keeps_serving(oom: Cluster, api: httpx.Client,
                                                                   quotes: list[dict[str, Any]]) -> None:
    parent = oom.procs["w"].pid
    rss_before = rss_kb(parent)
    # 64 x 512 tokens x a 262,144-token vocabulary: the logits alone are 32 GiB
    long_rows = [{"quote": " ".join(q["quote"] for q in quotes[:30]) * 2, "author": "many"} for _ in range(64)]
    big = api.post("/jobs", json=tiny_job(long_rows, max_steps=2, batch_size=64, max_length=512)).json()
    small = api.post("/jobs", json=tiny_job(quotes[:8], max_steps=1)).json()

    failed = wait_for(api, big["id"], timeout=600)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "out_of_memory"
    assert "batch_size" in failed["error"]["message"] and "max_length" in failed["error"]["message"]
    done = wait_for(api, small["id"], timeout=600)
    assert done["status"] == "succeeded", done["error"]

    # every job ran in its own training process, which is gone: its memory went with it
    pids = [_child_pid(api, j) for j in (big["id"], small["id"])]
    assert pids[0] != pids[1]
    deadline = time.monotonic() + 30  # the process exits just after it records the job's end
    while any(Path(f"/proc/{p}").exists() for p in pids):
        assert time.monotonic() < deadline, "a finished job's training process is still there"
        time.sleep(0.2)
    rss_after = rss_kb(parent)
    print(f"OOM: worker parent RSS {rss_before / 1024:.0f} MiB before, {rss_after / 1024:.0f} MiB after two jobs")
    assert rss_after < rss_before + 30 * 1024, "the parent (which never trains) stays flat"
    assert oom.procs["w"].poll() is None


def test_cancel_frees_the_worker_for_the_next_job_at_once(oom: Cluster, api: httpx.Client,
                                                          quotes: list[dict[str, Any]]) -> None:
    long = api.post("/jobs", json=tiny_job(quotes[:16], max_steps=5000)).json()
    wait_for(api, long["id"], check=lambda j: j["progress"]["step"] >= 1, timeout=600)
    nxt = api.post("/jobs", json=tiny_job(quotes[:8], max_steps=1)).json()
    time.sleep(1)
    assert api.get(f"/jobs/{nxt['id']}").json()["status"] == "queued", "one job at a time per worker"
    cancelled_at = time.monotonic()
    assert api.post(f"/jobs/{long['id']}/cancel").status_code == 202
    wait_for(api, nxt["id"], {"running", "succeeded"}, timeout=120)
    took = time.monotonic() - cancelled_at
    print(f"cancel: the next queued job started {took:.1f} s after the running one was cancelled")
    assert api.get(f"/jobs/{long['id']}").json()["status"] == "cancelled"
    assert took < 30
    assert wait_for(api, nxt["id"], timeout=600)["status"] == "succeeded"
