"""Queue fairness: 20 jobs submitted by 3 tenants at once, against two train workers, all complete; none
is starved, none lost, and every status seen is a legal step on from the one before.

Each tenant may hold ``FTAAS_MAX_ACTIVE_JOBS`` (2) queued or running jobs (429 ``too_many_jobs`` beyond),
so a tenant that submits many jobs only ever has two in the queue and the others' jobs are never far
behind: the bound checked is how many jobs start between a job's creation and its own start.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.core.queue import TRAIN_QUEUE, worker_argv
from app.serve import local
from tests.conftest import ROOT
from tests.keyed import MAIN_LIMITS, Keyed

PLAN = {"alpha": 8, "beta": 7, "gamma": 5}  # 20 jobs
RANK = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2, "cancelled": 2}
ROWS = [{"quote": f"Fair {i}.", "author": "C"} for i in range(4)]
JOB = {"base_model": "tiny-gemma", "dataset": {"rows": ROWS}, "sample_prompts": ["Fair"],
       "hyperparameters": {"max_steps": 1, "batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 16,
                           "gradient_checkpointing": False, "seed": 3}}
TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def second_train_worker(keyed: Keyed) -> Iterator[None]:
    """Another train worker on the keyed service's queue: two consumers compete for the jobs."""
    env = keyed.env
    argv = [a if a != f"{TRAIN_QUEUE}@%h" else f"{TRAIN_QUEUE}2@%h" for a in worker_argv(TRAIN_QUEUE)]
    with (keyed.logs / "train2.log").open("wb") as out:
        proc = subprocess.Popen(local(argv), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def test_twenty_jobs_three_tenants(keyed: Keyed, second_train_worker: None) -> None:
    cap = int(MAIN_LIMITS["FTAAS_MAX_ACTIVE_JOBS"])
    made: dict[str, str] = {}  # job id -> tenant
    refused: dict[str, int] = dict.fromkeys(PLAN, 0)
    lock, problems = threading.Lock(), []
    deadline = time.monotonic() + TIMEOUT_S

    def submit(tenant: str, n: int) -> None:
        with keyed.client(tenant) as c:
            while n and time.monotonic() < deadline:
                try:
                    r = c.post("/jobs", json=JOB | {"name": f"fair-{tenant}"})
                except httpx.HTTPError as e:
                    problems.append(f"{tenant}: {e!r}")
                    return
                if r.status_code == 429:
                    refused[tenant] += 1
                    time.sleep(0.5)
                    continue
                if r.status_code != 202:
                    problems.append(r.text)
                    return
                with lock:
                    made[r.json()["id"]] = tenant
                n -= 1

    threads = [threading.Thread(target=submit, args=(t, n), daemon=True) for t, n in PLAN.items()]
    for t in threads:
        t.start()
    seen: dict[str, list[str]] = {}
    with keyed.client("root") as admin:
        while True:
            with lock:
                ids = list(made)
            for job_id in ids:
                status = admin.get(f"/jobs/{job_id}").json()["status"]
                history = seen.setdefault(job_id, [])
                if not history or history[-1] != status:
                    if history and (RANK[status] < RANK[history[-1]] or RANK[history[-1]] == 2):
                        problems.append(f"{job_id}: {history[-1]} -> {status}")
                    history.append(status)
            if not any(t.is_alive() for t in threads) and len(ids) == sum(PLAN.values()) and all(
                    seen[j][-1] in ("succeeded", "failed", "cancelled") for j in ids):
                break
            assert time.monotonic() < deadline, {j: h[-1] for j, h in seen.items()}
            time.sleep(0.5)
        records = {j: admin.get(f"/jobs/{j}").json() for j in made}
        events = {j: [e["type"] for e in admin.get(f"/jobs/{j}/events", params={"limit": 1000}).json()["data"]]
                  for j in made}
        listed = {t: _all_ids(keyed, t) for t in PLAN}
    assert not problems, problems
    assert len(made) == sum(PLAN.values())
    assert {t: list(made.values()).count(t) for t in PLAN} == PLAN
    assert {j: r["status"] for j, r in records.items()} == dict.fromkeys(made, "succeeded")  # none lost
    assert sum(refused.values()) > 0  # the cap held the tenants back at some point
    for j, kinds in events.items():
        assert kinds[0] == "queued" and kinds[-1] == "succeeded" and "started" in kinds, (j, kinds)
        assert kinds.count("succeeded") == 1 and records[j]["tenant"] == made[j]
    for tenant in PLAN:  # each tenant lists exactly its own jobs
        mine = {j for j, t in made.items() if t == tenant}
        assert mine <= listed[tenant] and not ({j for j in made if made[j] != tenant} & listed[tenant])
    # none starved: a job waits for at most the jobs already in the system (cap per tenant) plus one
    # reserved by each worker, never for a tenant's whole backlog
    bound = len(PLAN) * cap + 2
    for j, r in records.items():
        overtook = [k for k, o in records.items()
                    if k != j and r["created_at"] < o["started_at"] < r["started_at"]]
        assert len(overtook) <= bound, (j, made[j], len(overtook))


def _all_ids(keyed: Keyed, tenant: str) -> set[str]:
    ids: set[str] = set()
    after = None
    with keyed.client(tenant) as c:
        while True:
            page: dict[str, Any] = c.get("/jobs", params={"limit": 100} | ({"after": after} if after else {})).json()
            ids |= {j["id"] for j in page["data"]}
            if not page["has_more"]:
                return ids
            after = page["next_after"]

