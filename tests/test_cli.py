"""The `smallfirst` command line: policy and key commands, `serve` settings and refusals."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from gateway.api.auth import hash_key, is_loopback
from tests.conftest import POLICIES, SHIPPED_POLICIES, write
from tooling import cli
from tooling.cli import main, policy_schema


def test_policy_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(SHIPPED_POLICIES)]) == 0
    out = capsys.readouterr().out
    assert "ok  auto  (auto, default)" in out

    bad = write(tmp_path / "bad.yaml", "name: bad\nstreaming:\n  mode: sideways\n")
    assert main(["policy", "check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3: streaming.mode" in err

    assert main(["policy", "check", str(tmp_path / "absent")]) == 1


def test_policy_schema_and_key_hash_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "schema"]) == 0
    assert capsys.readouterr().out == policy_schema()
    assert main(["keys", "hash", "sk-test"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("sk-test")


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["nonsense"])
    assert caught.value.code == 2


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "gateway.internal"])
def test_serve_without_auth_off_loopback_is_refused(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    served: list[Any] = []
    clean_env.setattr("uvicorn.run", lambda *a, **k: served.append(a))  # must never be reached
    code = main(["serve", "--no-auth", "--host", host, "--policies", str(POLICIES)])
    assert code == 2
    assert not served
    assert "refusing to run without auth" in capsys.readouterr().err


def serve_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *argv])


def test_serve_settings_allow_open_loopback_and_keyed_public(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for host in ("127.0.0.1", "localhost", "::1"):
        assert is_loopback(host)
        assert cli._serve_settings(serve_args("--no-auth", "--host", host)).auth == "off"
    keys = write(tmp_path / "keys.yaml", "tenants: {a: {keys: [k]}}\n")
    clean_env.setenv("SMALLFIRST_API_KEYS_FILE", str(keys))
    settings = cli._serve_settings(serve_args("--host", "0.0.0.0", "--port", "9999"))
    assert (settings.auth, settings.host, settings.port) == ("on", "0.0.0.0", 9999)
