"""Celery tasks: the only module binding the plain trainer and engine to Celery.

Heavy imports (torch, transformers) happen inside task bodies, in the forked child (see celery_app).

Training and faults (docs/reliability.md; app/core/lease.py): the task claims its job under a lease
that a heartbeat process renews, writes only while it owns the job, checkpoints, and on SIGTERM (a
deploy) saves a checkpoint and requeues the job to resume on the next worker. Each train worker's
parent sweeps for jobs whose worker was lost, and forwards its own SIGTERM to the training child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import resource
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import redis
from celery.signals import worker_init, worker_ready, worker_shutting_down
from celery.worker import state as worker_state

from app.core import paths
from app.core.errors import UserFacingError
from app.core.jobs import GenerateTask, JobSpec
from app.core.lease import Heartbeat, Reaper
from app.core.queue import GENERATE_TASK, TRAIN_TASK, celery_app, enqueue_train
from app.core.settings import Settings, get_settings
from app.core.store import DatasetStore, JobStore, redis_client

log = logging.getLogger("ftaas.tasks")
_engine: Any = None
#: One Redis client per process, by process id (``_redis``).
_clients: dict[int, redis.Redis] = {}
#: Set by SIGTERM in the training process: the job checkpoints at its next step and is requeued.
_preempted = threading.Event()
OOM_HINT = "out of memory: try a smaller batch_size or max_length (or a worker with more memory)"


class _StoreReporter:
    """The trainer's reporter over the job store, fenced by the lease: a Redis outage never fails the job
    (reports are dropped while Redis is away), and losing the job stops the training."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id

    def _quietly(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            write(*args, **kwargs)
        except redis.RedisError as e:
            log.warning("job %s: report dropped, the job store is not answering: %s", self.job_id, e)

    def progress(self, step: int, total_steps: int, eta_seconds: float | None, metrics: dict[str, float],
                 point: dict[str, Any]) -> None:
        self._quietly(self.store.report_progress, self.job_id, step, total_steps, eta_seconds, metrics, point,
                      {"phase": "training", "phase_progress": {"done": step, "total": total_steps}})

    def phase(self, progress: dict[str, Any]) -> None:
        self._quietly(self.store.report_phase, self.job_id, progress)

    def evaluated(self, point: dict[str, Any]) -> None:
        self._quietly(self.store.add_event, self.job_id, "eval", point, metric=point)

    def event(self, kind: str, data: dict[str, Any], record: dict[str, Any] | None = None) -> None:
        if kind == "resumed":  # the steps after the checkpoint run again: their old points go
            self._quietly(self.store.rewind_metrics, self.job_id, int(data["step"]))
        self._quietly(self.store.add_event, self.job_id, kind, data, **(record or {}))

    def should_stop(self) -> bool:
        """Cancelled, or no longer this worker's job (checked every step, so a stale worker stops at once)."""
        try:
            return self.store.cancel_requested(self.job_id) or not self.store.owns(self.job_id, self.store.guard)
        except redis.RedisError:
            return False


def _is_oom(exc: BaseException) -> bool:
    """CUDA's ``torch.OutOfMemoryError``, ``MemoryError``, or the CPU allocator's failure, anywhere in the chain."""
    e: BaseException | None = exc
    while e is not None:
        text = str(e).lower()
        if (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
                or "can't allocate memory" in text or "out of memory" in text):
            return True
        e = e.__cause__ or e.__context__
    return False


def _on_sigterm(signum: int, frame: Any) -> None:
    _preempted.set()


def _limit_memory(settings: Settings) -> tuple[int, int] | None:
    """Cap this (training) process's data segment; returns the previous limits to restore."""
    if settings.train_memory_limit_mb is None:
        return None
    before = resource.getrlimit(resource.RLIMIT_DATA)
    limit = settings.train_memory_limit_mb * 1024 * 1024
    if before[1] != resource.RLIM_INFINITY:
        limit = min(limit, before[1])
    resource.setrlimit(resource.RLIMIT_DATA, (limit, before[1]))
    return before


@celery_app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=False)
def train_job(job_id: str) -> str:
    """Run one job if it can be claimed; returns what happened (succeeded, failed, cancelled, preempted,
    lost or skipped). SIGTERM while it trains means: checkpoint, requeue, return."""
    _preempted.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # first: a deploy's SIGTERM must not kill the job
    try:
        return _train(job_id, get_settings())
    finally:
        signal.signal(signal.SIGTERM, previous)


