"""Who may do what: API keys, tenants, the authorisation matrix over every route, open mode.

The matrix runs against a second service with keys on (``keyed`` in conftest, tests/keyed.py): every
route of the app x (no key, wrong key, another tenant, the owner, an admin). Objects belong to tenant
``alpha``; ``beta`` is the other tenant; ``root`` is an admin key (tenant ``ops``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from app.api.main import app
from app.cli import app as cli_app
from app.core.apikeys import (
    OPEN_TENANT,
    ApiKeyEntry,
    KeyTable,
    entry_line,
    hash_key,
    new_key,
    open_bind_refusal,
    parse_keys_file,
)
from app.serve import api_argv, local
from tests.conftest import ROOT, TERMINAL, assert_error, free_port, tiny_job
from tests.keyed import Keyed

WHO = ("none", "wrong", "other", "owner", "admin")
OPEN_PATHS = {"/healthz", "/readyz", "/", "/static/{name}", "/openapi.json", "/docs", "/docs/oauth2-redirect",
              "/redoc"}
CHAT_ROWS = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}!"}]}
             for i in range(6)]


# -- keys, without a server -----------------------------------------------------------------------

def test_keys_file_formats_and_lookup() -> None:
    a, b = new_key(), new_key()
    assert a.startswith("ftaas_") and len(a) > 40 and a != b
    lines = f"# comment\n{entry_line(a, 'acme')}\n\n{entry_line(b, 'ops', admin=True)}  # the operator\n"
    entries = parse_keys_file(lines)
    assert entries == [ApiKeyEntry(sha256=hash_key(a), tenant="acme"),
                       ApiKeyEntry(sha256=hash_key(b), tenant="ops", admin=True)]
    assert parse_keys_file(json.dumps([e.model_dump() for e in entries])) == entries
    table = KeyTable(entries)
    assert not table.open
    found = table.lookup(a)
    assert found is not None and (found.tenant, found.admin) == ("acme", False)
    found = table.lookup(b)
    assert found is not None and found.admin and found.owns("acme") and found.scope is None
    assert table.lookup(a + "x") is None and table.lookup("") is None and table.lookup(hash_key(a)) is None
    assert KeyTable([]).open


@pytest.mark.parametrize("text, problem", [
    ("ftaas_plaintextkey acme", "sha256"),                  # a key itself, not its hash
    (f"{'a' * 64} Acme", "tenant"),                          # tenants are lower case
    (f"{'a' * 64} ../etc", "tenant"),                        # never a path or a key separator
    (f"{'a' * 64} acme:x", "tenant"),
    (f"{'a' * 64} acme superuser", "line 1"),
    ('[{"sha256": "' + "b" * 64 + '", "tenant": "t", "admin": true, "key": "x"}]', "key"),
])
def test_bad_keys_files_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_keys_file(text)


def test_open_mode_refuses_public_addresses() -> None:
    open_table, keyed_table = KeyTable([]), KeyTable([ApiKeyEntry(sha256="c" * 64, tenant="t")])
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert open_bind_refusal(open_table, host, allow_open=False) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        refusal = open_bind_refusal(open_table, host, allow_open=False)
        assert refusal and "FTAAS_ALLOW_OPEN" in refusal and host in refusal
        assert open_bind_refusal(open_table, host, allow_open=True) is None
        assert open_bind_refusal(keyed_table, host, allow_open=False) is None


def _api_output(env: dict[str, str], host: str, seconds: float) -> tuple[int | None, str]:
    """Run the API command on ``host`` for a while; its exit code (None: still up) and its output."""
    proc = subprocess.Popen(local(api_argv(host, free_port())), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(seconds)
    except subprocess.TimeoutExpired:
        code = None
        os.killpg(proc.pid, 15)
    out = proc.communicate(timeout=30)[0].decode()
    return code, out


def test_api_refuses_to_start_open_on_a_public_address(service_env: dict[str, str]) -> None:
    env = {k: v for k, v in service_env.items() if k not in ("FTAAS_API_KEYS", "FTAAS_API_KEYS_FILE")}
    code, out = _api_output(env, "0.0.0.0", 60)
    assert code not in (None, 0), out
    assert "refusing to serve without API keys on '0.0.0.0'" in out and "FTAAS_ALLOW_OPEN=true" in out

    code, out = _api_output(env | {"FTAAS_ALLOW_OPEN": "true"}, "0.0.0.0", 12)
    assert code is None, out  # still serving when stopped
    assert "auth is OPEN" in out

    code, out = _api_output(env, "127.0.0.1", 12)
    assert code is None and "auth is OPEN" in out, out


def test_serve_refuses_before_starting_anything(service_env: dict[str, str]) -> None:
    env = service_env | {"FTAAS_HOST": "0.0.0.0"}
    done = subprocess.run([sys.executable, "-m", "app.serve"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refusing to serve without API keys" in done.stderr and "starting" not in done.stdout
    bad = service_env | {"FTAAS_API_KEYS_FILE": "/nonexistent/keys"}
    done = subprocess.run([sys.executable, "-m", "app.serve"], env=bad, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "cannot read the API keys file" in done.stderr


def test_open_service_says_so(client: httpx.Client) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["auth"] == "open"
    job = client.get("/jobs", params={"limit": 1}).json()["data"]
    assert all(j["tenant"] in (OPEN_TENANT, None) for j in job)


# -- the matrix -------------------------------------------------------------------------------------

def _headers(svc: Keyed, who: str) -> dict[str, str]:
    return {"none": {}, "wrong": {"Authorization": f"Bearer {new_key()}"}, "other": svc.headers("beta"),
            "owner": svc.headers("alpha"), "admin": svc.headers("root")}[who]


def _settle(svc: Keyed, job_id: str) -> None:
    """Cancel a job the matrix made (alpha makes at most two, its cap of queued + running jobs)."""
    with svc.client("root") as c:
        assert c.post(f"/jobs/{job_id}/cancel").status_code in (202, 409)


@pytest.fixture(scope="module")
def owned(keyed: Keyed, quotes: list[dict[str, Any]]) -> Iterator[dict[str, str]]:
    """alpha's objects: an upload, an OpenAI file, and a succeeded job (with its adapter)."""
    with keyed.client("alpha") as c:
        lines = "".join(json.dumps(q) + "\n" for q in quotes[:8])
        ds = c.post("/datasets", files={"file": ("q.jsonl", lines.encode())})
        assert ds.status_code == 201, ds.text
        chat = "".join(json.dumps(r) + "\n" for r in CHAT_ROWS)
        f = c.post("/v1/files", files={"file": ("chat.jsonl", chat.encode())}, data={"purpose": "fine-tune"})
        assert f.status_code == 200, f.text
        job = c.post("/jobs", json=tiny_job(quotes[:8], max_steps=1) | {"sample_prompts": ["Quote:"]})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        deadline = time.monotonic() + 600
        while (rec := c.get(f"/jobs/{job_id}").json())["status"] not in TERMINAL:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert rec["status"] == "succeeded", rec
        assert rec["tenant"] == "alpha"
        model = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]
        yield {"ds": ds.json()["id"], "file": f.json()["id"], "job": job_id, "model": model}


