"""Leases in the job store against real Redis: one owner at a time, fenced writes, the reaper's requeue."""

from __future__ import annotations

import threading
import time

import pytest

from app.core.lease import Heartbeat, Reaper
from app.core.settings import Settings
from app.core.store import JobStore, new_job_id


@pytest.fixture
def store(redis_url: str, unit_prefix: str) -> JobStore:
    """A prefix of its own per test: the reaper sweeps every running job under its prefix, and other
    unit tests leave jobs `running` without a lease (they never had a worker)."""
    return JobStore.from_url(redis_url, f"{unit_prefix}-lease-{new_job_id()}")


def _new(store: JobStore) -> str:
    job_id = new_job_id()
    store.create(job_id, {"hyperparameters": {"max_steps": 10}}, {}, 10)
    return job_id


def _lease_ttl_ms(store: JobStore, job_id: str) -> int:
    return int(store.r.pttl(f"{store.p}:job:{job_id}:lease"))  # type: ignore[arg-type]


def test_claim_is_exclusive_and_counts_attempts(store: JobStore) -> None:
    job_id = _new(store)
    results: list[int | None] = []
    threads = [threading.Thread(target=lambda i=i: results.append(store.claim(job_id, f"w{i}", 30)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=str) == [1] + [None] * 7, "exactly one of 8 concurrent claims wins"
    job = store.get(job_id)
    assert job and job["status"] == "running" and job["attempts"] == 1
    assert 0 < _lease_ttl_ms(store, job_id) <= 30_000
    assert store.claim(job_id, "late", 30) is None, "a redelivered message for a running job does nothing"
    assert store.events(job_id)[-1]["type"] == "started"


def test_writes_are_fenced_by_the_owner(store: JobStore) -> None:
    job_id = _new(store)
    assert store.claim(job_id, "owner", 30) == 1
    mine, stale = store.leased("owner"), store.leased("someone-else")
    assert not stale.report_progress(job_id, 1, 10, None, {"loss": 9.0})
    assert not stale.transition(job_id, "succeeded")[0]
    assert mine.report_progress(job_id, 1, 10, None, {"loss": 1.0})
    assert mine.transition(job_id, "succeeded", adapter=job_id)[0]
    job = store.get(job_id)
    assert job and job["status"] == "succeeded" and job["metrics"] == {"loss": 1.0}
    assert _lease_ttl_ms(store, job_id) == -2, "a finished job's lease is gone"
    assert not store.renew_lease(job_id, "owner", 30)


def test_reaper_requeues_a_lost_job_then_fails_it_after_max_attempts(store: JobStore) -> None:
    job_id = _new(store)
    sent: list[str] = []
    reaper = Reaper(store, Settings(max_attempts=2), sent.append)
    assert store.claim(job_id, "w1", 0.2) == 1
    assert reaper.sweep() == {}, "the lease is alive"
    time.sleep(0.3)
    assert reaper.sweep() == {job_id: "queued"} and sent == [job_id]
    assert reaper.sweep() == {}, "requeued once only"
    assert not store.leased("w1").report_progress(job_id, 2, 10, None, {"loss": 1.0}), "the lost worker is fenced off"
    assert not store.renew_lease(job_id, "w1", 30), "and its heartbeat learns it"
    assert store.claim(job_id, "w2", 0.2) == 2
    job = store.get(job_id)
    assert job and job["status"] == "running" and job["attempts"] == 2
    time.sleep(0.3)
    assert reaper.sweep() == {job_id: "failed"} and sent == [job_id]
    job = store.get(job_id)
    assert job and job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    kinds = [e["type"] for e in store.events(job_id)]
    assert kinds == ["queued", "started", "requeued", "started", "failed"]


def test_lost_job_asked_to_cancel_ends_cancelled(store: JobStore) -> None:
    job_id = _new(store)
    assert store.claim(job_id, "w1", 0.1) == 1
    assert store.request_cancel(job_id) == (True, "running")
    time.sleep(0.2)
    assert Reaper(store, Settings(), lambda _: None).sweep() == {job_id: "cancelled"}


def test_preempted_job_resumes_as_the_same_attempt(store: JobStore) -> None:
    job_id = _new(store)
    assert store.claim(job_id, "w1", 30) == 1
    assert not store.leased("w2").requeue_preempted(job_id, 4)
    assert store.leased("w1").requeue_preempted(job_id, 4)
    job = store.get(job_id)
    assert job and job["status"] == "queued" and job["attempts"] == 1
    assert _lease_ttl_ms(store, job_id) == -2, "requeueing releases the lease at once"
    assert store.claim(job_id, "w2", 30) == 1, "a deploy does not use up an attempt"
    assert store.events(job_id)[-2]["data"] == {"reason": "preempted", "step": 4}


def test_heartbeat_keeps_the_lease_and_takes_it_back_after_an_outage(store: JobStore, redis_url: str) -> None:
    job_id = _new(store)
    settings = Settings(**{"FTAAS_REDIS_URL": redis_url}, redis_prefix=store.p, lease_ttl_s=0.4,
                        heartbeat_interval_s=0.1)
    assert store.claim(job_id, "w1", 0.4) == 1
    beat = Heartbeat(settings, job_id, "w1")
    beat.start()
    try:
        time.sleep(1.0)
        assert _lease_ttl_ms(store, job_id) > 0 and beat.alive(), "renewed past its first TTL"
        store.r.delete(f"{store.p}:job:{job_id}:lease")  # as if Redis came back after the TTL passed
        time.sleep(0.3)
        assert _lease_ttl_ms(store, job_id) > 0, "nobody took the job: taken back"
        assert store.leased("w1").requeue_preempted(job_id, 0)
        time.sleep(0.3)
        assert not beat.alive(), "the job is no longer this worker's: the heartbeat ended"
        assert _lease_ttl_ms(store, job_id) == -2
    finally:
        beat.stop()


def test_resume_rewinds_the_metric_series_to_the_checkpoint(store: JobStore) -> None:
    job_id = _new(store)
    assert store.claim(job_id, "w1", 30) == 1
    fenced = store.leased("w1")
    for step in (1, 2, 3):  # the lost attempt got to step 3; its checkpoint is at step 2
        assert fenced.report_progress(job_id, step, 10, None, {"loss": 1.0}, {"step": step, "loss": 1.0})
    assert store.rewind_metrics(job_id, 2) == 1
    assert store.rewind_metrics(job_id, 2) == 0
    assert [p["step"] for p in store.metric_series(job_id)] == [1, 2]
