"""The ``ftaas`` CLI against the real service (API, workers, Redis), plus its HTTP edge cases offline."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from app.cli import app
from app.cli.client import Client, iter_sse
from app.cli.follow import Follower
from tests.conftest import ROOT, free_port, wait_for

TINY_HP = json.dumps({"batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 64,
                      "gradient_checkpointing": False, "seed": 7})
runner = CliRunner()


@pytest.fixture(scope="module")
def cli_env(service: str) -> dict[str, str]:
    return {"FTAAS_URL": service, "FTAAS_API_KEY": "", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def quotes_file(tmp_path_factory: pytest.TempPathFactory, quotes: list[dict[str, Any]]) -> Path:
    path = tmp_path_factory.mktemp("cli") / "quotes.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in quotes[:8]))
    return path


def ftaas(env: dict[str, str], *args: str, stdin: str | None = None) -> Result:
    return runner.invoke(app, list(args), env=env, input=stdin)


def one_error_line(result: Result, code: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {code}: "), result.output
    return lines[0]


def test_train_follow_then_job_jobs_generate(cli_env: dict[str, str], quotes_file: Path) -> None:
    res = ftaas(cli_env, "train", str(quotes_file), "--base-model", "tiny-gemma", "--steps", "3", "-H", TINY_HP,
                "--name", "cli-follow", "--sample-prompt", "Quote: Imagination", "--follow")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "uploaded quotes.jsonl as ds_" in out and "(8 rows, jsonl)" in out
    job_id = out.split("created ", 1)[1].split()[0]
    assert job_id.startswith("job_") and f"following {job_id}" in out
    assert "3/3" in out and f"{job_id} succeeded at step 3/3" in out
    assert f"adapter: {job_id}" in out
    assert "eval_loss: " in out and "sample 1: 'Quote: Imagination'" in out and "  before: " in out
    assert "  after:  " in out

    res = ftaas(cli_env, "job", job_id)
    assert res.exit_code == 0 and "succeeded" in res.stdout and "cli-follow" in res.stdout, res.output
    assert "tiny-gemma" in res.stdout and "max_steps=3" in res.stdout and "sample 1:" in res.stdout
    record = json.loads(ftaas(cli_env, "job", job_id, "--json").stdout)
    assert record["status"] == "succeeded" and record["adapter"] == job_id

    res = ftaas(cli_env, "jobs", "--status", "succeeded", "--limit", "5")
    assert res.exit_code == 0 and job_id in res.stdout and "3/3" in res.stdout, res.output

    res = ftaas(cli_env, "generate", "--adapter", job_id, "--max-new-tokens", "6", "Quote: Imagination")
    assert res.exit_code == 0 and res.stdout.strip(), res.output

    res = ftaas(cli_env, "cancel", job_id)  # finished: the server's 409 as one line
    assert res.exit_code == 1
    one_error_line(res, "job_finished")


@pytest.fixture(scope="module")
def uploaded(cli_env: dict[str, str], quotes_file: Path) -> Result:
    """``ftaas datasets upload`` of the quotes file."""
    return ftaas(cli_env, "datasets", "upload", str(quotes_file))


def test_datasets_upload_and_list(cli_env: dict[str, str], uploaded: Result) -> None:
    assert uploaded.exit_code == 0, uploaded.output
    ds_id = uploaded.stdout.split()[0]
    assert ds_id.startswith("ds_") and "8 rows (jsonl)" in uploaded.stdout and "author, quote" in uploaded.stdout

    res = ftaas(cli_env, "datasets", "list", "--limit", "50")
    assert res.exit_code == 0 and ds_id in res.stdout and "quotes.jsonl" in res.stdout, res.output


def test_server_errors_are_one_line(cli_env: dict[str, str], quotes_file: Path) -> None:
    res = ftaas(cli_env, "train", str(quotes_file), "--base-model", "no-such-model", "--steps", "3")
    assert res.exit_code == 1
    assert "no-such-model" in one_error_line(res, "unknown_base_model")

    res = ftaas(cli_env, "job", "job_0000000000000000000000")
    assert res.exit_code == 1
    one_error_line(res, "job_not_found")

    res = ftaas(cli_env, "jobs", "--status", "sleeping")
    assert res.exit_code == 1
    one_error_line(res, "invalid_request")

    res = ftaas(cli_env, "train", str(quotes_file), "-H", "[1]")
    assert res.exit_code == 1
    one_error_line(res, "invalid_argument")
    res = ftaas(cli_env, "train", "no/such/file.jsonl")
    assert res.exit_code == 1
    one_error_line(res, "invalid_argument")


def test_unreachable_server_exits_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["jobs"], ["generate", "hi"], ["datasets", "list"]):
        res = ftaas({"FTAAS_URL": url}, *args)
        assert res.exit_code == 2, res.output
        assert url in one_error_line(res, "unreachable") and "FTAAS_URL" in res.stderr


def test_http_details_offline() -> None:
    """The bearer token, a streamed /generate answer, a non-envelope error, and SSE framing."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/generate":
            body = 'data: {"text": "Hello"}\n\n: ping\n\ndata: {"text": ", world"}\n\ndata: [DONE]\n\n'
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(502, text="<html>bad gateway</html>")

    with Client("http://ftaas.test", api_key="sk-test") as c:
        c.http = httpx.Client(base_url=c.url, headers=c.http.headers, transport=httpx.MockTransport(handler))
        assert "".join(c.stream_post("/generate", {"prompt": "x"})) == "Hello, world"
        with pytest.raises(Exception, match="bad gateway") as info:
            c.get("/jobs")
    assert getattr(info.value, "code", None) == "http_502"
    assert all(r.headers["authorization"] == "Bearer sk-test" for r in seen)
    frames = list(iter_sse(iter(["id: 1-0", "event: step", "data: {}", "", ": keep-alive", "", "data: a", "data: b"])))
    assert frames == [{"id": "1-0", "event": "step", "data": "{}"}, {"data": "a\nb"}]


