"""The files tests/system/test_compose.py and test_dockerfile.py read, and readers for docker-compose.yml:
the services, their environment and their mounts, in whichever of compose's forms they are written."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from app.core.queue import GENERATE_QUEUE, TRAIN_QUEUE

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile.gpu"
DOCKERIGNORE = ROOT / ".dockerignore"

WORKERS = {"worker-train": TRAIN_QUEUE, "worker-generate": GENERATE_QUEUE}
APP_SERVICES = ("api", *WORKERS)
SERVICES = ("redis", *APP_SERVICES)


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


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
