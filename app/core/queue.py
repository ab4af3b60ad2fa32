"""The Celery app. Imports neither torch nor the tasks' heavy modules: the API uses it to enqueue.

Pool choice and CUDA: the generate worker runs a thread pool (``-c 64``) in one process, which alone
initialises CUDA and never forks; its tasks hand requests to the batching engine. Train workers run
the prefork pool with one child (``-c 1``). The parent process
only consumes messages and answers pings; it never imports torch or touches CUDA, because
``worker.tasks`` imports the trainer and engine inside the task bodies. Every child is forked from
that CUDA-free parent and is the only process that initialises CUDA, so no process with a CUDA
context ever forks. (The solo pool would also be safe, but a solo worker cannot answer the
``/readyz`` ping while it trains.)

Delivery of training tasks (see app/core/lease.py): the job store, not the broker, decides whether a
job runs. A train task claims its job (queued -> running, with a lease) or does nothing, so a
duplicate or redelivered message is harmless. ``acks_late``: the message is acknowledged when the
task returns, so with ``worker_prefetch_multiplier=1`` a busy worker holds no second job while
another worker idles. ``reject_on_worker_lost`` stays off: a lost worker's job is requeued by the
reaper, with bounded attempts, not by the broker (which would redeliver a job that kills its worker
forever). ``visibility_timeout`` (how long before Redis redelivers an unacknowledged message) stays
Celery's hour: a long job's message redelivered while it trains finds the job running and is dropped.
"""

from celery import Celery
from celery.result import AsyncResult

from app.core.jobs import GenerateTask
from app.core.settings import get_settings

TRAIN_QUEUE = "train"
GENERATE_QUEUE = "generate"
TRAIN_TASK = "ftaas.train"
GENERATE_TASK = "ftaas.generate"
VISIBILITY_TIMEOUT_S = 3600

settings = get_settings()
celery_app = Celery("ftaas", broker=settings.redis_url, backend=settings.redis_url, include=["worker.tasks"])
celery_app.conf.update(
    task_routes={TRAIN_TASK: {"queue": TRAIN_QUEUE}, GENERATE_TASK: {"queue": GENERATE_QUEUE}},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    worker_prefetch_multiplier=1,  # a long training job must not hold a second one hostage
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"global_keyprefix": f"{settings.redis_prefix}:celery:",
                              "visibility_timeout": VISIBILITY_TIMEOUT_S},
    result_backend_transport_options={"global_keyprefix": f"{settings.redis_prefix}:celery:"},
)


def enqueue_train(job_id: str) -> None:
    """Send a job's train task (by name: the sender never imports the trainer)."""
    celery_app.send_task(TRAIN_TASK, args=[job_id], queue=TRAIN_QUEUE)


def enqueue_generate(task: GenerateTask) -> AsyncResult:
    """Send a generate task as one JSON argument; its answer comes on the Redis stream ``task.gen_id``, never
    as a Celery result (so none is stored)."""
    return celery_app.send_task(GENERATE_TASK, args=[task.model_dump(mode="json")], queue=GENERATE_QUEUE,
                                ignore_result=True)


def worker_argv(queue: str, loglevel: str = "INFO") -> list[str]:
    """The command that runs a worker for ``queue``: used by ``make run``, compose and the tests."""
    # The generate worker runs a thread pool: many requests in flight at once, all handed to one engine
    # thread per base model that batches them (worker/serve/engine.py). Its one process holds CUDA and never forks.
    pool = ["-c", "1", "--pool", "prefork"] if queue != GENERATE_QUEUE else ["-c", "64", "--pool", "threads"]
    argv = ["python", "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queue, *pool,
            "-n", f"{queue}@%h", "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if queue == TRAIN_QUEUE:
        # A fresh child per training job: all the memory a job used goes back with its process.
        argv += ["--max-tasks-per-child", "1"]
    return argv
