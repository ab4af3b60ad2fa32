"""Webhooks against a real service (API keys on, a train worker) and a loopback receiver in this process.

The service allows http to 127.0.0.1 only (``FTAAS_WEBHOOK_ALLOWED_HOSTS``) and retries fast, so the
tests see every attempt. Waits are on the receiver's condition or on Redis, always with a bound.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
import redis
from openai.types.webhooks import (
    FineTuningJobCancelledWebhookEvent,
    FineTuningJobFailedWebhookEvent,
    FineTuningJobSucceededWebhookEvent,
)

from app.core.settings import Settings
from app.core.store import JobStore, WebhookStore, new_job_id
from app.core.webhooks import Deliverer, new_secret, url_problem
from tests.conftest import assert_error, tiny_job, wait_for
from tests.keyed import Keyed, keyed_service

FAST = {"FTAAS_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "FTAAS_WEBHOOK_TIMEOUT_S": "1", "FTAAS_WEBHOOK_BACKOFF_S": "0.2",
        "FTAAS_WEBHOOK_BACKOFF_MAX_S": "1", "FTAAS_WEBHOOK_MAX_ATTEMPTS": "30", "FTAAS_WEBHOOK_POLL_INTERVAL_S": "0.1"}


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    answered: int | None = None

    @property
    def event(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """A loopback HTTP server: records every request; per path, a plan of statuses to answer first
    (then 200), or a hold (the answer waits until ``release`` is set)."""

    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    plans: dict[str, list[int]] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def wait(self, check: Callable[[list[Hit]], bool], timeout: float = 120) -> list[Hit]:
        with self.cond:
            assert self.cond.wait_for(lambda: check(self.hits), timeout), [(h.path, h.event) for h in self.hits]
            return list(self.hits)

    def of(self, path: str, job_id: str | None = None) -> list[Hit]:
        with self.cond:
            return [h for h in self.hits if h.path == path and (job_id is None or h.event["data"]["id"] == job_id)]


def _handler(rx: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hit = Hit(self.path, {k.lower(): v for k, v in self.headers.items()},
                      self.rfile.read(int(self.headers.get("content-length") or 0)), time.time())
            with rx.cond:
                rx.hits.append(hit)
                plan = rx.plans.get(self.path) or []
                status = plan.pop(0) if plan else 200
                rx.cond.notify_all()
            if self.path in rx.held:
                rx.release.wait(120)
            try:
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok")
            except OSError:  # the sender gave up (its timeout) before the answer
                return
            with rx.cond:
                hit.answered = status
                rx.cond.notify_all()

        def log_message(self, *_: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(rx))
    server.daemon_threads = True
    rx.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield rx
    rx.release.set()
    server.shutdown()


@pytest.fixture(scope="module")
def svc(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    with keyed_service(service_env, tmp_path_factory.mktemp("webhooks"), "webhooks", train=True,
                       extra_env=FAST) as s:
        yield s


def _register(svc: Keyed, who: str, url: str) -> dict[str, Any]:
    with svc.client(who) as c:
        r = c.post("/webhooks", json={"url": url})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _delete(svc: Keyed, who: str, hook_id: str) -> None:
    with svc.client(who) as c:
        assert c.delete(f"/webhooks/{hook_id}").status_code == 204


def _verify(hit: Hit, secret: str) -> None:
    """The Standard Webhooks signature, by hand and with the official client (which also checks the age)."""
    h = hit.headers
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + hit.body, hashlib.sha256).digest()
    assert h["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
    assert abs(int(h["webhook-timestamp"]) - hit.at) < 5
    event = openai.OpenAI(api_key="x", webhook_secret=secret).webhooks.unwrap(hit.body.decode(), h)
    assert isinstance(event, FineTuningJobSucceededWebhookEvent | FineTuningJobFailedWebhookEvent
                      | FineTuningJobCancelledWebhookEvent), event
    assert event.id == h["webhook-id"] == hit.event["id"] and event.data.id == hit.event["data"]["id"]
    assert event.type == hit.event["type"] and event.created_at == hit.event["created_at"]
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="x").webhooks.verify_signature(hit.body, h, secret=new_secret())


def _outbox_drains(svc: Keyed, timeout: float = 120) -> None:
    r = redis.Redis.from_url(svc.env["FTAAS_REDIS_URL"])
    deadline = time.monotonic() + timeout
    while r.zcard(f"{svc.prefix}:webhooks:outbox"):
        assert time.monotonic() < deadline, "deliveries still pending"
        time.sleep(0.2)


def _job(svc: Keyed, who: str, rows: list[dict[str, Any]], cancel: bool = False) -> str:
    with svc.client(who) as c:
        r = c.post("/jobs", json=tiny_job(rows, max_steps=2))
        assert r.status_code == 202, r.text
        job_id = str(r.json()["id"])
        if cancel:
            assert c.post(f"/jobs/{job_id}/cancel").status_code == 202
        return job_id


@pytest.mark.parametrize("url", [
    "http://10.0.0.5/hook",                 # http only to allowed hosts
    "http://localhost:9/hook",              # the allowed host is 127.0.0.1, not whatever else reaches it
    "https://10.0.0.5/hook",                # private
    "https://127.0.0.2/hook",               # loopback
    "https://169.254.169.254/latest/meta-data",  # link-local (cloud metadata)
    "https://[::1]/hook",
    "https://[::ffff:127.0.0.1]/hook",     # loopback behind an IPv4-mapped address
    "https://0.0.0.0/hook",
    "https://localhost/hook",               # resolves to loopback
    "https://no-such-host.invalid/hook",    # cannot be checked: refused
    "ftp://127.0.0.1/hook",
    "https://user:pw@8.8.8.8/hook",
    "https://8.8.8.8\\@127.0.0.1/hook",  # userinfo to one parser, part of the host to another
    "not a url",
])
def test_disallowed_urls_are_refused(svc: Keyed, url: str) -> None:
    with svc.client("alpha") as c:
        assert_error(c.post("/webhooks", json={"url": url}), 422, "invalid_webhook_url", "url")
        assert all(h["url"] != url for h in c.get("/webhooks").json()["data"])


def test_url_rules_without_a_server() -> None:
    """Public addresses pass without any DNS; http and loopback only for the operator's allowed hosts."""
    assert url_problem("https://8.8.8.8/hook", []) is None
    assert url_problem("https://[2606:4700:4700::1111]/hook", []) is None
    assert url_problem("http://127.0.0.1:9/hook", ["127.0.0.1"]) is None
    assert url_problem("http://127.0.0.1:9/hook", []) == "must use https (http only to the hosts in " \
        "FTAAS_WEBHOOK_ALLOWED_HOSTS)"
    assert "not a public address" in str(url_problem("https://[::ffff:10.0.0.1]/hook", []))
    assert "does not resolve" in str(url_problem("https://пример.invalid/hook", []))