def _redis() -> redis.Redis:
    """The process's one Redis client (one connection pool) for every store it uses. Per process id: a training
    child forked from the worker's parent makes its own instead of sharing the parent's sockets."""
    pid = os.getpid()
    if pid not in _clients:
        _clients.clear()
        _clients[pid] = redis_client(get_settings().redis_url)
    return _clients[pid]


def _train(job_id: str, settings: Settings) -> str:
    store = JobStore(_redis(), settings.redis_prefix)
    if _preempted.is_set():  # stopped before it began: leave the job queued, with a message for it
        enqueue_train(job_id)
        return "preempted"
    token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    attempt = store.claim(job_id, token, settings.lease_ttl_s, worker=f"{socket.gethostname()}:{os.getpid()}")
    if attempt is None:  # cancelled while queued, finished, or another worker holds it
        log.info("job %s not started: not queued, or another worker's lease is alive", job_id)
        return "skipped"
    leased = store.leased(token)
    heartbeat = Heartbeat(settings, job_id, token)
    heartbeat.start()
    checkpoint_dir = paths.checkpoint_dir(settings, job_id)
    limits = None
    try:
        limits = _limit_memory(settings)
        outcome = _run(job_id, leased, settings, checkpoint_dir)
    finally:
        heartbeat.stop()
        if limits is not None:
            resource.setrlimit(resource.RLIMIT_DATA, limits)
    if outcome == "lost":
        log.warning("job %s: no longer this worker's (its lease lapsed and it was requeued); left alone", job_id)
    elif outcome == "preempted":
        enqueue_train(job_id)
    else:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return outcome


def _run(job_id: str, store: JobStore, settings: Settings, checkpoint_dir: Path) -> str:
    """Train and record the outcome; returns it, or ``lost`` when the job was no longer this worker's
    (every write is fenced by the lease, so a lost worker changes nothing)."""
    try:
        from worker.train.data import check_links
        from worker.train.recipe import train

        stored = store.payload(job_id)
        if stored is None:
            raise UserFacingError("internal_error", "the job's request is missing from the store")
        spec = JobSpec.read(stored)  # a version this worker does not read fails the job: unsupported_spec
        check_links(spec, job_id, DatasetStore(store.r, store.p).used_by)
        out = paths.adapter_dir(settings, job_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)  # an earlier attempt's, cut short before the job succeeded
        outcome = train(spec, out, _StoreReporter(store, job_id), settings, checkpoint_dir, _preempted.is_set)
    except UserFacingError as e:
        log.warning("job %s failed: %s", job_id, e.message)
        return "failed" if store.fail(job_id, e.code, e.message) else "lost"
    except Exception as e:
        if _is_oom(e):
            log.warning("job %s ran out of memory: %s", job_id, str(e)[:300])
            code, message = "out_of_memory", OOM_HINT
        else:
            log.exception("job %s failed", job_id)
            code, message = "training_error", f"training failed: {type(e).__name__}: {str(e)[:300]}"
        return "failed" if store.fail(job_id, code, message) else "lost"
    if outcome.preempted:  # checkpointed at this step: the next worker resumes there
        return "preempted" if store.requeue_preempted(job_id, outcome.steps) else "lost"
    if outcome.cancelled or store.cancel_requested(job_id):
        return "cancelled" if store.transition(job_id, "cancelled")[0] else "lost"
    applied = store.transition(job_id, "succeeded", adapter=job_id, evaluation=outcome.evaluation)[0]
    return "succeeded" if applied else "lost"


@worker_init.connect
def _preload(**_: Any) -> None:
    """Load what every training job needs once in the parent, before the pool forks: each fresh child (one per
    job) inherits it. The default base model's tokenizer everywhere (2-4 s a job otherwise: parsing Gemma's
    262k-entry vocabulary; it touches no CUDA, checked by ``bench/fork_check.py`` on an H200). On the CPU also
    the trainer's libraries (``python -X importtime -c "import worker.train.recipe"``: about 25 s on a loaded 2-core
    machine, peft alone 16 s); not with a GPU: bitsandbytes' import queries CUDA, and the parent must never
    touch CUDA (see celery_app)."""
    settings = get_settings()
    if settings.device == "cpu":
        import worker.train.recipe  # noqa: F401
    from worker.models import load_tokenizer

    try:
        load_tokenizer(settings.default_base_model, settings)
    except Exception:  # a missing or gated model is the job's error to report, not the worker's
        log.warning("could not preload the tokenizer of %s", settings.default_base_model, exc_info=True)


