"""The Celery entry point of the worker processes (``celery -A worker.celery_app``; compose and
``app.core.queue.worker_argv`` name it): the app object lives in ``app.core.queue``, shared with the API."""

from app.core.queue import celery_app

__all__ = ["celery_app"]
