"""Fast unit tests, no processes: policies, CLI, configuration, auth, retries, validation."""

from __future__ import annotations

import argparse
import os
import random
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from gateway import retry
from gateway.api.auth import KeyStore, OpenAccess, hash_key, is_loopback
from gateway.api.openai_types import ChatCompletionRequest, CompletionRequest, parse
from gateway.config import ConfigError, RetryConfig, Settings, load_settings
from gateway.errors import AuthenticationError, InvalidRequest, RateLimited
from gateway.policy_store import PolicyError, PolicyStore, load_policy_dir, load_policy_file
from gateway.retry import Backoff, call_with_retry
from tooling import cli
from tooling.cli import main, policy_schema

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SMALLFIRST_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("SMALLFIRST_"):
            monkeypatch.delenv(name)
    return monkeypatch


# ---- policy files ------------------------------------------------------------------------------


def problems_of(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_file(path)
    return caught.value.problems


def test_every_bad_value_is_reported_at_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", """
        name: p
        route: cascade
        confidence:
          scorer: logprob
          threshold: 1.5
        streaming:
          mode: buffer
          holdback_tokens: 0
    """)
    problems = problems_of(path)
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}:5: confidence.threshold: ")
    assert problems[1].startswith(f"{path}:8: streaming.holdback_tokens: ")
    assert all("pydantic" not in p for p in problems)


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        ("name: p\nroute: sideways\n", 2, "route: Input should be"),
        ("name: p\nlatency_budget:\n  p99_ms: 300\n  small_tft: 10\n", 4,
         "latency_budget.small_tft: Extra inputs are not permitted"),
        ("name: p\nstreaming:\n  mode: [buffer\n", 4, "invalid YAML"),
        ("name: has space\n", 1, "name: String should match pattern"),
        ("- name: p\n", 1, "expected a mapping"),
        ("name: p\naliases: [q, p]\n", 1, "name and aliases must all be different"),
        ("name: p\n\n\nconfidence:\n  min_token_logprob: 2\n", 5,
         "confidence.min_token_logprob: "),
    ],
    ids=["bad-literal", "unknown-key", "invalid-yaml", "bad-name", "not-a-mapping",
         "alias-repeats-name", "positive-logprob-floor"],
)
def test_problems_name_file_and_line(tmp_path: Path, text: str, line: int, says: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:{line}: "), problem
    assert says in problem


def test_policy_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    policy = load_policy_file(write(tmp_path / "batch-jobs.yaml", "route: small_only\n"))
    assert policy.name == "batch-jobs" and policy.route == "small_only"
    assert load_policy_file(write(tmp_path / "empty.yaml", "")).name == "empty"


def test_duplicate_names_across_files_are_rejected(tmp_path: Path) -> None:
    first = write(tmp_path / "a.yaml", "name: a\naliases: [shared]\n")
    second = write(tmp_path / "b.yaml", "name: b\naliases: [shared, a]\n")
    with pytest.raises(PolicyError) as caught:
        load_policy_dir(tmp_path)
    assert caught.value.problems == [
        f"{second}:1: name 'shared' is already used by {first}",
        f"{second}:1: name 'a' is already used by {first}",
    ]


def test_all_files_are_checked_before_failing(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "name: a\nroute: nowhere\n")
    write(tmp_path / "b.yaml", "name: b\nconfidence: {threshold: 2}\n")
    write(tmp_path / "c.yaml", "name: c\n")
    (tmp_path / "notes.md").write_text("not a policy")
    (tmp_path / "schema.json").write_text("{}")
    with pytest.raises(PolicyError) as caught:
        load_policy_dir(tmp_path)
    assert [p.split(":", 2)[0] for p in caught.value.problems] == [
        str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]


def test_empty_or_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no policy files"):
        load_policy_dir(tmp_path)
    with pytest.raises(PolicyError, match="not a directory"):
        load_policy_dir(tmp_path / "absent")


def test_default_policy_must_exist(tmp_path: Path) -> None:
    write(tmp_path / "other.yaml", "name: other\n")
    with pytest.raises(PolicyError) as caught:
        PolicyStore(tmp_path, "auto")
    assert caught.value.problems == [f"{tmp_path}: default policy 'auto' missing"]
    assert PolicyStore(tmp_path, "other").default.name == "other"


def test_store_keeps_the_last_good_set_on_a_bad_reload(tmp_path: Path) -> None:
    path = write(tmp_path / "auto.yaml", "name: auto\nroute: cascade\n")
    store = PolicyStore(tmp_path, "auto")
    path.write_text("name: auto\nroute: frontier_only\n")
    assert store.reload() is True
    assert store.default.route == "frontier_only" and store.reloads == 1

    path.write_text("name: auto\nroute: [\n")
    assert store.reload() is False
    assert store.default.route == "frontier_only" and store.reloads == 1
    assert store.last_error and store.last_error[0].startswith(f"{path}:")
    assert store.status()["last_error"] == store.last_error

    path.write_text("name: renamed\n")  # valid file, but the default policy disappears
    assert store.reload() is False
    assert store.get("auto") is not None and store.get("renamed") is None

    path.write_text("name: auto\naliases: [default]\n")
    assert store.reload() is True
    assert store.last_error is None and store.get("default") is store.default


def test_shipped_policies_are_valid() -> None:
    policies = load_policy_dir(POLICIES)
    names = {n for p in policies.policies for n in p.names}
    assert {"auto", "default", "chat", "fast", "autocomplete", "quality"} <= names


def test_schema_json_is_up_to_date() -> None:
    assert (POLICIES / "schema.json").read_text() == policy_schema(), (
        "regenerate it: smallfirst policy schema > policies/schema.json"
    )


# ---- the command line ----------------------------------------------------------------------


def test_policy_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(POLICIES)]) == 0
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


def test_auth_on_without_a_keys_file_is_a_config_error(clean_env: pytest.MonkeyPatch) -> None:
    from gateway.service import Gateway

    with pytest.raises(ConfigError, match="no API keys file"):
        Gateway.from_settings(Settings(auth="on", policies=POLICIES))


# ---- configuration ---------------------------------------------------------------------------


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


# ---- auth --------------------------------------------------------------------------------------


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
    with pytest.raises(ValueError):
        KeyStore.from_file(path)


def test_open_access_is_the_local_admin() -> None:
    tenant = OpenAccess().authenticate(None)
    assert tenant.name == "local" and tenant.admin


# ---- retries -----------------------------------------------------------------------------------


def test_backoff_stays_within_its_bounds() -> None:
    backoff = Backoff(base_s=0.1, cap_s=1.0)
    rng_state = random.getstate()
    try:
        random.seed(1234)
        for failures in range(1, 10):
            bound = min(1.0, 0.1 * 2 ** (failures - 1))
            samples = [backoff.compute(failures) for _ in range(300)]
            assert all(0 <= s <= bound for s in samples)
            assert max(samples) > bound / 2  # full jitter spreads over the whole range
            assert len(set(samples)) > 250
    finally:
        random.setstate(rng_state)


class Flaky(Exception):
    def __init__(self, retryable: bool = True, retry_after: float | None = None) -> None:
        super().__init__("flaky")
        self.retryable = retryable
        self.retry_after = retry_after


async def run_retry(
    monkeypatch: pytest.MonkeyPatch,
    failures: list[Flaky],
    config: RetryConfig,
    deadline: float | None = None,
) -> tuple[int, list[float], Any]:
    """Calls made, waits slept, and the result (or the exception raised)."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(retry, "asyncio", SimpleNamespace(sleep=sleep))
    calls = 0

    async def do() -> str:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)
        return "ok"

    try:
        result: Any = await call_with_retry(
            do, config,
            is_retryable=lambda e: isinstance(e, Flaky) and e.retryable,
            retry_after=lambda e: getattr(e, "retry_after", None),
            deadline=deadline,
        )
    except Flaky as exc:
        result = exc
    return calls, waits, result