# Each row: method, path template, then per caller the expected status, or a check of the response.
# "other" is beta acting on alpha's object; for lists, the check is what the caller sees.
Check = Callable[[httpx.Response, dict[str, str]], None]


def _status(code: int) -> Check:
    def check(resp: httpx.Response, _: dict[str, str]) -> None:
        assert resp.status_code == code, resp.text
    return check


def _lists(key: str, ids_of: Callable[[dict[str, Any]], list[str]], visible: bool) -> Check:
    def check(resp: httpx.Response, objs: dict[str, str]) -> None:
        assert resp.status_code == 200, resp.text
        assert (objs[key] in ids_of(resp.json())) is visible, resp.text[:500]
    return check


def _data_ids(body: dict[str, Any]) -> list[str]:
    return [x["id"] for x in body["data"]]


def _adapter_ids(body: dict[str, Any]) -> list[str]:
    return [a for worker in body["data"] for a in worker["adapters"]]


def _list_row(key: str) -> dict[str, Check]:
    return {"other": _lists(key, _data_ids, False), "owner": _lists(key, _data_ids, True),
            "admin": _lists(key, _data_ids, True)}


def _by_id(other: int, owner: int, admin: int | None = None) -> dict[str, Check]:
    return {"other": _status(other), "owner": _status(owner), "admin": _status(admin or owner)}


