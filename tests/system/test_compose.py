"""docker-compose.yml, checked without Docker (Dockerfile.gpu and .dockerignore: test_dockerfile.py).

No Docker engine runs where the tests do, so these read the file: the services and their wiring,
and that the commands in compose are the project's own entry points.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest

from app.core.queue import worker_argv
from app.serve import api_argv
from tests.system.compose_files import (
    APP_SERVICES,
    COMPOSE_FILE,
    DOCKERFILE,
    ROOT,
    SERVICES,
    WORKERS,
    command_words,
    env,
    healthcheck_text,
    load_compose,
    mounts,
    named_volume_at,
)

# ${HF_TOKEN}, ${HF_TOKEN:-}, ${HF_TOKEN-} or ${HF_TOKEN:?message}: from the host, with no default value.
HOST_TOKEN_REF = re.compile(r"\$\{HF_TOKEN(?::?-|:?\?[^}]*)?\}")
LITERAL_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


# --- docker-compose.yml ---------------------------------------------------------------------------


def test_the_four_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(SERVICES) <= set(services)


def test_redis_appends_to_a_named_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert str(redis["image"]).split(":")[0] in ("redis", "docker.io/library/redis")
    assert str(redis["image"]).split(":")[1].startswith("7")
    words = command_words(redis["command"])
    assert words[0] == "redis-server"
    assert words[words.index("--appendonly") + 1] == "yes"
    named_volume_at(compose, "redis", "/data")  # where the official image writes its AOF


def test_commands_are_the_entry_points(services: dict[str, dict[str, Any]]) -> None:
    assert services["api"]["command"] == api_argv("0.0.0.0", 8000)
    for name, queue in WORKERS.items():
        assert services[name]["command"] == worker_argv(queue), name


def test_api_is_published_on_8000(services: dict[str, dict[str, Any]]) -> None:
    ports = [str(p) if not isinstance(p, dict) else f"{p.get('published')}:{p['target']}"
             for p in services["api"].get("ports") or []]
    assert any(p.endswith(":8000") and p.split(":")[-2] == "8000" for p in ports), ports


def test_app_services_build_from_dockerfile_gpu(services: dict[str, dict[str, Any]]) -> None:
    assert DOCKERFILE.is_file()
    for name in APP_SERVICES:
        build = services[name].get("build")
        assert isinstance(build, dict), f"{name} must build the image"
        assert build.get("dockerfile") == DOCKERFILE.name, name
        assert (ROOT / build.get("context", ".")).resolve() == ROOT, name


def test_adapter_store_is_one_volume_at_the_data_dir(compose: dict[str, Any]) -> None:
    data_dirs = {name: env(compose["services"][name]).get("FTAAS_DATA_DIR") for name in APP_SERVICES}
    assert len(set(data_dirs.values())) == 1, data_dirs
    data_dir = data_dirs["api"]
    assert data_dir and data_dir.startswith("/"), data_dirs
    sources = {name: named_volume_at(compose, name, data_dir) for name in APP_SERVICES}
    assert len(set(sources.values())) == 1, sources


def test_workers_share_the_model_caches(compose: dict[str, Any]) -> None:
    for var in ("FTAAS_MODEL_CACHE_DIR", "HF_HOME"):
        found: dict[str, str] = {}
        for name in WORKERS:
            path = env(compose["services"][name]).get(var)
            assert path and path.startswith("/"), f"{name}: {var} must be an absolute path"
            targets = [t for t in mounts(compose["services"][name])
                       if path == t or path.startswith(t.rstrip("/") + "/")]
            assert targets, f"{name}: {var}={path} is on no volume"
            found[name] = named_volume_at(compose, name, max(targets, key=len))
        assert len(set(found.values())) == 1, (var, found)


def test_workers_reserve_a_gpu_and_the_api_none(services: dict[str, dict[str, Any]]) -> None:
    for name in WORKERS:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), name
        for d in devices:
            assert ("count" in d) != ("device_ids" in d), f"{name}: give exactly one of count or device_ids"
    assert "deploy" not in services["api"]
    assert env(services["api"]).get("FTAAS_DEVICE") is None


def test_workers_run_models_on_cuda(services: dict[str, dict[str, Any]]) -> None:
    # "auto" would quietly fall back to the CPU if the GPU were not handed to the container.
    for name in WORKERS:
        assert env(services[name]).get("FTAAS_DEVICE") == "cuda", name


def test_services_share_redis_and_wait_for_it(services: dict[str, dict[str, Any]]) -> None:
    urls = {env(services[name]).get("FTAAS_REDIS_URL") or env(services[name]).get("REDIS_URL") for name in APP_SERVICES}
    assert urls == {"redis://redis:6379/0"}
    for name in APP_SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_flower_is_optional_and_reads_the_workers_broker(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    assert flower.get("profiles") == ["flower"], "flower starts only with `--profile flower`"
    for name in SERVICES:
        assert not services[name].get("profiles"), f"{name} must start without a profile"
    # The same broker URL and the project's Celery app, hence the same global_keyprefix as the workers.
    broker = env(flower).get("FTAAS_REDIS_URL") or env(flower).get("REDIS_URL")
    assert broker == env(services["worker-train"]).get("FTAAS_REDIS_URL") == "redis://redis:6379/0"
    command = flower["command"]
    assert command[command.index("-A") + 1] == "worker.celery_app" and "flower" in command, command
    assert "--port=5555" in command or command[command.index("--port") + 1] == "5555", command
    assert any(str(p).endswith("5555:5555") for p in flower.get("ports") or []), flower.get("ports")
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"
    assert flower["build"] == services["api"]["build"], "flower runs in the project's image"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"flower\b", d) for d in deps), "the image installs the project's dependencies only"
    assert "/healthcheck" in healthcheck_text(flower)


def test_all_app_services_share_the_default_base_model(services: dict[str, dict[str, Any]]) -> None:
    # The API resolves the default, the workers load it: they must agree.
    models = {env(services[name]).get("FTAAS_DEFAULT_BASE_MODEL") for name in APP_SERVICES}
    assert models == {"google/gemma-2b"}


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]], name: str) -> None:
    hc = services[name].get("healthcheck") or {}
    assert not hc.get("disable"), name
    test = hc.get("test")
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_healthchecks_probe_the_right_thing(services: dict[str, dict[str, Any]]) -> None:
    assert re.search(r"redis-cli\b.*\bping\b", healthcheck_text(services["redis"]))
    api = healthcheck_text(services["api"])
    assert "urllib" in api and "http://localhost:8000/healthz" in api
    for name, queue in WORKERS.items():
        argv = worker_argv(queue)
        node = argv[argv.index("-n") + 1]
        assert node == f"{queue}@%h", "worker names changed: update the healthchecks"
        text = healthcheck_text(services[name])
        assert "-A worker.celery_app inspect ping" in text, name
        # %h in the worker's name is the container's hostname; $$ is compose's escape for $.
        assert re.search(rf"(-d|--destination)[ =]\"?{re.escape(queue)}@\$\$\{{?HOSTNAME\b", text), name


def test_hf_token_comes_from_the_host(services: dict[str, dict[str, Any]]) -> None:
    for name in WORKERS:
        value = env(services[name]).get("HF_TOKEN")
        assert value is not None and HOST_TOKEN_REF.fullmatch(value), f"{name}: HF_TOKEN={value!r}"
    for name in ("api", "redis"):
        assert "HF_TOKEN" not in env(services[name]), f"{name} needs no hub token"
    for name, svc in services.items():
        for var, value in env(svc).items():
            if "TOKEN" in var:
                assert HOST_TOKEN_REF.fullmatch(value), f"{name}: {var} is not taken from the host"


def test_no_literal_token_in_the_files() -> None:
    for path in (COMPOSE_FILE, DOCKERFILE):
        assert not LITERAL_TOKEN.search(path.read_text()), path.name
    assert not re.search(r"^\s*(ENV|ARG)\s+\S*TOKEN", DOCKERFILE.read_text(), re.M | re.I)
