"""API keys: hashing, the keys file, authentication and open (loopback) access."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.api.auth import KeyStore, OpenAccess, hash_key
from gateway.config import ConfigError
from gateway.errors import AuthenticationError


@pytest.fixture
def key_store(tmp_path: Path) -> KeyStore:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"tenants": {
        "acme": {"keys": ["sk-plain"], "key_hashes": [hash_key("sk-hashed").upper()
                                                      .replace("SHA256:", "sha256:")]},
        "ops": {"keys": ["sk-admin"], "admin": True},
    }}))
    return KeyStore.from_file(path)


def test_hash_key_format() -> None:
    digest = hash_key("sk-test")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert digest != hash_key("sk-test2")


def test_plain_and_hashed_keys_authenticate(key_store: KeyStore) -> None:
    assert key_store.authenticate("Bearer sk-plain").name == "acme"
    assert key_store.authenticate("Bearer sk-hashed").name == "acme"
    assert key_store.authenticate("bearer  sk-plain ").name == "acme"
    admin = key_store.authenticate("Bearer sk-admin")
    assert admin.name == "ops" and admin.admin
    assert not key_store.authenticate("Bearer sk-plain").admin


@pytest.mark.parametrize(
    ("header", "says"),
    [(None, "Missing API key"), ("", "Missing API key"), ("Bearer sk-nope", "Incorrect"),
     ("Basic c2s6cGxhaW4=", "Malformed"), ("Bearer", "Malformed"), ("Bearer   ", "Malformed"),
     ("sk-plain", "Malformed"), (hash_key("sk-plain"), "Malformed"),
     ("Bearer " + hash_key("sk-plain"), "Incorrect")],
)
def test_bad_credentials_are_rejected(key_store: KeyStore, header: str | None, says: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        key_store.authenticate(header)
    assert says in caught.value.message
    assert caught.value.status_code == 401


@pytest.mark.parametrize(
    "tenants",
    [{"a": {"key_hashes": ["md5:abc"]}}, {"a": {"key_hashes": ["sha256:abc"]}},
     {"a": {"keys": ["k"], "role": "admin"}}, {"a": {"keys": "not-a-list"}}],
)
def test_malformed_keys_files_are_refused(tmp_path: Path, tenants: dict[str, Any]) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    with pytest.raises(ConfigError, match=str(path)):  # one line naming the file
        KeyStore.from_file(path)


def test_open_access_is_the_local_admin() -> None:
    tenant = OpenAccess().authenticate(None)
    assert tenant.name == "local" and tenant.admin


def test_an_edited_keys_file_is_picked_up_and_a_broken_one_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.api.auth.RECHECK_S", 0.0)
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"tenants": {"acme": {"keys": ["sk-a", "sk-b"]}}}))
    store = KeyStore.from_file(path)
    assert store.authenticate("Bearer sk-b").name == "acme"

    path.write_text(yaml.safe_dump({"tenants": {"acme": {"keys": ["sk-a"]}}}))  # revoke sk-b
    with pytest.raises(AuthenticationError):
        store.authenticate("Bearer sk-b")
    path.write_text("tenants: [broken\n")
    assert store.authenticate("Bearer sk-a").name == "acme"  # the last good keys stay
    path.unlink()
    assert store.authenticate("Bearer sk-a").name == "acme"


def test_only_digests_are_kept_and_compared(key_store: KeyStore) -> None:
    """Keys are found by their SHA-256 digest, never compared as text: how long a lookup
    takes says nothing about how much of a stored key a guess got right."""
    held = repr(vars(key_store))
    assert "sk-plain" not in held and "sk-admin" not in held
    for near_miss in ("sk-plai", "sk-plainx", "Sk-plain", "sk-plaiN"):
        with pytest.raises(AuthenticationError, match="Incorrect API key"):
            key_store.authenticate(f"Bearer {near_miss}")
