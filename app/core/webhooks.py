"""Webhooks: OpenAI-style job events, signed the Standard Webhooks way, delivered from a Redis outbox.

Design. A job's terminal transition (``succeeded``, ``failed``, ``cancelled``, whoever makes it: the
worker, a queued job's cancel, the reaper) runs the job store's one transition script, which also puts
one entry per endpoint of the job's tenant into ``P:webhooks:outbox`` in the same atomic step
(app/core/store/jobs.py ``_UPDATE``). So there is no window where a job has ended but its deliveries are
not recorded (a crash between two writes cannot lose them), and the worker and the API request that
caused the change only pay one ``SMEMBERS`` inside a script they run anyway: they never wait for a
receiver. The event body is built here before the script runs and stored with the entry, so every
attempt sends the same bytes under the same ``webhook-id`` (receivers deduplicate on it).

``Deliverer`` (a daemon thread of each API process, started in its lifespan) claims due entries
atomically (several API processes never send one entry at once), POSTs them from a small thread pool
with a short timeout, and reschedules a failed attempt with exponential backoff
(``webhook_backoff_s`` x 2^(attempt-1), at most ``webhook_backoff_max_s``) until ``webhook_max_attempts``,
then gives up with a log line. The API rather than the workers: training and generate workers then carry
no network client for tenants' URLs, and there is an API process whenever jobs are being submitted.
Delivery is at least once: an API that dies mid-attempt leaves the entry to be sent again when its
claim lapses.

Signing (Standard Webhooks, as OpenAI signs): ``webhook-signature: v1,<base64 HMAC-SHA256 over
"{webhook-id}.{webhook-timestamp}.{body}">``, keyed by the base64-decoded part of the endpoint's
``whsec_`` secret; the official ``openai`` client's ``webhooks.unwrap`` verifies it. The secret is per
endpoint (a tenant's endpoints never share one, and deleting an endpoint retires its secret); it is
returned once, when the endpoint is registered.

URLs (SSRF): https only, or http to a host in ``webhook_allowed_hosts``; any other host must resolve
only to global addresses (no loopback, private, link-local, multicast or reserved ones). The check runs
at registration and again before every attempt (a name may resolve differently later), redirects are
not followed, and the allowed hosts are the operator's setting, never a tenant's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

if TYPE_CHECKING:  # the store imports this module (terminal_event): no import of it at run time
    from app.core.settings import Settings
    from app.core.store.webhooks import WebhookStore

log = logging.getLogger("ftaas.webhooks")
SECRET_PREFIX = "whsec_"
MAX_URL_LENGTH = 2048
EVENT_TYPES = {s: f"fine_tuning.job.{s}" for s in ("succeeded", "failed", "cancelled")}


# -- events and signatures -------------------------------------------------------------------------

def terminal_event(job_id: str, status: str, now: float) -> tuple[str, str]:
    """(event id, JSON body) of a job's terminal event. A job ends once, so the id is derived from its id."""
    event_id = "evt_" + job_id.removeprefix("job_")
    body = {"id": event_id, "object": "event", "created_at": int(now), "type": EVENT_TYPES[status],
            "data": {"id": job_id}}
    return event_id, json.dumps(body, separators=(",", ":"))


def new_secret() -> str:
    """``whsec_`` + base64 of 32 random bytes (the HMAC key is the decoded bytes)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` header's value for one attempt."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: str, msg_id: str, body: str, now: float | None = None) -> dict[str, str]:
    ts = int(time.time() if now is None else now)
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(secret, msg_id, ts, body),
            "content-type": "application/json", "user-agent": "ftaas-webhooks"}


# -- URL checks (SSRF) -----------------------------------------------------------------------------

def _address_problem(addr: str) -> str | None:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_global or ip.is_multicast:
        return f"resolves to {ip}, which is not a public address"
    return None


def url_problem(url: str, allowed_hosts: list[str], resolve: bool = True) -> str | None:
    """Why ``url`` may not receive webhooks, or None. ``resolve``: also check every address its host
    resolves to (always, unless the host is one of the operator's ``allowed_hosts``)."""
    if len(url) > MAX_URL_LENGTH:
        return f"is longer than {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"is not a valid URL ({e})"
    host = (parts.hostname or "").rstrip(".").lower()
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https URL with a host"
    try:  # the host checked must be the one httpx will connect to (no parser differential)
        sent = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        return f"is not a valid URL ({e})"
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return "has a host name that is not valid"
    if sent.raw_host.decode("ascii").rstrip(".").lower() != host or sent.scheme != parts.scheme:
        return "is ambiguous (its host reads differently to different URL parsers)"
    if parts.username is not None or parts.password is not None:
        return "must not hold a user name or password"
    allowed = host in {h.lower() for h in allowed_hosts}
    if parts.scheme == "http" and not allowed:
        return "must use https (http only to the hosts in FTAAS_WEBHOOK_ALLOWED_HOSTS)"
    if allowed or not resolve:
        return None
    try:
        infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80), proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return f"names a host that does not resolve ({host!r})"
    for info in infos:
        problem = _address_problem(str(info[4][0]))
        if problem:
            return problem
    return None if infos else f"names a host that does not resolve ({host})"


