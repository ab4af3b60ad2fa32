"""Ids, each defined once: the ones this service makes (``new_id``) and the hub ids users may send.

Hub ids are checked by the API's schemas and again by the worker.

A hub dataset name reaches ``datasets`` and a revision reaches ``huggingface_hub``, both of which read local
files as readily as the network. ``load_dataset(name)`` tries ``name`` as a folder relative to the worker's
working directory first (``data`` there is the default dataset store: every tenant's uploads), then as a
packaged builder (``json``, ``csv``, ...), then as a URL or a data-files glob. So the API admits only the
``namespace/name`` form of huggingface_hub's repo ids (no bare word: no builder name, no ``.``/``..`` segment,
no ``:``, ``*``, ``\\`` or leading ``/``), and the worker never gives the name to ``load_dataset`` at all: it
resolves it with ``huggingface_hub.snapshot_download(repo_type="dataset")``, which only ever talks to the hub
or its own cache (``HF_HUB_OFFLINE`` honoured), and loads the snapshot folder that call returns
(worker/train/data.py). A revision becomes a path under the cache (``refs/<revision>``) when offline, so it is a git
ref name without ``..`` or a leading ``/``.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

#: ``namespace/name``: the characters and rules of huggingface_hub's ``validate_repo_id``, namespace required.
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9_][\w.\-]{0,95}$")
#: A base model's name: a built-in one (a bare word) or a hub id; only names in settings are ever loaded.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9_][\w.\-]*)?$")
#: A git branch, tag or commit, as the hub takes it: word characters, ``.``, ``-`` and inner ``/``.
REVISION = re.compile(r"^[A-Za-z0-9_][\w.\-]*(/[\w.\-]+)*$")
#: A job's id (``new_job_id``), which also names its adapter; checked before it becomes a path.
JOB_ID = re.compile(r"^job_[0-9a-f]{22}$")
#: An uploaded dataset's id (``new_id("ds")``).
DATASET_ID = re.compile(r"^ds_[0-9a-f]{22}$")
#: A generate request's stream id (``new_id("gen")``).
GEN_ID = re.compile(r"^gen_[0-9a-f]{22}$")


def is_job_id(value: str) -> bool:
    return JOB_ID.fullmatch(value) is not None


def is_dataset_id(value: str) -> bool:
    return DATASET_ID.fullmatch(value) is not None


def hub_repo_id_problem(value: str) -> str | None:
    """Why ``value`` is not a hub dataset id (``namespace/name``), or None when it is one."""
    if not HUB_REPO_ID.fullmatch(value):
        return "must be a hub id of the form namespace/name (e.g. Abirate/english_quotes), not a path or URL"
    if ".." in value or "--" in value or value.endswith(".git"):
        return "must not hold '..' or '--' or end with '.git' (huggingface_hub refuses such ids)"
    return None


def revision_problem(value: str) -> str | None:
    """Why ``value`` is not a revision the hub takes, or None when it is one."""
    if not REVISION.fullmatch(value) or ".." in value or value.endswith((".lock", "/")):
        return "must be a branch, tag or commit hash (letters, digits, '_', '.', '-', inner '/'; no '..')"
    return None


_last_us = 0
_id_lock = threading.Lock()


def new_id(prefix: str) -> str:
    """``<prefix>_`` + 13 hex digits of microseconds (strictly increasing in a process) + 9 random.

    Ids sort by creation time, so the job and dataset indexes need no separate score.
    """
    global _last_us
    with _id_lock:
        _last_us = max(time.time_ns() // 1000, _last_us + 1)
        return f"{prefix}_{_last_us:013x}{secrets.token_hex(5)[:9]}"


def new_job_id() -> str:
    return new_id("job")
