"""Who is calling: the bearer key's principal (tenant + admin flag), or open mode when no keys are set.

Every router but health, the dashboard's static files and the OpenAPI pages depends on ``principal``,
so a request without a valid key never reaches a route (401 with ``WWW-Authenticate: Bearer``). Routes
that touch owned objects take ``Caller`` and answer another tenant's ids exactly like unknown ones (404).
Keys, hashing and the table live in app/core/apikeys.py.
"""

from __future__ import annotations

import logging
import sys
from functools import lru_cache
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import ApiError
from app.core.apikeys import OPEN_PRINCIPAL, KeyTable, Principal, load_table, open_bind_refusal
from app.core.settings import Settings, get_settings

log = logging.getLogger("uvicorn.error")  # uvicorn's own startup log, so the line shows with its others
_bearer = HTTPBearer(auto_error=False, description="An API key (`ftaas keys new`); not needed in open mode.")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@lru_cache
def key_table() -> KeyTable:
    s = get_settings()
    return load_table(s.api_keys, s.api_keys_file)


def principal(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """The caller; 401 for a missing, malformed or unknown key (unless the service runs open)."""
    table = key_table()
    if table.open:
        return OPEN_PRINCIPAL
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise ApiError(401, "missing_api_key", "send an API key as 'Authorization: Bearer <key>'",
                       headers=_CHALLENGE)
    found = table.lookup(creds.credentials)
    if found is None:
        raise ApiError(401, "invalid_api_key", "the API key is not valid", headers=_CHALLENGE)
    return found


def admin(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    """Only admin keys (and open mode): 403 for a tenant key."""
    if not caller.admin:
        raise ApiError(403, "forbidden", "this route needs an admin API key")
    return caller


Caller = Annotated[Principal, Depends(principal)]


def uvicorn_host(argv: list[str]) -> str | None:
    """The ``--host`` given to the uvicorn command line (uvicorn keeps its bind address to itself)."""
    for i, arg in enumerate(argv):
        if arg == "--host" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return None


def startup_check(settings: Settings) -> None:
    """At API startup: load the keys (a bad file stops the start), log the mode, and refuse to run open
    on a non-loopback address unless ``FTAAS_ALLOW_OPEN`` (RuntimeError: uvicorn exits non-zero)."""
    table = key_table()
    host = uvicorn_host(sys.argv) or settings.host
    refusal = open_bind_refusal(table, host, settings.allow_open)
    if refusal:
        log.error(refusal)
        raise RuntimeError(refusal)
    if table.open:
        log.warning("ftaas: auth is OPEN: no API keys configured, every caller is admin (bound to %s)", host)
    else:
        log.info("ftaas: auth by API key: %s", table.describe())
