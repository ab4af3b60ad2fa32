"""The layering is a test, not a hope: the import-linter contracts in pyproject.toml hold for the tree, and each
one fails when a violation is planted in a copy of it (so a contract that checks nothing would be caught)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path, contract: str | None = None) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(tree)}  # the copy's packages, not the installed checkout's
    only = ["--contract", contract] if contract else []
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", *only], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_tree_keeps_every_contract() -> None:
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and "0 broken" in done.stdout, done.stdout[-2000:]


#: (file, line planted at its end, the id of the contract that must break: pyproject.toml)
PLANTED = [
    ("app/core/ids.py", "import fastapi", "core-plain"),
    ("app/core/formats.py", "import torch", "core-plain"),
    ("worker/models.py", "from app.api import schemas", "worker-no-api"),
    ("app/api/routes/generate.py", "from app.api.routes import jobs", "routes-independent"),
    ("app/api/openai/routes.py", "from app.api.routes import datasets", "routes-independent"),
    ("app/api/deps.py", "import worker.tasks", "api-no-worker"),
    ("worker/train/packing.py", "import celery", "train-serve-no-celery"),
    ("worker/train/packing.py", "from worker.serve import multi_lora", "train-serve-siblings"),
    ("app/cli/views.py", "from app.core import store", "cli-http-only"),
]


@pytest.mark.parametrize(("path", "line", "contract"), PLANTED, ids=[f"{p}:{line}" for p, line, _ in PLANTED])
def test_a_planted_violation_breaks_its_contract(tmp_path: Path, path: str, line: str, contract: str) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("app", "worker"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    assert _lint(tree, contract).returncode == 0  # the copy keeps the contract before the plant
    with (tree / path).open("a") as f:
        f.write(f"\n{line}  # planted by tests/system/test_layering.py\n")
    done = _lint(tree, contract)
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout[-2000:]
    assert path.removesuffix(".py").replace("/", ".") in done.stdout, done.stdout[-2000:]  # names the culprit