class _Dropping(httpx.SyncByteStream):
    """An event stream that sends one frame, then the connection drops."""

    def __iter__(self) -> Iterator[bytes]:
        yield b'id: 1-0\nevent: queued\ndata: {"id": "1-0", "type": "queued"}\n\n'
        raise httpx.ReadError("connection reset")


def test_event_stream_resumes_after_a_drop() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("last-event-id"))
        if len(seen) == 1:
            return httpx.Response(200, stream=_Dropping(), headers={"content-type": "text/event-stream"})
        body = 'id: 2-0\nevent: succeeded\ndata: {"id": "2-0", "type": "succeeded"}\n\n'
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    with Client("http://ftaas.test") as c:
        c.http = httpx.Client(base_url=c.url, transport=httpx.MockTransport(handler))
        assert [e["id"] for e in c.events("job_x")] == ["1-0", "2-0"]
    assert seen == [None, "1-0"]


def test_ctrl_c_detach_then_follow_and_cancel(cli_env: dict[str, str], uploaded: Result, client: httpx.Client,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while following, 'n': the CLI detaches and the job keeps going. Then SIGINT to a subprocess
    `python -m app.cli job ID --follow`, 'y' on stdin: the job is cancelled and the CLI follows it to its end."""
    ds_id = uploaded.stdout.split()[0]

    def interrupted(self: Client, job_id: str, last_id: str | None = None) -> Iterator[dict[str, Any]]:
        raise KeyboardInterrupt
        yield {}

    with monkeypatch.context() as m:
        m.setattr(Client, "events", interrupted)
        res = ftaas(cli_env, "train", ds_id, "--base-model", "tiny-gemma", "--steps", "5000", "-H", TINY_HP,
                    "--follow", stdin="n\n")
    assert res.exit_code == 0 and "uploaded" not in res.stdout, res.output
    job_id = res.stdout.split("created ", 1)[1].split()[0]
    assert f"Cancel job {job_id}?" in res.stdout and f"detached; {job_id} keeps running" in res.stdout
    wait_for(client, job_id, set(), check=lambda j: j["progress"]["step"] >= 1, timeout=120)

    env = {k: v for k, v in os.environ.items() if not k.startswith("FTAAS_")} | cli_env | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "job", job_id, "--follow"], cwd=ROOT, env=env,
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(f"following {job_id}")
        time.sleep(0.5)  # into the event stream
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate("y\n", timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out
    assert f"Cancel job {job_id}?" in out and f"{job_id}: cancel requested (status running)" in out, out
    assert f"{job_id} cancelled at step" in out and "Traceback" not in out, out
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["request"]["dataset"] == {"id": ds_id}


def test_cancel(cli_env: dict[str, str], uploaded: Result, client: httpx.Client) -> None:
    res = ftaas(cli_env, "train", uploaded.stdout.split()[0], "--base-model", "tiny-gemma", "--steps", "1",
                "-H", TINY_HP)
    assert res.exit_code == 0 and "following" not in res.stdout, res.output
    job_id = res.stdout.split("created ", 1)[1].split()[0]
    res = ftaas(cli_env, "cancel", job_id)
    assert res.exit_code == 0 and res.stdout.startswith(f"{job_id} cancel"), res.output
    assert client.get(f"/jobs/{job_id}").json()["status"] in ("cancelled", "running")


def test_follow_shows_every_phase_and_the_servers_whole_job_eta(cli_env: dict[str, str], client: httpx.Client,
                                                                 quotes: list[dict[str, Any]],
                                                                 service_logs: Path) -> None:
    """The live bar reads the phase and the ETA from the job's own events: the bar of a real job with a
    validation set, replayed event by event, says what the job is doing and "estimating" until a step is
    measured, then the server's ETA (not rich's guess from the bar's speed)."""
    body = {"base_model": "tiny-gemma", "dataset": {"rows": quotes[:16]}, "validation": {"fraction": 0.25},
            "hyperparameters": json.loads(TINY_HP) | {"max_steps": 4, "eval_interval": 2}}
    created = client.post("/jobs", json=body)
    assert created.status_code == 202, created.text
    job = created.json()
    res = ftaas(cli_env, "job", job["id"], "--follow")
    assert res.exit_code == 0 and f"{job['id']} succeeded at step 4/4" in res.stdout, res.output
    events = client.get(f"/jobs/{job['id']}/events", params={"limit": 500}).json()["data"]

    follower = Follower(Console(file=io.StringIO()), job)
    shown: list[tuple[str, str]] = []
    for ev in events:
        follower.on_event(ev)
        task = follower.progress.tasks[0]
        shown.append((str(task.description), str(task.fields["eta"])))
    order = list(dict.fromkeys(d for d, _ in shown))
    assert order[:1] == ["queued"] and order[-1] == "succeeded", order
    for words in ("preparing data", "loading model", "evaluating (before) 1/1", "sampling (before)", "training",
                  "sampling (after)", "saving"):
        assert words in order, (words, order)
    assert order.index("evaluating (before) 1/1") < order.index("training") < order.index("saving")
    etas = [eta for d, eta in shown if d in ("preparing data", "loading model", "evaluating (before) 1/1")]
    assert etas and set(etas) == {"estimating"}, "no ETA before a training step is measured"
    after_training = [eta for d, eta in shown if d in ("sampling (after)", "saving")]
    assert after_training and all(re.fullmatch(r"\d+:\d\d", eta) for eta in after_training), shown

    # the train worker logs one INFO line per step, in one stable form, and no step at WARNING level
    # (transformers' PrinterCallback printed every log dict to stdout, which Celery logs as WARNING)
    log_lines = (service_logs / "train.log").read_text().splitlines()
    steps = [line for line in log_lines if f"{job['id']} step " in line]
    assert len(steps) == 4 and all("INFO" in line for line in steps), steps
    assert all(re.search(rf"{job['id']} step {k}/4 loss \d+\.\d{{4}} lr \S+ grad_norm \S+ eta (\d+s|-)$", line)
               for k, line in enumerate(steps, 1)), steps
    assert not [line for line in log_lines if "WARNING" in line and "'loss'" in line]
