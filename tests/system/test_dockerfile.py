"""Dockerfile.gpu and .dockerignore, checked without Docker (docker-compose.yml: test_compose.py).

No Docker engine runs where the tests do, so these read the files: that the image's command is the project's own
entry point, how it installs torch and the project, who it runs as, and what its build context keeps.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import pytest

from app.serve import api_argv
from tests.system.compose_files import APP_SERVICES, DOCKERFILE, DOCKERIGNORE, ROOT, load_compose, mounts


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


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
