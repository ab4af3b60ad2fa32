"""Helpers of the fault tests (test_chaos, test_redis_restart, test_oom, test_load): a private cluster
(own key prefix, own data dir) of real API and worker processes that a test may kill, and the
settings that make the lease bounds short enough to test."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from app.core.queue import TRAIN_QUEUE, TRAIN_TASK, worker_argv
from app.serve import api_argv, local
from tests.conftest import ROOT, free_port

#: Lease settings of the fault tests: a lost job is requeued within LEASE_TTL_S + REAPER_INTERVAL_S.
LEASE_TTL_S, HEARTBEAT_S, REAPER_INTERVAL_S = 3.0, 1.0, 1.0
LOST_BOUND_S = LEASE_TTL_S + REAPER_INTERVAL_S


def cluster_env(service_env: dict[str, str], tmp: Path, **extra: str) -> dict[str, str]:
    """``service_env`` with its own key prefix and data dir, and short lease bounds."""
    return service_env | {
        "FTAAS_REDIS_PREFIX": f"ftaas-fault-{secrets.token_hex(4)}", "FTAAS_DATA_DIR": str(tmp / "data"),
        "FTAAS_LEASE_TTL_S": str(LEASE_TTL_S), "FTAAS_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        "FTAAS_REAPER_INTERVAL_S": str(REAPER_INTERVAL_S),
    } | extra


class Cluster:
    """Processes started by one test module; each leads its own process group, so a test can signal
    a worker's parent alone or the whole worker (parent and training child) at once."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.url = ""

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(local(argv), env=env or self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def api(self) -> str:
        port = free_port()
        self.start("api", api_argv("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("API did not start: " + self.log("api")[-2000:])

    def worker(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A train worker named ``name`` (``-n name@host``), started and ready (consuming)."""
        argv = worker_argv(TRAIN_QUEUE)
        argv[argv.index("-n") + 1] = f"{name}@%h"
        proc = self.start(name, argv, env)
        deadline = time.monotonic() + 90
        while " ready." not in self.log(name):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start: " + self.log(name)[-2000:])
            time.sleep(0.2)
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop every process, delete the cluster's keys."""
        for name in list(self.procs):
            self.stop(name)
        client = redis.Redis.from_url(self.env["FTAAS_REDIS_URL"])
        keys = list(client.scan_iter(f"{self.env['FTAAS_REDIS_PREFIX']}*", count=1000))
        if keys:
            client.delete(*keys)
        print(f"fault test logs in {self.logs}")


def children(pid: int) -> list[int]:
    """The process's child pids (a worker's training child)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def send_train_task(env: dict[str, str], job_id: str) -> None:
    """Put another message for ``job_id`` on the cluster's train queue, as a broker redelivery would."""
    from celery import Celery

    app = Celery("ftaas-test", broker=env["FTAAS_REDIS_URL"])
    app.conf.broker_transport_options = {"global_keyprefix": f"{env['FTAAS_REDIS_PREFIX']}:celery:"}
    try:
        app.send_task(TRAIN_TASK, args=[job_id], queue=TRAIN_QUEUE)
    finally:
        app.close()
