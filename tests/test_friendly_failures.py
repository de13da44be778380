"""Mistakes in set-up end in one line that names the file, the line where known, and the fix;
errors a client gets still say how its request was routed."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from tests.conftest import script
from tooling.cli import main


def serve(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["serve", *args])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return code, err


def test_a_keys_file_that_is_not_yaml(tmp_path: Path, capsys) -> None:
    (tmp_path / "keys.yaml").write_text("tenants:\n  acme: {keys: [sk-1\n")
    (tmp_path / "config.yaml").write_text("api_keys_file: keys.yaml\n")
    code, err = serve(capsys, "--config", str(tmp_path / "config.yaml"))
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{tmp_path / 'keys.yaml'}:3:" in err and "API keys file" in err


def test_a_keys_file_of_the_wrong_shape(tmp_path: Path, capsys) -> None:
    (tmp_path / "keys.yaml").write_text("tenants:\n  acme: {keys: sk-1}\n")
    (tmp_path / "config.yaml").write_text("api_keys_file: keys.yaml\n")
    code, err = serve(capsys, "--config", str(tmp_path / "config.yaml"))
    assert code == 2 and "tenants.acme.keys" in err and "see README" in err


def test_a_config_file_with_a_bad_line_or_an_unknown_key(tmp_path: Path, capsys) -> None:
    (tmp_path / "broken.yaml").write_text("port: 8000\nhost: [\n")
    code, err = serve(capsys, "--config", str(tmp_path / "broken.yaml"))
    assert code == 2 and f"{tmp_path / 'broken.yaml'}:3:" in err
    (tmp_path / "typo.yaml").write_text("frontier_modle: openai/gpt-4o\n")
    code, err = serve(capsys, "--config", str(tmp_path / "typo.yaml"))
    assert code == 2 and "frontier_modle" in err and "Configuration" in err
    code, err = serve(capsys, "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err and "cannot read" in err


def test_serving_outside_the_repository_names_the_policies_flag(tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = serve(capsys, "--no-auth")
    assert code == 2 and "--policies" in err and str(tmp_path / "policies") in err


def test_a_port_in_use(capsys) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, err = serve(capsys, "--no-auth", "--port", str(port))
    assert code == 2 and f"127.0.0.1:{port}" in err and "--port" in err


def test_an_error_response_says_how_the_request_was_routed(cascade_gateway: str) -> None:
    body = {"model": "auto", "messages": [
        {"role": "user", "content": "hi" + script(status=500, key="routed-error")}]}
    response = httpx.post(f"{cascade_gateway}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 502
    assert response.headers["x-smallfirst-policy"] == "auto"
    assert response.headers["x-smallfirst-route"] == "escalated"
    assert response.headers["x-smallfirst-escalation"] == "error"
    assert "small" in response.headers["server-timing"]
    assert response.json()["error"]["type"]
