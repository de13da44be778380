"""Settings: explicit flags over the environment over the config file, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings, load_settings
from tests.conftest import write


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write(tmp_path / "config.yaml", """
        small_model: hosted_vllm/from-file
        frontier_model: openai/from-file
        frontier_api_key: file-secret
        port: 9000
        policies: my-policies
        retry:
          max_attempts: 2
    """)


def test_environment_beats_the_config_file(
    clean_env: pytest.MonkeyPatch, config_file: Path
) -> None:
    clean_env.setenv("SMALLFIRST_SMALL_MODEL", "hosted_vllm/from-env")
    clean_env.setenv("SMALLFIRST_FRONTIER_API_KEY", "env-secret")
    clean_env.setenv("SMALLFIRST_RETRY", '{"max_attempts": 7}')
    clean_env.setenv("SMALLFIRST_AUTH", "false")
    settings = load_settings(config_file)
    assert settings.small_model == "hosted_vllm/from-env"
    assert settings.frontier_api_key.get_secret_value() == "env-secret"
    assert settings.retry.max_attempts == 7
    assert settings.auth == "off"
    # What the environment leaves alone still comes from the file.
    assert settings.frontier_model == "openai/from-file"
    assert settings.port == 9000
    # Relative paths in the file are relative to the file.
    assert settings.policies == (config_file.parent / "my-policies").resolve()


def test_file_values_stand_without_environment(
    clean_env: pytest.MonkeyPatch, config_file: Path
) -> None:
    settings = load_settings(config_file)
    assert settings.small_model == "hosted_vllm/from-file"
    assert settings.frontier_api_key.get_secret_value() == "file-secret"
    assert settings.retry.max_attempts == 2
    assert settings.auth == "on"  # the default: auth is never off by accident
    assert "file-secret" not in repr(settings)
    assert [f.public_name for f in settings.frontiers] == ["from-file"]


def test_empty_environment_variables_count_as_unset(
    clean_env: pytest.MonkeyPatch, config_file: Path
) -> None:
    clean_env.setenv("SMALLFIRST_SMALL_MODEL", "")
    clean_env.setenv("SMALLFIRST_PORT", "")
    settings = load_settings(config_file)
    assert settings.small_model == "hosted_vllm/from-file" and settings.port == 9000


def test_explicit_flags_beat_the_environment(
    clean_env: pytest.MonkeyPatch, config_file: Path
) -> None:
    clean_env.setenv("SMALLFIRST_PORT", "5555")
    assert load_settings(config_file).port == 5555
    assert load_settings(config_file, port=1234, host=None).port == 1234


@pytest.mark.parametrize(
    ("text", "env"),
    [("port: many\n", {}), ("no_such_setting: 1\n", {}), ("- a list\n", {}),
     ("port: 1\n", {"SMALLFIRST_MAX_BODY_BYTES": "10"}), ("x: [\n", {})],
    ids=["bad-type", "unknown-key", "not-a-mapping", "env-below-minimum", "invalid-yaml"],
)
def test_invalid_configuration_is_a_config_error(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, text: str, env: dict[str, str]
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path / "config.yaml", text))
    with pytest.raises(ConfigError):
        load_settings(tmp_path / "absent.yaml")


def test_fallback_frontiers_follow_the_first(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings(
        frontier_model="openai/gpt-main",
        frontier_fallbacks=[{"model": "anthropic/claude-x", "name": "backup"}],
    )
    assert [f.public_name for f in settings.frontiers] == ["gpt-main", "backup"]


def test_a_decision_stream_needs_redis(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gateway.service import Gateway

    settings = load_settings(write(tmp_path / "config.yaml", """
        auth: off
        decision_stream: smallfirst:decisions
        rate_limits: {key: {requests_per_minute: 60}, stream_lease_s: 30}
    """))
    assert settings.rate_limits.key.requests_per_minute == 60
    with pytest.raises(ConfigError, match="decision_stream needs redis_url"):
        Gateway.from_settings(settings)