def test_register_list_delete_per_tenant(svc: Keyed, receiver: Receiver) -> None:
    made = _register(svc, "alpha", f"{receiver.url}/listed")
    assert made["secret"].startswith("whsec_") and len(base64.b64decode(made["secret"][6:])) == 32
    assert made["tenant"] == "alpha" and made["id"].startswith("wh_")
    with svc.client("alpha") as a, svc.client("beta") as b, svc.client("root") as root:
        mine = a.get("/webhooks").json()["data"]
        assert [h["id"] for h in mine] == [made["id"]] and "secret" not in mine[0]
        assert made["id"] not in {h["id"] for h in b.get("/webhooks").json()["data"]}
        assert made["id"] in {h["id"] for h in root.get("/webhooks").json()["data"]}
        assert_error(b.delete(f"/webhooks/{made['id']}"), 404, "webhook_not_found")
        assert_error(b.delete(f"/webhooks/wh_{'0' * 22}"), 404, "webhook_not_found")
        assert a.delete(f"/webhooks/{made['id']}").status_code == 204
        assert a.get("/webhooks").json()["data"] == []
        assert_error(a.post("/webhooks", json={"url": f"{receiver.url}/x", "secret": "mine"}), 422)


def test_signed_events_go_to_their_own_tenant_only(svc: Keyed, receiver: Receiver,
                                                  quotes: list[dict[str, Any]]) -> None:
    a = _register(svc, "alpha", f"{receiver.url}/alpha")
    b = _register(svc, "beta", f"{receiver.url}/beta")
    try:
        a_job = _job(svc, "alpha", quotes[:8])
        b_job = _job(svc, "beta", quotes[:8], cancel=True)
        with svc.client("alpha") as c:
            done = wait_for(c, a_job)
        assert done["status"] == "succeeded"
        receiver.wait(lambda _: bool(receiver.of("/alpha", a_job)) and bool(receiver.of("/beta", b_job)))
        _outbox_drains(svc)  # nothing more is on its way
        hit = receiver.of("/alpha", a_job)[0]
        _verify(hit, a["secret"])
        assert hit.event == {"id": "evt_" + a_job[4:], "object": "event", "created_at": int(done["finished_at"]),
                             "type": "fine_tuning.job.succeeded", "data": {"id": a_job}}
        b_hit = receiver.of("/beta", b_job)[0]
        _verify(b_hit, b["secret"])
        assert b_hit.event["type"] == "fine_tuning.job.cancelled"
        assert {h.event["data"]["id"] for h in receiver.of("/alpha")} == {a_job}
        assert {h.event["data"]["id"] for h in receiver.of("/beta")} == {b_job}
    finally:
        _delete(svc, "alpha", a["id"])
        _delete(svc, "beta", b["id"])


