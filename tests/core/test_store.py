"""The job store against real Redis: only legal transitions, atomically; listing and pagination."""

from __future__ import annotations

import threading

from app.core.store import JobStore, new_job_id


def _new(store: JobStore, steps: int = 10) -> str:
    job_id = new_job_id()
    store.create(job_id, {"name": "t", "hyperparameters": {"max_steps": steps}}, {"name": "t"}, steps)
    return job_id


def test_record_exists_queued_with_progress(store: JobStore) -> None:
    job_id = _new(store)
    job = store.get(job_id)
    assert job is not None and job["status"] == "queued"
    assert job["progress"] == {"step": 0, "total_steps": 10, "fraction": 0.0, "eta_seconds": None,
                               "phase": "queued", "phase_progress": None}
    assert job["started_at"] is None and job["finished_at"] is None
    assert store.payload(job_id) == {"name": "t", "hyperparameters": {"max_steps": 10}}
    assert store.get("job_0000000000000000000000") is None


def test_happy_path_and_finished_jobs_never_change(store: JobStore) -> None:
    job_id = _new(store)
    assert store.start(job_id)
    assert not store.start(job_id), "a running job cannot start again"
    assert store.report_progress(job_id, 5, 10, 3.0, {"loss": 1.5})
    job = store.get(job_id)
    assert job and job["progress"]["fraction"] == 0.5 and job["metrics"] == {"loss": 1.5}
    assert store.transition(job_id, "succeeded", adapter=job_id) == (True, "running")
    for status in ("running", "failed", "cancelled", "succeeded"):
        assert store.transition(job_id, status)[0] is False
    assert not store.report_progress(job_id, 6, 10, 1.0, {"loss": 0.1})
    assert store.request_cancel(job_id) == (False, "succeeded")
    job = store.get(job_id)
    assert job and job["status"] == "succeeded" and job["progress"]["step"] == 5 and job["adapter"] == job_id


def test_cancel_queued_is_immediate_and_never_runs(store: JobStore) -> None:
    job_id = _new(store)
    assert store.request_cancel(job_id) == (True, "queued")
    assert store.request_cancel(job_id) == (False, "cancelled")
    assert not store.start(job_id)
    assert store.transition(job_id, "succeeded")[0] is False
    job = store.get(job_id)
    assert job and job["status"] == "cancelled" and job["finished_at"] is not None


def test_cancel_running_sets_flag_and_cannot_succeed_from_queued(store: JobStore) -> None:
    job_id = _new(store)
    assert store.transition(job_id, "succeeded")[0] is False, "queued -> succeeded is illegal"
    store.start(job_id)
    assert not store.cancel_requested(job_id)
    assert store.request_cancel(job_id) == (True, "running")
    assert store.cancel_requested(job_id)
    assert store.transition(job_id, "cancelled")[0]
    assert store.request_cancel("job_0000000000000000000000") == (False, None)


def test_concurrent_start_only_one_wins(store: JobStore) -> None:
    job_id = _new(store)
    wins: list[bool] = []
    threads = [threading.Thread(target=lambda: wins.append(store.start(job_id))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1


def test_list_newest_first_paginated_and_filtered(store: JobStore) -> None:
    ids = [_new(store) for _ in range(5)]
    store.start(ids[1])
    page, more = store.page(2)
    assert more and [j["id"] for j in page] == ids[::-1][:2]
    page2, _ = store.page(2, after=page[-1]["id"])
    assert [j["id"] for j in page2] == ids[::-1][2:4]
    running, _ = store.page(100, status="running")
    assert ids[1] in {j["id"] for j in running}
    assert all(j["status"] == "running" for j in running)
    queued, _ = store.page(100, status="queued")
    assert ids[1] not in {j["id"] for j in queued}
