"""The Celery app. Imports neither torch nor the tasks' heavy modules: the API uses it to enqueue.

Pool choice and CUDA: workers run the prefork pool with one child (``-c 1``). The parent process
only consumes messages and answers pings; it never imports torch or touches CUDA, because
``worker.tasks`` imports the trainer and engine inside the task bodies. Every child is forked from
that CUDA-free parent and is the only process that initialises CUDA, so no process with a CUDA
context ever forks. (The solo pool would also be safe, but a solo worker cannot answer the
``/readyz`` ping while it trains.)
"""

from celery import Celery

from app.settings import get_settings

TRAIN_QUEUE = "train"
GENERATE_QUEUE = "generate"
TRAIN_TASK = "ftaas.train"
GENERATE_TASK = "ftaas.generate"

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
    broker_transport_options={"global_keyprefix": f"{settings.redis_prefix}:celery:"},
    result_backend_transport_options={"global_keyprefix": f"{settings.redis_prefix}:celery:"},
)


def worker_argv(queue: str, loglevel: str = "INFO") -> list[str]:
    """The command that runs a worker for ``queue``: used by ``make run``, compose and the tests."""
    argv = ["python", "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queue, "-c", "1", "--pool", "prefork",
            "-n", f"{queue}@%h", "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if queue == TRAIN_QUEUE:
        # A fresh child per training job: all the memory a job used goes back with its process.
        argv += ["--max-tasks-per-child", "1"]
    return argv