@worker_ready.connect
def _start_reaper(sender: Any, **_: Any) -> None:
    """Every worker sweeps for lost jobs on its consumer's timer (the main thread: no thread to fork)."""
    settings = get_settings()
    reaper = Reaper(JobStore(_redis(), settings.redis_prefix), settings, enqueue_train)
    sender.timer.call_repeatedly(settings.reaper_interval_s, reaper.sweep)


@worker_shutting_down.connect
def _preempt_training(sig: str, how: str, exitcode: int, **_: Any) -> None:
    """A warm shutdown (SIGTERM) waits for running tasks: tell each training child to checkpoint and stop."""
    for request in list(worker_state.active_requests):
        pid = request.worker_pid
        if request.task_name == TRAIN_TASK and pid and pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


_engine_lock = threading.Lock()
_WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _get_engine() -> Any:
    """The process's one engine (the generate worker runs a thread pool: many tasks, one engine thread per
    base model), and a thread that reports what it has loaded for ``GET /adapters``."""
    global _engine
    with _engine_lock:
        if _engine is None:
            from worker.serve.pool import EnginePool

            _engine = EnginePool(get_settings())
            threading.Thread(target=_report_serving, name="serving-report", daemon=True).start()
        return _engine


def _report_serving() -> None:
    from app.core.store import SERVING_TTL_S, GenerationStore

    settings = get_settings()
    gens = GenerationStore(_redis(), settings.redis_prefix)
    while True:
        try:
            gens.set_serving(_WORKER, _engine.serving())
        except Exception:
            log.warning("could not report the loaded adapters", exc_info=True)
        time.sleep(min(5.0, SERVING_TTL_S / 3))


class _Relay:
    """Streamed pieces from the engine thread to the request's Redis stream, written by the task's own
    thread in batches (the engine thread never waits on Redis)."""

    def __init__(self, gen_id: str) -> None:
        from app.core.store import GenerationStore

        self.gen_id, self.pieces = gen_id, queue.SimpleQueue()  # type: ignore[var-annotated]
        self.store = GenerationStore(_redis(), get_settings().redis_prefix)

    def piece(self, index: int, text: str) -> None:
        self.pieces.put(("token", {"index": index, "text": text}))

    def flush(self, *final: tuple[str, dict[str, Any]]) -> None:
        events = []
        while not self.pieces.empty():
            events.append(self.pieces.get())
        if events or final:
            self.store.push(self.gen_id, [*events, *final])


@celery_app.task(name=GENERATE_TASK)
def generate(stored: dict[str, Any], *legacy: Any) -> dict[str, Any]:
    """Run one ``GenerateTask`` (app/core/jobs.py, sent by ``enqueue_generate``); returns ``{"result": ...}`` or
    ``{"error": {"code", "message"}}`` and never raises for user errors.

    The result (``done``) or the error, and with ``task.stream`` the text as it is generated (``token``
    events), go to the task's Redis stream ``gen_id``, which the API reads (app/api/services/generate.py)."""
    try:
        task = GenerateTask.read(stored, *legacy)
    except UserFacingError as e:  # another release's message: answer it at once instead of a 504 later
        error = {"code": e.code, "message": e.message}
        gen_id = GenerateTask.stream_of(stored, *legacy)
        if gen_id:
            _Relay(gen_id).flush(("error", error))
        log.warning("generate message refused: %s", e.message)
        return {"error": error}
    queue_ms = (time.time() - task.enqueued_at) * 1000
    relay = _Relay(task.gen_id)
    try:
        engine = _get_engine()
        future = engine.submit(task.engine_request(), relay.piece if task.stream else None)
        while True:
            try:
                future.result(timeout=0.02)
                break
            except FutureTimeout:
                relay.flush()
        result = future.result()
    except UserFacingError as e:
        error = {"code": e.code, "message": e.message}
        relay.flush(("error", error))
        return {"error": error}
    except Exception as e:
        relay.flush(("error", {"code": "generate_failed", "message": "generation failed on the worker"}))
        log.exception("generate failed")
        raise e
    result["timing"]["queue_ms"] = round(queue_ms, 1)
    cache = result.pop("adapter_cache", None)
    if cache:  # counted for /metrics before the answer leaves (a client may read /metrics next); a failed
        try:   # count never fails the generation
            stat = "adapter_hits" if cache == "hit" else "adapter_loads"
            JobStore(_redis(), get_settings().redis_prefix).incr_stat(stat)
        except Exception:
            log.warning("could not count adapter cache %s", cache, exc_info=True)
    relay.flush(("done", result))
    return {"result": result}
