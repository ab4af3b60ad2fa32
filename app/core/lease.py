"""Job leases: a heartbeat in the training process and a reaper that requeues jobs whose worker is gone.

Plain Python over the job store (no Celery, no torch): ``worker/tasks.py`` wires them to the worker,
``app/api/main.py`` runs a reaper in the API too, so lost jobs are noticed even while no worker is up.

- The training process claims a job with a lease (``P:job:<id>:lease``, TTL ``lease_ttl_s``) that a
  ``Heartbeat`` thread renews every ``heartbeat_interval_s``. A worker killed with SIGKILL (or whose
  machine dies) stops renewing.
- A ``Reaper`` sweeps every ``reaper_interval_s`` for running jobs without a lease and requeues them to
  resume from their latest checkpoint, up to ``max_attempts`` starts; after that the job fails with
  ``worker_lost``. Requeue rather than fail: a lost worker is mostly the infrastructure (a node or
  container killed, the kernel's OOM killer), the job is deterministic and checkpointed, so resuming
  costs at most ``checkpoint_interval`` steps; the bound on attempts stops a job that kills every
  worker it lands on. A lost job is noticed within ``lease_ttl_s + reaper_interval_s`` (40 s by default).
- Every write of the training process is fenced by its token (``JobStore.leased``): a worker that
  stalled past its lease and was requeued cannot change the job any more; its heartbeat sees that
  and stops the training at the next step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import redis

from app.core.settings import Settings
from app.core.store import JobStore

log = logging.getLogger("ftaas.lease")


class Heartbeat:
    """Renews one job's lease from a small forked process until stopped.

    A process, not a thread: the training process can hold the GIL for seconds (importing torch,
    loading weights on a busy machine), and a thread that misses its beat loses a healthy job; the
    first version did, 3 times in a row, in tests/system/test_chaos.py under load. The heartbeat process ends
    when the job is no longer this worker's, or when its parent (the training process) dies, so a
    killed worker's lease lapses within ``lease_ttl_s``. A Redis outage does not stop it: renewing
    resumes when Redis answers, and the lease is taken again if it lapsed while nobody took the job.
    """

    def __init__(self, settings: Settings, job_id: str, token: str) -> None:
        self.settings, self.job_id, self.token = settings, job_id, token
        self.pid = 0

    def start(self) -> None:
        pid = os.fork()
        if pid == 0:  # the heartbeat process: never returns
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a SIGTERM to the group is the trainer's to handle
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                self._beat(os.getppid())
                code = 0
            finally:
                os._exit(code)
        self.pid = pid

    def _beat(self, parent: int) -> None:
        store = JobStore.from_url(self.settings.redis_url, self.settings.redis_prefix)  # its own connection
        while True:
            time.sleep(self.settings.heartbeat_interval_s)
            if os.getppid() != parent:
                return  # the training process is gone: let the lease lapse
            try:
                if not store.renew_lease(self.job_id, self.token, self.settings.lease_ttl_s):
                    log.warning("job %s: lease lost (requeued or finished elsewhere)", self.job_id)
                    return
            except redis.RedisError as e:
                log.warning("job %s: could not renew the lease: %s", self.job_id, e)

    def alive(self) -> bool:
        return bool(self.pid) and os.waitpid(self.pid, os.WNOHANG) == (0, 0)

    def stop(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0


class Reaper:
    """Requeues (or fails) running jobs whose lease expired. Any number may run: each change is atomic
    and applies only while the job is running without a lease, so two reapers never requeue one job twice.

    Workers call ``sweep`` from the Celery consumer's timer (their main thread: no extra thread in a
    process that forks); the API runs ``thread()``.
    """

    def __init__(self, store: JobStore, settings: Settings, send: Callable[[str], None]) -> None:
        self.store, self.send = store, send
        self.interval_s, self.max_attempts = settings.reaper_interval_s, settings.max_attempts
        self.stopped = threading.Event()

    def sweep(self) -> dict[str, str]:
        """One pass: {job id: new status} for every job it changed. Never raises."""
        changed: dict[str, str] = {}
        try:
            for job_id in self.store.lost_jobs():
                status = self.store.requeue_lost(job_id, self.max_attempts)
                if status is None:
                    continue
                changed[job_id] = status
                log.warning("job %s: worker lost; now %s", job_id, status)
                if status == "queued":
                    self._send(job_id)
        except redis.RedisError as e:
            log.warning("reaper: the job store is not answering: %s", e)
        except Exception:
            log.exception("reaper: sweep failed")
        return changed

    def _send(self, job_id: str) -> None:
        try:
            self.send(job_id)
        except Exception:  # the broker is this same Redis, which answered a moment ago
            log.exception("job %s: requeued but its task could not be sent", job_id)
            self.store.fail(job_id, "queue_unavailable", "the job could not be queued again")

    def thread(self) -> threading.Thread:
        """A daemon thread sweeping every ``reaper_interval_s`` until ``stopped`` is set (started)."""
        def loop() -> None:
            while not self.stopped.wait(self.interval_s):
                self.sweep()

        t = threading.Thread(target=loop, name="ftaas-reaper", daemon=True)
        t.start()
        return t
