"""Webhook endpoints (native routes only: OpenAI has no registration API; its events' shape is kept).
Thin: the work is in app/api/services/webhooks.py."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response

from app.api.auth import Caller
from app.api.deps import Config
from app.api.schemas import ErrorEnvelope, WebhookCreate, WebhookCreated, WebhookId, WebhookList
from app.api.services import webhooks as service
from app.core.store import WebhookStore

router = APIRouter(tags=["webhooks"])
Hooks = Annotated[WebhookStore, Depends(service.webhook_store)]


@router.post("/webhooks", status_code=201, response_model=WebhookCreated)
def create_webhook(body: WebhookCreate, response: Response, ws: Hooks, cfg: Config, caller: Caller) -> dict[str, Any]:
    """Register a URL for the caller's jobs' terminal events (`fine_tuning.job.succeeded`, `.failed`,
    `.cancelled`), signed with the returned `secret` (shown only in this answer)."""
    hook = service.register(ws, cfg, caller, body.url)
    response.headers["Location"] = f"/webhooks/{hook['id']}"
    return hook


@router.get("/webhooks", response_model=WebhookList)
def list_webhooks(ws: Hooks, caller: Caller) -> dict[str, Any]:
    """The caller's endpoints (an admin's: every tenant's), oldest first, without their secrets."""
    return {"data": ws.endpoints(caller.scope)}


@router.delete("/webhooks/{webhook_id}", status_code=204, response_class=Response,
               responses={404: {"model": ErrorEnvelope}})
def delete_webhook(webhook_id: Annotated[WebhookId, Path()], ws: Hooks, caller: Caller) -> Response:
    """Stop sending to it; its pending deliveries are dropped."""
    service.delete(ws, caller, webhook_id)
    return Response(status_code=204)