# -- delivery ----------------------------------------------------------------------------------------

class Deliverer:
    """Sends due outbox entries (see the module docstring); ``thread()`` runs it until ``stopped`` is set."""

    def __init__(self, store: WebhookStore, settings: Settings) -> None:
        self.store = store
        self.timeout_s, self.max_attempts = settings.webhook_timeout_s, settings.webhook_max_attempts
        self.backoff_s, self.backoff_max_s = settings.webhook_backoff_s, settings.webhook_backoff_max_s
        self.poll_s, self.workers = settings.webhook_poll_interval_s, settings.webhook_concurrency
        self.allowed_hosts = list(settings.webhook_allowed_hosts)
        self.stopped = threading.Event()
        self._busy = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def backoff(self, attempt: int) -> float:
        """Seconds before the attempt after ``attempt`` (1-based)."""
        return float(min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s))

    def attempt(self, delivery_id: str, attempt: int, client: httpx.Client) -> str:
        """One attempt at one entry: ``delivered``, ``retry``, ``given_up`` or ``dropped``. Never raises."""
        try:
            entry = self.store.delivery(delivery_id)
            endpoint = self.store.get(entry.get("webhook", ""))
            if not entry or endpoint is None:
                self.store.finish(delivery_id, "dropped", "the endpoint was deleted")
                log.info("webhook %s: dropped (its endpoint is gone)", delivery_id)
                return "dropped"
            error = self._post(client, endpoint["url"], endpoint["secret"], entry["event"], entry["body"])
            if error is None:
                self.store.finish(delivery_id, "delivered")
                log.info("webhook %s: delivered to %s (attempt %d)", delivery_id, endpoint["url"], attempt)
                return "delivered"
            if attempt >= self.max_attempts:
                self.store.finish(delivery_id, "given_up", error)
                log.warning("webhook %s: giving up after %d attempts to %s: %s", delivery_id, attempt,
                            endpoint["url"], error)
                return "given_up"
            delay = self.backoff(attempt)
            self.store.retry_at(delivery_id, time.time() + delay, error)
            log.info("webhook %s: attempt %d to %s failed (%s); next in %.1f s", delivery_id, attempt,
                     endpoint["url"], error, delay)
            return "retry"
        except Exception:  # Redis gone: the entry stays claimed and is due again when the claim lapses
            log.exception("webhook %s: attempt %d could not be recorded", delivery_id, attempt)
            return "retry"

    def _post(self, client: httpx.Client, url: str, secret: str, event_id: str, body: str) -> str | None:
        """None on a 2xx answer, else why not."""
        problem = url_problem(url, self.allowed_hosts)
        if problem:
            return f"the URL {problem}"
        try:
            resp = client.post(url, content=body.encode(), headers=signed_headers(secret, event_id, body))
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"[:300]
        return None if 200 <= resp.status_code < 300 else f"HTTP {resp.status_code}"

    def run(self) -> None:
        """Claim as many due entries as there are free senders, every ``poll_s`` (sooner when one frees)."""
        claim_s = self.timeout_s * 2 + 30  # longer than any attempt takes
        with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client, \
                ThreadPoolExecutor(self.workers, thread_name_prefix="webhook") as pool:
            while not self.stopped.is_set():
                with self._lock:
                    free = self.workers - self._busy
                try:
                    due = self.store.claim(time.time(), claim_s, free) if free > 0 else []
                except Exception as e:
                    log.warning("webhooks: the outbox is not answering: %s", e)
                    due = []
                for delivery_id, attempt in due:
                    with self._lock:
                        self._busy += 1
                    pool.submit(self._send, delivery_id, attempt, client)
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def _send(self, delivery_id: str, attempt: int, client: httpx.Client) -> None:
        try:
            self.attempt(delivery_id, attempt, client)
        finally:
            with self._lock:
                self._busy -= 1
            self._wake.set()

    def stop(self) -> None:
        self.stopped.set()
        self._wake.set()

    def thread(self) -> threading.Thread:
        """A daemon thread running ``run`` (started)."""
        t = threading.Thread(target=self.run, name="webhooks", daemon=True)
        t.start()
        return t
