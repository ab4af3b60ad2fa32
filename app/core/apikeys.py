"""API keys: making them, the configured table of their hashes, and the open-mode bind check.

Plain Python (stdlib + pydantic): the CLI (``ftaas keys new``) and ``ftaas serve`` import it without
the web framework. Keys are never configured in plaintext: an entry is the SHA-256 hex digest of a key,
its tenant and whether it is an admin key. A presented key is hashed and compared with every entry in
constant time (``hmac.compare_digest``), so neither the match nor its position shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

#: Tenant names: lower-case letters, digits, ``_ . -``; they become part of Redis keys, never of a path.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
#: The tenant that owns what is made while no keys are configured (open mode).
OPEN_TENANT = "local"
KEY_PREFIX = "ftaas_"


class ApiKeyEntry(BaseModel):
    """One configured key: the SHA-256 hex of the key (never the key itself), its tenant, admin or not."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hashlib.sha256(key).hexdigest()")
    tenant: str = Field(pattern=TENANT_PATTERN)
    admin: bool = False


_ENTRIES = TypeAdapter(list[ApiKeyEntry])


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: ``ftaas_`` + 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def entry_line(key: str, tenant: str, admin: bool = False) -> str:
    """The line to paste into the keys file for ``key`` (the file's line format)."""
    return f"{hash_key(key)} {tenant}{' admin' if admin else ''}"


def parse_keys_file(text: str, where: str = "the API keys file") -> list[ApiKeyEntry]:
    """A JSON list of entries, or lines ``<sha256 hex> <tenant> [admin]`` (``#`` starts a comment)."""
    try:
        if text.lstrip().startswith("["):
            return _ENTRIES.validate_json(text)
        entries = []
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "admin"):
                raise ValueError(f"line {n}: expected '<sha256 hex> <tenant> [admin]'")
            try:
                entries.append(ApiKeyEntry(sha256=parts[0], tenant=parts[1], admin=len(parts) == 3))
            except ValidationError as e:
                raise ValueError(f"line {n}: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
        return entries
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"{where}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant, whether it may see every tenant's objects, and whether auth is off."""

    tenant: str
    admin: bool = False
    open: bool = False

    def owns(self, owner: str | None) -> bool:
        """Whether the caller may see an object made by ``owner`` (None: a record from before tenants)."""
        return self.admin or owner == self.tenant

    @property
    def scope(self) -> str | None:
        """The tenant to list objects of; None (every tenant) for admins."""
        return None if self.admin else self.tenant


OPEN_PRINCIPAL = Principal(OPEN_TENANT, admin=True, open=True)


class KeyTable:
    """The configured keys. Empty: the service runs open (every caller is the admin ``local`` tenant)."""

    def __init__(self, entries: list[ApiKeyEntry]) -> None:
        self.entries = entries
        self._digests = [bytes.fromhex(e.sha256) for e in entries]

    @property
    def open(self) -> bool:
        return not self.entries

    def lookup(self, key: str) -> Principal | None:
        """The principal of a presented key, or None. Every entry is compared, in constant time."""
        digest = hashlib.sha256(key.encode()).digest()
        found: ApiKeyEntry | None = None
        for entry, expected in zip(self.entries, self._digests, strict=True):
            if hmac.compare_digest(digest, expected):
                found = entry
        return Principal(found.tenant, found.admin) if found else None

    def describe(self) -> str:
        tenants = {e.tenant for e in self.entries}
        admins = sum(e.admin for e in self.entries)
        return f"{len(self.entries)} API key(s) for {len(tenants)} tenant(s), {admins} admin"


def load_table(env_entries: list[ApiKeyEntry], keys_file: Path | None) -> KeyTable:
    """The entries from the environment (``FTAAS_API_KEYS``) plus those of ``FTAAS_API_KEYS_FILE``."""
    entries = list(env_entries)
    if keys_file is not None:
        try:
            text = keys_file.read_text()
        except OSError as e:
            raise ValueError(f"cannot read the API keys file {keys_file}: {e.strerror or e}") from None
        entries += parse_keys_file(text, str(keys_file))
    return KeyTable(entries)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_bind_refusal(table: KeyTable, host: str, allow_open: bool) -> str | None:
    """Why the API must not start (open on a non-loopback address without FTAAS_ALLOW_OPEN), or None."""
    if not table.open or allow_open or is_loopback(host):
        return None
    return (f"ftaas: refusing to serve without API keys on {host!r}, which is not a loopback address: "
            "anyone who can reach it could train and generate. Configure keys (FTAAS_API_KEYS_FILE or "
            "FTAAS_API_KEYS; `ftaas keys new --tenant NAME` makes one), bind to 127.0.0.1, or set "
            "FTAAS_ALLOW_OPEN=true to run open anyway.")
