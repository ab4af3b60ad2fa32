"""``make run``: the whole service on one machine: Redis (when none answers), the API and both workers.

Ctrl-C (or SIGTERM) stops every process this started. The commands are the same entry points
that docker-compose.yml and the tests run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

import redis

from app.core.apikeys import load_table, open_bind_refusal
from app.core.queue import GENERATE_QUEUE, TRAIN_QUEUE, worker_argv
from app.core.settings import BUILTIN_MODELS, get_settings

# uvicorn closes an idle keep-alive connection after 5 s by default; a client that reuses it at that moment
# gets a reset (httpx ReadError). With 200 clients polling every 0.5 s on a busy 2-core machine, gaps over 5 s
# happen (tests/system/test_load.py at 20 jobs saw them). Idle connections cost little: keep them longer than the
# 60 s most proxies and clients use, so the client side closes first.
KEEP_ALIVE_S = 75


def api_argv(host: str, port: int) -> list[str]:
    return ["python", "-m", "uvicorn", "app.api.main:app", "--host", host, "--port", str(port),
            "--timeout-keep-alive", str(KEEP_ALIVE_S)]


def local(argv: list[str]) -> list[str]:
    """Run an entry point with this interpreter (``python`` in compose is the image's)."""
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def start_redis(url: str) -> subprocess.Popen[bytes]:
    """A private redis-server for a loopback REDIS_URL that nothing answers (AOF on, in a temp dir)."""
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1") or not shutil.which("redis-server"):
        sys.exit(f"ftaas: nothing answers at {url} and no local redis-server can be started for it")
    workdir = tempfile.mkdtemp(prefix="ftaas-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(parsed.port or 6379), "--bind", "127.0.0.1",
                             "--dir", workdir, "--appendonly", "yes", "--save", ""], start_new_session=True)
    for _ in range(50):
        if redis_answers(url):
            return proc
        time.sleep(0.1)
    proc.terminate()
    sys.exit(f"ftaas: redis-server did not start at {url}")


def main() -> int:
    settings = get_settings()
    try:  # before starting anything: a bad keys file, or no keys on a public address, stops here
        refusal = open_bind_refusal(load_table(settings.api_keys, settings.api_keys_file), settings.host,
                                    settings.allow_open)
    except ValueError as e:
        refusal = f"ftaas: {e}"
    if refusal:
        print(refusal, file=sys.stderr, flush=True)
        return 2
    procs: list[subprocess.Popen[bytes]] = []
    if not redis_answers(settings.redis_url):
        print(f"ftaas: starting redis-server for {settings.redis_url}", flush=True)
        procs.append(start_redis(settings.redis_url))
    if settings.default_base_model in BUILTIN_MODELS:
        # Convert the built-in model once before the workers start, so the first job does not wait on it.
        subprocess.run([sys.executable, "-m", "worker.models", settings.default_base_model], check=True)
    for argv in (api_argv(settings.host, settings.port), worker_argv(TRAIN_QUEUE), worker_argv(GENERATE_QUEUE)):
        procs.append(subprocess.Popen(local(argv), start_new_session=True))
    print(f"ftaas: API on http://{settings.host}:{settings.port} (docs at /docs); Ctrl-C stops everything",
          flush=True)

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    while not stopping:
        for p in procs:
            if p.poll() is not None:
                print(f"ftaas: {p.args!r} exited with {p.returncode}; stopping", flush=True)
                stopping, code = True, 1
        time.sleep(0.5)
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)  # each child leads its own group: workers' children go too
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    return code


if __name__ == "__main__":
    sys.exit(main())
