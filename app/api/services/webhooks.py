"""Webhook endpoints: register (URL checks, the secret shown once), list and delete, per tenant.

Delivery is not here: it runs from the outbox in a thread of the API process (app/core/webhooks.py),
never in a request.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from app.api.deps import job_store
from app.api.errors import ApiError
from app.core.apikeys import Principal
from app.core.settings import Settings, get_settings
from app.core.store import WebhookStore
from app.core.webhooks import new_secret, url_problem


@lru_cache
def webhook_store() -> WebhookStore:
    return WebhookStore(job_store().r, get_settings().redis_prefix)


def not_found(webhook_id: str) -> ApiError:
    return ApiError(404, "webhook_not_found", f"no webhook with id {webhook_id!r}", "id")


def register(ws: WebhookStore, cfg: Settings, caller: Principal, url: str) -> dict[str, Any]:
    """422 ``invalid_webhook_url`` (field ``url``) for a URL webhooks may not reach, ``limit_exceeded``
    past the tenant's endpoint cap; else the new endpoint with its secret."""
    problem = url_problem(url, cfg.webhook_allowed_hosts)
    if problem:
        raise ApiError(422, "invalid_webhook_url", f"the webhook url {problem}", "url")
    if ws.count(caller.tenant) >= cfg.webhook_max_per_tenant:
        raise ApiError(422, "limit_exceeded", f"a tenant may register at most {cfg.webhook_max_per_tenant} "
                       "webhooks (FTAAS_WEBHOOK_MAX_PER_TENANT); delete one first", "url")
    return ws.create(caller.tenant, url, new_secret())


def delete(ws: WebhookStore, caller: Principal, webhook_id: str) -> None:
    """404 for an unknown endpoint and for another tenant's (the same answer)."""
    found = ws.get(webhook_id)
    if found is None or not caller.owns(found["tenant"]) or not ws.delete(webhook_id):
        raise not_found(webhook_id)
