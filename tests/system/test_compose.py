"""docker-compose.yml, Dockerfile.gpu and .dockerignore, checked without Docker.

No Docker engine runs where the tests do, so these read the files: the services and their wiring,
and that the commands in compose and in the image are the project's own entry points.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.core.queue import GENERATE_QUEUE, TRAIN_QUEUE, worker_argv
from app.serve import api_argv

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile.gpu"
DOCKERIGNORE = ROOT / ".dockerignore"

WORKERS = {"worker-train": TRAIN_QUEUE, "worker-generate": GENERATE_QUEUE}
APP_SERVICES = ("api", *WORKERS)
SERVICES = ("redis", *APP_SERVICES)
# ${HF_TOKEN}, ${HF_TOKEN:-}, ${HF_TOKEN-} or ${HF_TOKEN:?message}: from the host, with no default value.
HOST_TOKEN_REF = re.compile(r"\$\{HF_TOKEN(?::?-|:?\?[^}]*)?\}")
LITERAL_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, whichever of compose's two forms it uses."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {k: "" if v is None else str(v) for k, v in raw.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> source, from the short ("src:target[:mode]") or the long syntax."""
    out: dict[str, str] = {}
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            assert len(parts) >= 2, f"anonymous volume {v!r}"
            out[parts[1]] = parts[0]
        else:
            out[v["target"]] = v.get("source", "")
    return out


def named_volume_at(compose: dict[str, Any], name: str, target: str) -> str:
    source = mounts(compose["services"][name]).get(target)
    assert source, f"{name}: nothing mounted at {target}"
    assert source in (compose.get("volumes") or {}), f"{name}: {source!r} at {target} is not a named volume"
    return source


def healthcheck_text(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    return " ".join(test) if isinstance(test, list) else str(test or "")


def command_words(command: Any) -> list[str]:
    return list(command) if isinstance(command, list) else shlex.split(command)


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


# --- Dockerfile.gpu -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            instr, _, args = full.partition(" ")
            out.append((instr.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line, split at && || ; and |."""
    words = shlex.split(script, posix=True)
    commands: list[list[str]] = [[]]
    for w in words:
        if w in ("&&", "||", ";", "|", "then", "else", "fi", "do", "done"):
            commands.append([])
        elif w.endswith(";") and w != ";":
            commands[-1].append(w[:-1])
            commands.append([])
        else:
            commands[-1].append(w)
    return [c for c in commands if c]


PIP_OPTIONS_WITH_VALUE = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
                          "-f", "--find-links", "-e", "--editable", "-t", "--target"}


def pip_install_targets(command: list[str]) -> list[str] | None:
    """What a `pip install` (or `python -m pip install`) installs, or None for another command."""
    if command[:2] == ["pip", "install"]:
        rest = command[2:]
    elif command[:1] in (["python"], ["python3"], ["python3.11"]) and command[1:4] == ["-m", "pip", "install"]:
        rest = command[4:]
    else:
        return None
    targets: list[str] = []
    skip = False
    for w in rest:
        if skip:
            skip = False
        elif w in PIP_OPTIONS_WITH_VALUE:
            skip = True
            if w in ("-e", "--editable"):
                targets.append("EDITABLE")
        elif not w.startswith("-"):
            targets.append(w)
    return targets


def test_dockerfile_cmd_is_the_api_entry_point() -> None:
    cmds = [args for instr, args in dockerfile_instructions() if instr == "CMD"]
    assert cmds, "no CMD"
    assert json.loads(cmds[-1]) == api_argv("0.0.0.0", 8000)


def test_dockerfile_installs_cuda_torch_then_the_project() -> None:
    instructions = dockerfile_instructions()
    args = {}
    for instr, rest in instructions:
        if instr == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
    base = next(rest for instr, rest in instructions if instr == "FROM").split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
    assert base.startswith(("nvidia/cuda:", "pytorch/pytorch:")) and "cuda" in base, base

    copied: set[str] = set()
    torch_at = project_at = None
    for i, (instr, rest) in enumerate(instructions):
        if instr == "COPY":
            copied.update(w.rstrip("/") for w in shlex.split(rest)[:-1] if not w.startswith("--"))
        if instr != "RUN":
            continue
        for command in shell_commands(rest):
            targets = pip_install_targets(command)
            if targets is None:
                continue
            if any(t.startswith("torch") or t == "$TORCH_SPEC" for t in targets) and torch_at is None:
                torch_at = i
            if "." in targets:
                assert "EDITABLE" not in targets, "the image installs the project, not an editable link to it"
                assert {"pyproject.toml", "app", "worker"} <= copied, "pip install . before the sources are copied"
                project_at = i
    assert torch_at is not None, "no pip install of torch"
    assert project_at is not None, "no `pip install .` of the project"
    assert torch_at < project_at
    assert args.get("TORCH_SPEC", "torch").startswith("torch")


def test_dockerfile_runs_as_a_user_who_owns_the_volumes(compose: dict[str, Any]) -> None:
    instructions = dockerfile_instructions()
    users = [rest for instr, rest in instructions if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("WORKDIR", "/srv") in instructions
    assert any(instr == "EXPOSE" and "8000" in rest.split() for instr, rest in instructions)
    # A named volume starts out as a copy of the image's directory, owner included.
    chowns = " ".join(rest for instr, rest in instructions if instr == "RUN" and "chown" in rest)
    for name in APP_SERVICES:
        for target, source in mounts(compose["services"][name]).items():
            if source in (compose.get("volumes") or {}):
                assert re.search(rf"(?<![\w/]){re.escape(target)}(?![\w/])", chowns), f"{target} is not chowned"


# --- .dockerignore --------------------------------------------------------------------------------


def ignore_patterns() -> list[re.Pattern[str]]:
    pats = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not handled by this test"
        rx = ""
        glob = line.strip("/")
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif glob[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif glob[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif glob[i] == "[":
                end = glob.index("]", i)
                rx, i = rx + glob[i:end + 1], end + 1
            else:
                rx, i = rx + re.escape(glob[i]), i + 1
        pats.append(re.compile(rx))
    return pats


def ignored(path: str, pats: list[re.Pattern[str]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(p.fullmatch(prefix) for p in pats for prefix in prefixes)


def test_dockerignore_keeps_the_build_context_small() -> None:
    pats = ignore_patterns()
    for path in (".venv/bin/python", ".git/HEAD", "data/adapters/x", "app/__pycache__/main.cpython-311.pyc",
                 ".pytest_cache/v", ".env"):
        assert ignored(path, pats), path


def copied_sources() -> list[str]:
    return [w for instr, rest in dockerfile_instructions() if instr == "COPY"
            for w in shlex.split(rest)[:-1] if not w.startswith("--")]


def test_what_the_dockerfile_copies_exists() -> None:
    sources = copied_sources()
    assert {"pyproject.toml", "app", "worker"} <= {s.rstrip("/") for s in sources}
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"Dockerfile.gpu copies {missing}, missing from the repository"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    pats = ignore_patterns()
    for src in copied_sources():
        assert not ignored(src.rstrip("/"), pats), f"{src} is in .dockerignore"
        path = ROOT / src
        if path.is_dir():
            files = [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
            assert files, src
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                assert not ignored(rel, pats), f"{rel} is in .dockerignore"