def test_a_receiver_that_fails_twice_gets_the_event_on_the_third_try(
        svc: Keyed, receiver: Receiver, quotes: list[dict[str, Any]]) -> None:
    receiver.plans["/flaky"] = [500, 500]
    hook = _register(svc, "alpha", f"{receiver.url}/flaky")
    try:
        job_id = _job(svc, "alpha", quotes[:8], cancel=True)
        hits = receiver.wait(lambda _: any(h.answered == 200 for h in receiver.of("/flaky", job_id)))
        tries = receiver.of("/flaky", job_id)
        assert [h.answered for h in tries] == [500, 500, 200], hits
        assert len({h.headers["webhook-id"] for h in tries}) == 1 and len({h.body for h in tries}) == 1
        for h in tries:
            _verify(h, hook["secret"])
        assert tries[1].at - tries[0].at >= 0.18 and tries[2].at - tries[1].at >= 0.38  # backoff 0.2 s, doubled
        _outbox_drains(svc)
        r = redis.Redis.from_url(svc.env["FTAAS_REDIS_URL"], decode_responses=True)
        entry = r.hgetall(f"{svc.prefix}:webhooks:delivery:evt_{job_id[4:]}:{hook['id']}")
        assert entry["status"] == "delivered" and entry["attempts"] == "3", entry
    finally:
        _delete(svc, "alpha", hook["id"])


def test_a_slow_receiver_does_not_slow_training(svc: Keyed, receiver: Receiver,
                                                quotes: list[dict[str, Any]]) -> None:
    """While the receiver holds every request (longer than the sender's 1 s timeout), a job's status is
    final before its webhook arrives, the API answers, and the next job trains and finishes."""
    receiver.held.add("/slow")
    hook = _register(svc, "gamma", f"{receiver.url}/slow")
    try:
        with svc.client("gamma") as c:
            first = _job(svc, "gamma", quotes[:8])
            receiver.wait(lambda _: bool(receiver.of("/slow", first)))
            arrived = receiver.of("/slow", first)[0].at
            t0 = time.monotonic()
            job = c.get(f"/jobs/{first}").json()
            assert time.monotonic() - t0 < 5
            assert job["status"] == "succeeded" and job["finished_at"] <= arrived
            second = _job(svc, "gamma", quotes[:8])
            assert wait_for(c, second)["status"] == "succeeded"
        assert not receiver.release.is_set() and all(h.answered is None for h in receiver.of("/slow"))
        assert len(receiver.of("/slow", first)) >= 2, "a held attempt times out and is tried again"
        receiver.release.set()
        receiver.wait(lambda _: all(any(h.answered == 200 for h in receiver.of("/slow", j)) for j in (first, second)))
        _outbox_drains(svc)
    finally:
        _delete(svc, "gamma", hook["id"])


def test_outbox_survives_a_restart_and_gives_up_after_max_attempts(
        redis_url: str, unit_prefix: str, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    """The outbox is written with the terminal status whether or not a deliverer runs; one started later
    (a restarted API) sends it; a receiver that always fails is given up after max attempts."""
    prefix = f"{unit_prefix}-wh"
    jobs = JobStore.from_url(redis_url, prefix)
    hooks = WebhookStore(jobs.r, prefix)
    ok = hooks.create("acme", f"{receiver.url}/later", new_secret())
    receiver.plans["/down"] = [500] * 10
    down = hooks.create("acme", f"{receiver.url}/down", new_secret())
    hooks.create("other", f"{receiver.url}/other", new_secret())
    job_id = new_job_id()
    jobs.create(job_id, {}, {}, 1, tenant="acme")
    assert jobs.request_cancel(job_id) == (True, "queued")
    assert hooks.pending() == 2  # acme's two endpoints, not other's
    cfg = Settings(webhook_allowed_hosts=["127.0.0.1"], webhook_backoff_s=0.05, webhook_max_attempts=3,
                   webhook_poll_interval_s=0.05, webhook_timeout_s=2)
    deliverer = Deliverer(hooks, cfg)
    with caplog.at_level("INFO", logger="ftaas.webhooks"):
        deliverer.thread()
        try:
            receiver.wait(lambda _: len(receiver.of("/down", job_id)) == 3 and bool(receiver.of("/later", job_id)))
            deadline = time.monotonic() + 30
            while hooks.pending():
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            deliverer.stop()
    assert hooks.delivery(f"evt_{job_id[4:]}:{down['id']}")["status"] == "given_up"
    assert hooks.delivery(f"evt_{job_id[4:]}:{ok['id']}")["status"] == "delivered"
    assert any("giving up after 3 attempts" in r.getMessage() for r in caplog.records)
    assert not receiver.of("/other", job_id)
    _verify(receiver.of("/later", job_id)[0], ok["secret"])