CONFIG = RetryConfig(max_attempts=3, backoff_base_s=0.5, backoff_max_s=0.8, max_retry_after_s=5)


async def test_retries_until_success(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, waits, result = await run_retry(monkeypatch, [Flaky(), Flaky()], CONFIG)
    assert (calls, result) == (3, "ok")
    assert 0 <= waits[0] <= 0.5 and 0 <= waits[1] <= 0.8


async def test_gives_up_after_max_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, waits, result = await run_retry(monkeypatch, [Flaky() for _ in range(5)], CONFIG)
    assert calls == 3 and len(waits) == 2 and isinstance(result, Flaky)


async def test_non_retryable_errors_are_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, waits, result = await run_retry(monkeypatch, [Flaky(retryable=False)], CONFIG)
    assert calls == 1 and waits == [] and isinstance(result, Flaky)


async def test_retry_after_is_honoured_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, waits, result = await run_retry(monkeypatch, [Flaky(retry_after=2.5)], CONFIG)
    assert (calls, waits, result) == (2, [2.5], "ok")
    calls, waits, result = await run_retry(monkeypatch, [Flaky(retry_after=30)], CONFIG)
    assert calls == 1 and waits == [] and result.retry_after == 30


async def test_no_wait_past_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    soon = time.monotonic() + 1.0
    calls, waits, result = await run_retry(monkeypatch, [Flaky(retry_after=2)], CONFIG, soon)
    assert calls == 1 and waits == [] and isinstance(result, Flaky)


# ---- request validation ------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]


def invalid(model: type, body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(model, body)
    error = caught.value
    assert error.status_code == 400 and error.error_type == "invalid_request_error"
    assert "pydantic" not in error.message and "errors.pydantic.dev" not in error.message
    return error


def chat(**fields: Any) -> ChatCompletionRequest:
    return parse(ChatCompletionRequest, {"model": "auto", "messages": MESSAGES, **fields})


def test_only_one_choice_is_supported() -> None:
    error = invalid(ChatCompletionRequest, {"model": "auto", "messages": MESSAGES, "n": 2})
    assert error.param == "n" and "n=1" in error.message
    assert chat(n=1).n == 1
    assert "n" not in chat(n=1).model_params()
    legacy = invalid(CompletionRequest, {"model": "auto", "prompt": "hi", "n": 3})
    assert legacy.param == "n"


def test_max_completion_tokens_folds_into_max_tokens() -> None:
    params = chat(max_completion_tokens=50).model_params()
    assert params["max_tokens"] == 50 and "max_completion_tokens" not in params
    both = chat(max_tokens=10, max_completion_tokens=20).model_params()
    assert both["max_tokens"] == 20
    assert chat(max_tokens=10).model_params()["max_tokens"] == 10
    assert invalid(ChatCompletionRequest, {"model": "auto", "messages": MESSAGES,
                                           "max_completion_tokens": 0}).param == (
        "max_completion_tokens")


def test_at_most_four_stop_sequences() -> None:
    error = invalid(ChatCompletionRequest, {"model": "auto", "messages": MESSAGES,
                                            "stop": ["a", "b", "c", "d", "e"]})
    assert error.param == "stop" and "4 stop sequences" in error.message
    assert chat(stop=["a", "b", "c", "d"]).model_params()["stop"] == ["a", "b", "c", "d"]
    assert chat(stop="END").model_params()["stop"] == "END"


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"model": "auto"}, "messages", "Missing required parameter: 'messages'."),
        ({"messages": MESSAGES}, "model", "Missing required parameter: 'model'."),
        ({"model": "auto", "messages": []}, "messages", "Invalid value for 'messages'"),
        ({"model": "auto", "messages": MESSAGES, "temperature": 2.5}, "temperature",
         "Invalid value for 'temperature'"),
        ({"model": "auto", "messages": MESSAGES, "temperature": "hot"}, "temperature",
         "Invalid value for 'temperature'"),
        ({"model": "auto", "messages": [{"role": "robot", "content": "x"}]},
         "messages.0.role", "Invalid value for 'messages.0.role'"),
        ({"model": "auto", "messages": MESSAGES, "top_logprobs": 21}, "top_logprobs",
         "Invalid value"),
    ],
)
def test_invalid_requests_name_the_parameter(body: dict[str, Any], param: str, says: str) -> None:
    error = invalid(ChatCompletionRequest, body)
    assert error.param == param
    assert says in error.message
    assert error.body()["error"]["param"] == param


