"""API keys -> tenants. Keys are held only as SHA-256 hashes.

The keys file is YAML:

    tenants:
      acme:
        keys: ["sk-live-..."]            # plain keys, hashed on load
        key_hashes: ["sha256:9f86d0..."]  # or their hashes (`smallfirst keys hash KEY`)
        admin: false                      # may call /admin endpoints
        limits: {requests_per_minute: 600, tokens_per_minute: 200000, concurrent_streams: 20}
        key_limits: {requests_per_minute: 60}  # each key of the tenant on its own

`limits` and `key_limits` override, field by field, the config's `rate_limits.tenant` and
`rate_limits.key` defaults (gateway.limits). The file is re-read when it changes (checked at
most once a second, on requests): a revoked key stops working without a restart; an invalid
edit is logged and the last good keys stay.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.config import ConfigError, read_yaml, validation_message
from gateway.errors import AuthenticationError
from gateway.limits import Limits

OPEN_TENANT = "local"
RECHECK_S = 1.0
log = logging.getLogger("smallfirst.auth")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool = False
    key_id: str = ""  # the presented key's hash, shortened: its rate-limit scope
    limits: Limits | None = None
    key_limits: Limits | None = None


class _TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[str] = Field(default_factory=list)
    key_hashes: list[str] = Field(default_factory=list)
    admin: bool = False
    limits: Limits | None = None
    key_limits: Limits | None = None


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenants: dict[str, _TenantEntry]


class KeyStore:
    """Resolves a presented bearer key to its tenant, or raises AuthenticationError."""

    def __init__(self, tenants_by_hash: dict[str, Tenant], path: Path | None = None) -> None:
        self._by_hash = tenants_by_hash
        self._path = path
        self._stamp = _stamp(path) if path is not None else None
        self._checked = time.monotonic()

    @classmethod
    def from_file(cls, path: Path) -> KeyStore:
        return cls(_read_keys(path), path)

    def _refresh(self) -> None:
        """Re-read the keys file if it changed since the last look (at most once a second)."""
        now = time.monotonic()
        if self._path is None or now - self._checked < RECHECK_S:
            return
        self._checked = now
        stamp = _stamp(self._path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._by_hash = _read_keys(self._path)
        except ConfigError as exc:
            log.error("API keys file rejected, the last good keys stay: %s", exc)
            return
        log.info("API keys reloaded from %s", self._path)

    def authenticate(self, authorization: str | None) -> Tenant:
        self._refresh()
        if not authorization:
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>'."
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("Malformed Authorization header: expected 'Bearer <key>'.")
        # Lookup is by SHA-256 digest: timing reveals nothing about the stored keys.
        tenant = self._by_hash.get(hash_key(key.strip()))
        if tenant is None:
            raise AuthenticationError("Incorrect API key provided.")
        return tenant


def _read_keys(path: Path) -> dict[str, Tenant]:
    raw = read_yaml(path, "API keys file") or {}
    try:
        parsed = _KeysFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_message(exc)} (expected tenants: NAME: "
                          "{keys: [...]} or {key_hashes: [...]}; see README)") from exc
    by_hash: dict[str, Tenant] = {}
    for name, entry in parsed.tenants.items():
        hashes = [hash_key(k) for k in entry.keys] + [h.lower() for h in entry.key_hashes]
        for digest in hashes:
            if not digest.startswith("sha256:") or len(digest) != 71:
                raise ConfigError(f"{path}: tenant {name!r}: bad key hash {digest[:16]}..."
                                  " (expected sha256:<64 hex>; `smallfirst keys hash KEY`)")
            by_hash[digest] = Tenant(name, entry.admin, digest[7:23], entry.limits,
                                     entry.key_limits)
    return by_hash


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class OpenAccess:
    """Local-development mode: every caller is the admin tenant `local`."""

    def authenticate(self, authorization: str | None) -> Tenant:
        return Tenant(OPEN_TENANT, admin=True)


def is_loopback(host: str) -> bool:
    return host in {"localhost", "::1"} or host.startswith("127.")
