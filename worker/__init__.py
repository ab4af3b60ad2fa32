"""ftaas workers: the Celery app and tasks, and the plain trainer and inference engine they call."""
