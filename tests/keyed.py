"""A second ftaas service with API keys on, for the security tests: its own Redis prefix and logs,
the same Redis database and data folder as the shared (open) one. Workers only where a test needs a
job or a generation to actually run."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.core.apikeys import entry_line, new_key
from app.core.queue import GENERATE_QUEUE, TRAIN_QUEUE, worker_argv
from app.serve import api_argv, local
from tests.conftest import ROOT, free_port

#: (name, tenant, admin) of the keys every keyed service has.
KEYS = (("alpha", "alpha", False), ("beta", "beta", False), ("gamma", "gamma", False), ("root", "ops", True))


@dataclass
class Keyed:
    url: str
    keys: dict[str, str]  # name -> plaintext key
    logs: Path
    prefix: str
    canary: str = ""
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    def client(self, name: str | None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, headers=self.headers(name) if name else {})

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


@contextmanager
def keyed_service(service_env: dict[str, str], logs: Path, name: str, *, train: bool = False,
                  generate: bool = False, extra_env: dict[str, str] | None = None,
                  cwd: Path = ROOT) -> Iterator[Keyed]:
    """Start the API (and the asked-for workers) with the KEYS in a keys file, in ``cwd``; stop them at the end."""
    keys = {n: new_key() for n, _, _ in KEYS}
    keys_file = logs / "api-keys.txt"
    keys_file.write_text("# test keys\n" + "".join(entry_line(keys[n], t, a) + "\n" for n, t, a in KEYS))
    prefix = f"{service_env['FTAAS_REDIS_PREFIX']}-keyed-{name}"
    env = service_env | {"FTAAS_REDIS_PREFIX": prefix, "FTAAS_API_KEYS_FILE": str(keys_file)} | (extra_env or {})
    port = free_port()
    commands = {"api": api_argv("127.0.0.1", port)}
    if train:
        commands["train"] = worker_argv(TRAIN_QUEUE)
    if generate:
        commands["generate"] = worker_argv(GENERATE_QUEUE)
    svc = Keyed(f"http://127.0.0.1:{port}", keys, logs, prefix, env.get("HF_TOKEN", ""), env)
    if train or generate:
        subprocess.run([sys.executable, "-m", "worker.models", "tiny-gemma"], env=env, cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    for proc_name, argv in commands.items():
        out = (logs / f"{proc_name}.log").open("wb")
        svc.procs[proc_name] = subprocess.Popen(local(argv), env=env, cwd=cwd, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)
    probe = "/readyz" if len(commands) == 3 else "/healthz"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{svc.url}{probe}", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in svc.procs.values()):
                raise RuntimeError(f"keyed service {name} did not start: {svc.log_text()[-3000:]}")
            time.sleep(0.3)
        yield svc
    finally:
        for p in svc.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in svc.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)


#: The main keyed service's limits: small, so the tests reach them (tests/api/test_limits.py).
MAIN_LIMITS = {"FTAAS_MAX_ACTIVE_JOBS": "2", "FTAAS_GENERATE_RATE": "5", "FTAAS_GENERATE_RATE_WINDOW_S": "10",
               "FTAAS_MAX_BODY_BYTES": str(256 * 1024), "FTAAS_MAX_INLINE_ROWS": "200",
               "FTAAS_MAX_STEP_EXAMPLES": "5000", "FTAAS_MAX_LENGTH": "512", "FTAAS_MAX_NEW_TOKENS": "32",
               "FTAAS_MAX_PROMPT_CHARS": "300", "FTAAS_MAX_PROMPTS": "4", "FTAAS_GENERATE_TIMEOUT_S": "120"}


@contextmanager
def main_keyed_service(service_env: dict[str, str], logs: Path) -> Iterator[Keyed]:
    """Keys on, train and generate workers, MAIN_LIMITS, and a canary hub token in every process's
    environment (tests/api/test_secrets.py looks for it everywhere afterwards)."""
    extra = MAIN_LIMITS | {"HF_TOKEN": f"hf_canary{secrets.token_hex(16)}"}
    with keyed_service(service_env, logs, "main", train=True, generate=True, extra_env=extra) as svc:
        yield svc