def _job_body(objs: dict[str, str]) -> dict[str, Any]:
    return {"base_model": "tiny-gemma", "dataset": {"id": objs["ds"]},
            "hyperparameters": {"max_steps": 1, "batch_size": 2, "gradient_accumulation_steps": 1,
                                "max_length": 64, "gradient_checkpointing": False}}


#: A public address the keyed service accepts (it allows no http hosts); never sent to, see the rows below.
HOOK_URL = "https://93.184.215.14/ftaas-matrix-hook"

MATRIX: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/jobs"): {"json": _job_body, **_by_id(404, 202)},
    ("GET", "/jobs"): _list_row("job"),
    ("GET", "/jobs/{job_id}"): _by_id(404, 200),
    ("POST", "/jobs/{job_id}/cancel"): _by_id(404, 409),  # the job has ended: past the owner check
    ("GET", "/jobs/{job_id}/metrics"): _by_id(404, 200),
    ("GET", "/jobs/{job_id}/events"): _by_id(404, 200),
    ("POST", "/generate"): {"json": lambda o: {"adapter": o["job"], "prompt": "Quote:", "max_new_tokens": 2},
                            **_by_id(404, 200)},
    ("POST", "/datasets"): {"files": True, **_by_id(201, 201)},  # anyone with a key may upload
    ("GET", "/datasets"): _list_row("ds"),
    ("GET", "/datasets/{dataset_id}"): _by_id(404, 200),
    ("DELETE", "/datasets/{dataset_id}"): {"fresh": "ds", **_by_id(404, 204)},
    ("POST", "/v1/files"): {"files": True, **_by_id(200, 200)},
    ("GET", "/v1/files"): _list_row("file"),
    ("GET", "/v1/files/{file_id}"): _by_id(404, 200),
    ("DELETE", "/v1/files/{file_id}"): {"fresh": "file", **_by_id(404, 200)},
    ("POST", "/v1/fine_tuning/jobs"): {"json": lambda o: {"model": "tiny-gemma", "training_file": o["file"],
                                                          "hyperparameters": {"n_epochs": 1, "batch_size": 2}},
                                       **_by_id(404, 200)},
    ("GET", "/v1/fine_tuning/jobs"): _list_row("job"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}"): _by_id(404, 200),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): _by_id(404, 409),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"): _by_id(404, 200),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): _by_id(404, 200),
    ("GET", "/v1/models"): {"other": _lists("model", _data_ids, False), "owner": _lists("model", _data_ids, True),
                            "admin": _lists("model", _data_ids, True)},
    ("GET", "/v1/models/{model}"): _by_id(404, 200),
    ("POST", "/v1/completions"): {"json": lambda o: {"model": o["model"], "prompt": "Quote:", "max_tokens": 2},
                                  **_by_id(404, 200)},
    ("POST", "/v1/chat/completions"): {
        "json": lambda o: {"model": o["job"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        **_by_id(404, 200)},
    ("GET", "/metrics"): _by_id(403, 403, 200),  # operations data of every tenant: admin keys only
    ("GET", "/adapters"): {"other": _lists("job", _adapter_ids, False), "owner": _status(200),
                           "admin": _status(200)},  # loaded ones only: alpha's may not be loaded yet
    # webhooks exist only around their request (made fresh, deleted after), so no job's event is ever sent
    ("POST", "/webhooks"): {"json": lambda o: {"url": HOOK_URL}, **_by_id(201, 201)},  # each for its own tenant
    ("GET", "/webhooks"): {"fresh": "webhook", "other": _lists("fresh_webhook", _data_ids, False),
                           "owner": _lists("fresh_webhook", _data_ids, True),
                           "admin": _lists("fresh_webhook", _data_ids, True)},
    ("DELETE", "/webhooks/{webhook_id}"): {"fresh": "webhook", **_by_id(404, 204)},
}


def _app_routes() -> set[tuple[str, str]]:
    """Every route in the OpenAPI schema (the dashboard's two are left out of it, and open)."""
    return {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}


def test_the_matrix_covers_every_route() -> None:
    routes = _app_routes()
    keyed = {r for r in routes if r[1] not in OPEN_PATHS}
    assert keyed == set(MATRIX), f"not in the matrix: {keyed - set(MATRIX)}; gone: {set(MATRIX) - keyed}"


def _fill(path: str, objs: dict[str, str], fresh: str | None) -> str:
    ids = {"job_id": objs["job"], "dataset_id": objs["ds"], "file_id": objs["file"], "model": objs["model"]}
    if fresh:
        ids[{"ds": "dataset_id", "file": "file_id", "webhook": "webhook_id"}[fresh]] = objs[f"fresh_{fresh}"]
    for name, value in ids.items():
        path = path.replace("{" + name + "}", value)
    return path


def _fresh(svc: Keyed, kind: str) -> str:
    """A new object of alpha's to delete."""
    with svc.client("alpha") as c:
        if kind == "webhook":
            r = c.post("/webhooks", json={"url": HOOK_URL})
        elif kind == "ds":
            r = c.post("/datasets", files={"file": ("d.jsonl", b'{"quote": "a", "author": "b"}\n')})
        else:
            chat = "".join(json.dumps(r) + "\n" for r in CHAT_ROWS).encode()
            r = c.post("/v1/files", files={"file": ("c.jsonl", chat)}, data={"purpose": "fine-tune"})
        assert r.status_code in (200, 201), r.text
        return str(r.json()["id"])


def _drop_webhooks(svc: Keyed, row: dict[str, Any], resp: httpx.Response, objs: dict[str, str]) -> None:
    """Delete the webhooks a matrix request was made with or made, so that no event is ever sent to them."""
    made = [objs["fresh_webhook"]] if row.get("fresh") == "webhook" else []
    if resp.status_code == 201 and resp.url.path == "/webhooks":
        made.append(resp.json()["id"])
    for hook_id in made:  # gone already after an allowed DELETE
        assert httpx.delete(f"{svc.url}/webhooks/{hook_id}", headers=svc.headers("root")).status_code in (204, 404)


@pytest.mark.parametrize("route", sorted(MATRIX), ids=lambda r: f"{r[0]} {r[1]}")
def test_authorisation_matrix(keyed: Keyed, owned: dict[str, str], route: tuple[str, str]) -> None:
    method, template = route
    row = MATRIX[route]
    for who in WHO:
        objs = dict(owned)
        if row.get("fresh"):
            objs[f"fresh_{row['fresh']}"] = _fresh(keyed, row["fresh"])
        kwargs: dict[str, Any] = {}
        if "json" in row:
            kwargs["json"] = row["json"](objs)
        if row.get("files"):
            kwargs["files"] = {"file": ("chat.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT_ROWS).encode())}
            kwargs["data"] = {"purpose": "fine-tune"}
        path = _fill(template, objs, row.get("fresh"))
        resp = httpx.request(method, keyed.url + path, headers=_headers(keyed, who), timeout=120, **kwargs)
        _drop_webhooks(keyed, row, resp, objs)
        if who in ("none", "wrong"):
            assert resp.status_code == 401, (who, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"
            err = resp.json()["error"]
            assert err["code"] == ("missing_api_key" if who == "none" else "invalid_api_key"), err
            if template.startswith("/v1/"):
                assert err["type"] == "authentication_error", err
            else:
                assert_error(resp, 401)
            continue
        row[who](resp, objs)
        if resp.status_code in (200, 202) and method == "POST" and "jobs" in template and "cancel" not in template:
            _settle(keyed, resp.json()["id"])  # frees the slot (alpha may hold 2 queued/running jobs)


def test_another_tenants_id_reads_exactly_like_an_unknown_one(keyed: Keyed, owned: dict[str, str]) -> None:
    unknown_job, unknown_ds = "job_" + "0" * 22, "ds_" + "0" * 22
    with keyed.client("beta") as c:
        for real, fake, path in ((owned["job"], unknown_job, "/jobs/{}"), (owned["ds"], unknown_ds, "/datasets/{}"),
                                 (owned["job"], unknown_job, "/jobs/{}/events")):
            a, b = c.get(path.format(real)), c.get(path.format(fake))
            assert a.status_code == b.status_code == 404
            assert a.json()["error"]["message"].replace(real, "X") == b.json()["error"]["message"].replace(fake, "X")
        sse = c.get(f"/jobs/{owned['job']}/events", headers={"Accept": "text/event-stream"})
        assert_error(sse, 404, "job_not_found")


def test_cli_sends_the_key(keyed: Keyed, owned: dict[str, str], tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"FTAAS_URL": keyed.url, "FTAAS_API_KEY": keyed.keys["alpha"], "COLUMNS": "200"}
    res = runner.invoke(cli_app, ["jobs", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert owned["job"] in res.stdout
    res = runner.invoke(cli_app, ["--api-key", keyed.keys["beta"], "job", owned["job"]], env=env)
    assert res.exit_code == 1 and res.stderr.startswith("error: job_not_found: "), res.output
    res = runner.invoke(cli_app, ["jobs"], env=env | {"FTAAS_API_KEY": ""})
    assert res.exit_code == 1 and res.stderr.startswith("error: missing_api_key: "), res.output
    made = runner.invoke(cli_app, ["keys", "new", "--tenant", "delta"])
    assert made.exit_code == 0, made.output
    key = made.stdout.split("shown once; give it to the tenant): ")[1].split()[0]
    line = made.stdout.split("line for FTAAS_API_KEYS_FILE: ")[1].strip()
    assert parse_keys_file(line) == [ApiKeyEntry(sha256=hash_key(key), tenant="delta")]
    assert key not in line


def test_dashboard_with_a_key(keyed: Keyed, owned: dict[str, str]) -> None:
    """With keys on, the page asks for a key; one kept in localStorage is sent, and the job page's live
    event stream (read with fetch, since EventSource sends no header) works with it."""
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium) and os.environ.get("CI", "").lower() != "true":
        pytest.skip(f"{chromium} is missing (CI installs it: .ci/run)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            ctx = browser.new_context(base_url=keyed.url)
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            page.goto("/#/")
            expect(page.get_by_test_id("error").first).to_contain_text("missing_api_key")
            expect(page.get_by_test_id("error").first).to_contain_text("API key")
            page.once("dialog", lambda d: d.accept(keyed.keys["alpha"]))
            page.get_by_test_id("api-key").click()
            page.wait_for_load_state()
            expect(page.get_by_test_id("api-key")).to_have_text("API key ✓")
            expect(page.get_by_test_id("jobs-table")).to_contain_text(owned["job"])
            assert page.evaluate("localStorage.getItem('ftaas.apiKey')") == keyed.keys["alpha"]
            page.goto(f"/#/jobs/{owned['job']}")
            expect(page.get_by_test_id("status").first).to_have_text("succeeded")
            ctx.close()
            other = browser.new_context(base_url=keyed.url)
            other.add_init_script(f"localStorage.setItem('ftaas.apiKey', {json.dumps(keyed.keys['beta'])})")
            page = other.new_page()
            page.goto(f"/#/jobs/{owned['job']}")
            expect(page.get_by_test_id("error").first).to_contain_text("job_not_found", timeout=30_000)
            other.close()
        finally:
            browser.close()
