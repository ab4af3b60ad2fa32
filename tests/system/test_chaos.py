"""Chaos: real train workers killed with SIGKILL or stopped with SIGTERM mid-job, a redelivered message.

Each test runs its own worker processes behind a private API (own key prefix and data dir, short
lease bounds: tests/faults.py), so killing them never touches the shared ``service``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, tiny_job, wait_for
from tests.faults import LOST_BOUND_S, Cluster, children, cluster_env, events, send_train_task

# A tiny-gemma step takes well under a second here: jobs are long enough that a kill lands mid-training
# (after the first checkpoint, every EVERY steps) with seconds to spare, not after the job ended.
STEPS, EVERY = 60, 4


@pytest.fixture(scope="module")
def chaos(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("chaos")
    env = cluster_env(service_env, tmp, FTAAS_CHECKPOINT_INTERVAL=str(EVERY))
    subprocess.run([sys.executable, "-m", "worker.models", "tiny-gemma"], env=env, cwd=ROOT, check=True)
    (tmp / "logs").mkdir()
    with Cluster(env, tmp / "logs") as c:
        c.api()
        yield c


@pytest.fixture(scope="module")
def api(chaos: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=chaos.url, timeout=30) as c:
        yield c


def _submit(api: httpx.Client, rows: list[dict[str, Any]], steps: int) -> str:
    resp = api.post("/jobs", json=tiny_job(rows, max_steps=steps))
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _types(api: httpx.Client, job_id: str) -> list[str]:
    return [e["type"] for e in events(api, job_id)]


def test_sigkill_whole_worker_requeues_within_bound_and_resumes(chaos: Cluster, api: httpx.Client,
                                                                 quotes: list[dict[str, Any]]) -> None:
    worker = chaos.worker("a")
    job_id = _submit(api, quotes[:16], STEPS)
    wait_for(api, job_id, check=lambda j: j["progress"]["step"] > EVERY, timeout=600)  # a checkpoint exists
    killed = time.monotonic()
    os.killpg(worker.pid, signal.SIGKILL)  # the parent and its training child: a lost machine
    chaos.procs.pop("a").wait(10)
    requeued = wait_for(api, job_id, {"queued"}, timeout=LOST_BOUND_S + 20)
    noticed = time.monotonic() - killed
    print(f"SIGKILL: job requeued {noticed:.1f} s after the kill (bound {LOST_BOUND_S:.0f} s + polling)")
    assert noticed <= LOST_BOUND_S + 1.5, "noticed by the API's reaper: no worker is left"
    assert requeued["attempts"] == 1 and EVERY < requeued["progress"]["step"] < STEPS

    chaos.worker("b")  # the next worker resumes from the checkpoint
    done = wait_for(api, job_id, timeout=600)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and done["progress"]["step"] == STEPS
    evs = events(api, job_id)
    requeue = next(e for e in evs if e["type"] == "requeued")
    assert requeue["data"] == {"reason": "worker_lost", "attempt": 1}
    resumed = next(e for e in evs if e["type"] == "resumed")
    at = resumed["data"]["step"]
    assert at % EVERY == 0 and EVERY <= at <= requeued["progress"]["step"], "from a checkpoint, not from scratch"
    assert [e["type"] for e in evs].count("started") == 2
    steps = [p["step"] for p in api.get(f"/jobs/{job_id}/metrics").json()["data"] if "loss" in p]
    assert steps == list(range(1, STEPS + 1)), "the steps trained again after the resume replace their first points"
    ckpt = Path(chaos.env["FTAAS_DATA_DIR"]) / "checkpoints" / job_id
    deadline = time.monotonic() + 15  # the worker removes it just after writing the final status
    while ckpt.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ckpt.exists(), "deleted when it ended"


def test_duplicate_message_is_skipped_and_killed_child_is_resumed(chaos: Cluster, api: httpx.Client,
                                                                   quotes: list[dict[str, Any]]) -> None:
    """Worker ``b`` (from the test above) and a second worker ``c``: a redelivered message for a running
    job does nothing; the kernel's OOM killer taking the training child (SIGKILL, the parent lives on)
    gets the job requeued and resumed."""
    worker_b = chaos.procs.get("b") or chaos.worker("b")
    chaos.worker("c")  # both consuming before the job starts: the idle one takes the duplicates at once
    try:
        job_id = _submit(api, quotes[:16], STEPS)
        wait_for(api, job_id, {"running"}, timeout=600)
        for _ in range(2):
            send_train_task(chaos.env, job_id)
        deadline = time.monotonic() + 60
        while chaos.log("b").count("'skipped'") + chaos.log("c").count("'skipped'") < 2:
            assert time.monotonic() < deadline, "the duplicates were not consumed"
            time.sleep(0.3)
        assert _types(api, job_id).count("started") == 1, "never two runs of one job"

        job = wait_for(api, job_id, check=lambda j: j["progress"]["step"] > EVERY, timeout=600)
        started = [e for e in events(api, job_id) if e["type"] == "started"][-1]
        child = int(started["data"]["worker"].rsplit(":", 1)[1])  # the training process
        assert child in children(worker_b.pid) + children(chaos.procs["c"].pid)
        os.kill(child, signal.SIGKILL)
        done = wait_for(api, job_id, timeout=600)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2 and done["progress"]["step"] == STEPS and job["attempts"] == 1
        assert _types(api, job_id).count("started") == 2
    finally:  # the next test expects worker b alone
        chaos.stop("c")


def test_sigterm_checkpoints_requeues_and_resumes_to_the_same_adapter(
        chaos: Cluster, api: httpx.Client, quotes: list[dict[str, Any]]) -> None:
    """A deploy: SIGTERM to the worker's main process (what docker and Kubernetes send)."""
    from safetensors.torch import load_file

    worker = chaos.procs.get("b") or chaos.worker("b")
    job_id = _submit(api, quotes[:16], STEPS)
    wait_for(api, job_id, check=lambda j: j["progress"]["step"] >= 2, timeout=600)
    stopped = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(120) == 0, "a warm shutdown"
    print(f"SIGTERM: worker exited {time.monotonic() - stopped:.1f} s after the signal")
    chaos.procs.pop("b")
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["attempts"] == 1, job
    requeue = next(e for e in events(api, job_id) if e["type"] == "requeued")
    assert requeue["data"]["reason"] == "preempted" and 2 <= requeue["data"]["step"] < STEPS

    chaos.worker("d")
    done = wait_for(api, job_id, timeout=600)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1 and done["progress"]["step"] == STEPS
    resumed = next(e for e in events(api, job_id) if e["type"] == "resumed")
    assert resumed["data"]["step"] == requeue["data"]["step"], "resumed exactly where it stopped"

    # the same job, uninterrupted: the same steps, losses and adapter
    twin = _submit(api, quotes[:16], STEPS)
    assert wait_for(api, twin, timeout=600)["status"] == "succeeded"
    series = {s["step"]: s["loss"] for s in api.get(f"/jobs/{job_id}/metrics").json()["data"] if "loss" in s}
    twin_series = {s["step"]: s["loss"] for s in api.get(f"/jobs/{twin}/metrics").json()["data"] if "loss" in s}
    assert sorted(series) == sorted(twin_series) == list(range(1, STEPS + 1))
    rel = {k: abs(series[k] - twin_series[k]) / abs(twin_series[k]) for k in series}
    print(f"SIGTERM: per-step loss vs uninterrupted: largest relative difference {max(rel.values()):.1e} "
          f"at step {max(rel, key=rel.__getitem__)} (resumed at {resumed['data']['step']})")
    assert max(rel.values()) <= 1e-6, {k: (series[k], twin_series[k]) for k in series if rel[k] > 1e-6}
    adapters = Path(chaos.env["FTAAS_DATA_DIR"]) / "adapters"
    a, b = (load_file(adapters / j / "adapter_model.safetensors") for j in (job_id, twin))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(b[k].abs().max()) for k in b)
    drift = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5 / sum(float(b[k].pow(2).sum()) for k in b) ** 0.5
    print(f"SIGTERM: resumed adapter vs uninterrupted: max abs difference {worst:.2e} (largest weight {scale:.2e}), "
          f"relative norm of the difference {drift:.1e}")
    assert worst <= 1e-6 * scale, "the resumed job's adapter is the uninterrupted one's (bitwise, seen)"
    json.dumps(done)  # the job record stays plain JSON