def test_body_must_be_an_object() -> None:
    for body in ([], "text", None, 3):
        assert "JSON object" in invalid(ChatCompletionRequest, body).message


def test_parameters_forwarded_to_models() -> None:
    request = chat(stream=True, stream_options={"include_usage": True}, temperature=0,
                   seed=7, metadata={"sdk": "extra"}, tools=[{"type": "function"}])
    params = request.model_params()
    assert params["temperature"] == 0 and params["seed"] == 7 and params["tools"]
    assert not {"model", "stream", "stream_options", "n"} & set(params)
    assert "top_p" not in params  # unset values are not sent
    assert request.include_usage
    assert not chat(stream_options={"include_usage": True}).include_usage  # not streamed


def test_legacy_prompt_becomes_one_user_message() -> None:
    request = parse(CompletionRequest, {"model": "auto", "prompt": ["Say hi"], "max_tokens": 5,
                                        "stream": True})
    as_chat = request.as_chat()
    assert as_chat.model_params()["messages"] == [{"role": "user", "content": "Say hi"}]
    assert as_chat.model_params()["max_tokens"] == 5 and as_chat.stream
    error = invalid(CompletionRequest, {"model": "auto", "prompt": ["a", "b"]})
    assert error.param == "prompt"


def test_rate_limit_errors_carry_retry_after() -> None:
    assert RateLimited("slow down", retry_after=0.2).headers() == {"Retry-After": "1"}
    assert RateLimited("slow down", retry_after=30.4).headers() == {"Retry-After": "30"}
    body = RateLimited("slow down").body()
    assert body == {"error": {"message": "slow down", "type": "rate_limit_error",
                              "param": None, "code": "rate_limit_exceeded"}}
