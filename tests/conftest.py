"""Real parts for the tests: Redis, the API under uvicorn and both Celery workers, as separate processes.

Everything runs under a unique Redis key prefix in its own database, so a running `make run`
on the same Redis is never disturbed. Built-in models are materialised once into the shared cache.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.core.queue import GENERATE_QUEUE, TRAIN_QUEUE, worker_argv
from app.core.store import JobStore
from app.serve import api_argv, local, redis_answers

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The machine's Redis (database 15), or a private redis-server when none answers."""
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    url = base.rsplit("/", 1)[0] + "/15" if base.count("/") > 2 else base + "/15"
    if redis_answers(url):
        yield url
        return
    port, workdir = free_port(), tempfile.mkdtemp(prefix="ftaas-test-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/15"
    for _ in range(100):
        if redis_answers(url):
            break
        time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def prefix(redis_url: str) -> Iterator[str]:
    p = f"ftaas-test-{secrets.token_hex(4)}"
    yield p
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{p}*", count=1000))  # the service's keys and the unit tests' (p-unit:...)
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def service_env(redis_url: str, prefix: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTAAS_")}
    env.update({
        "FTAAS_REDIS_URL": redis_url, "FTAAS_REDIS_PREFIX": prefix, "FTAAS_DATA_DIR": str(data_dir),
        "FTAAS_DEVICE": "cpu", "FTAAS_DEFAULT_BASE_MODEL": "tiny-gemma", "FTAAS_GENERATE_TIMEOUT_S": "600",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1", "FTAAS_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
    })
    return env


@pytest.fixture(scope="session")
def unit_prefix(prefix: str) -> str:
    """Keys of tests that write the stores directly: apart from the running service's, whose listings
    must only ever hold records the API made."""
    return f"{prefix}-unit"


@pytest.fixture(scope="session")
def store(redis_url: str, unit_prefix: str) -> JobStore:
    return JobStore.from_url(redis_url, unit_prefix)


SERVICE_LOGS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def service(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a running API with a train and a generate worker behind it."""
    subprocess.run([sys.executable, "-m", "worker.models", "tiny-gemma", "gemma-3-270m"],
                   env=service_env, cwd=ROOT, check=True)
    logs = tmp_path_factory.mktemp("logs")
    SERVICE_LOGS["dir"] = logs
    port = free_port()
    commands = {"api": api_argv("127.0.0.1", port), "train": worker_argv(TRAIN_QUEUE),
                "generate": worker_argv(GENERATE_QUEUE)}
    procs = []
    for name, argv in commands.items():
        out = (logs / f"{name}.log").open("wb")
        procs.append(subprocess.Popen(local(argv), env=service_env, cwd=ROOT, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("service did not become ready: " + " | ".join(
                    (logs / f"{n}.log").read_text()[-2000:] for n in commands))
            time.sleep(0.5)
        yield url
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
        print(f"service logs in {logs}")


@pytest.fixture(scope="session")
def service_logs(service: str) -> Path:
    """The folder of the ``service`` processes' logs: api.log, train.log, generate.log."""
    return SERVICE_LOGS["dir"]


@pytest.fixture(scope="session")
def client(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def quotes() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (ROOT / "examples" / "quotes.jsonl").read_text().splitlines() if line]


def tiny_job(rows: list[dict[str, Any]], **hp: Any) -> dict[str, Any]:
    hyper = {"max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 64,
             "gradient_checkpointing": False, "seed": 7} | hp
    return {"base_model": "tiny-gemma", "dataset": {"rows": rows}, "hyperparameters": hyper}


def wait_for(client: httpx.Client, job_id: str, statuses: set[str] = TERMINAL,
             timeout: float = 300, check: Any = None) -> dict[str, Any]:
    """Poll a job until its status is in ``statuses`` (or ``check(job)`` holds)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses or (check and check(job)):
            return job
        if job["status"] in TERMINAL:
            raise AssertionError(f"job ended {job['status']} while waiting: {job.get('error')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job['progress']}")
        time.sleep(0.3)


def assert_error(resp: httpx.Response, status: int, code: str | None = None,
                 field: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, body
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    if field:
        assert body["error"]["field"] == field, body
    assert "Traceback" not in resp.text
    return body["error"]



@pytest.fixture(scope="session")
def keyed(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A second service with API keys on (tests/keyed.py): its own prefix, train and generate workers,
    small limits and a canary HF_TOKEN. Started only by the tests that use it."""
    from tests.keyed import main_keyed_service

    with main_keyed_service(service_env, tmp_path_factory.mktemp("keyed")) as svc:
        yield svc
