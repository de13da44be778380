"""Policy files: loading, validation problems at their line, the store's reloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy_store import PolicyError, PolicyStore, load_policy_dir, load_policy_file
from tests.conftest import SHIPPED_POLICIES, write
from tooling.cli import policy_schema


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
    policies = load_policy_dir(SHIPPED_POLICIES)
    names = {n for p in policies.policies for n in p.names}
    assert {"auto", "default", "chat", "fast", "autocomplete", "quality"} <= names


def test_schema_json_is_up_to_date() -> None:
    assert (SHIPPED_POLICIES / "schema.json").read_text() == policy_schema(), (
        "regenerate it: smallfirst policy schema > policies/schema.json"
    )


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("latency_budget:\n  small_ttft", "0", "greater than 0"),
        ("latency_budget:\n  escalation", "-100", "greater than 0"),
        ("latency_budget:\n  small_timeout", ".inf", "finite number"),
        ("latency_budget:\n  p99_ms", ".nan", "finite number"),
        ("latency_budget:\n  small_generation", "86400000", "less than or equal to 600000"),
        ("latency_budget:\n  queueing", "-1", "greater than or equal to 0"),
        ("cache:\n  lookup_deadline_ms", "0", "greater than 0"),
        ("cache:\n  lookup_deadline_ms", "3600000", "less than or equal to 60000"),
        ("cache:\n  ttl_s", "1000000000000", "less than or equal to 31536000"),
        ("cache:\n  max_entries_per_tenant", "1e12", "integer"),
        ("cache:\n  max_entries_per_tenant", "0", "greater than or equal to 1"),
        ("cache:\n  semantic_max_false_hit_rate", "0", "greater than 0"),
        ("cache:\n  semantic_min_cosine", "1.5", "less than or equal to 1"),
        ("cache:\n  semantic_audit_rate", "-0.1", "greater than or equal to 0"),
        ("streaming:\n  holdback_tokens", "1000000000", "less than or equal to 4096"),
        ("streaming:\n  holdback_ms", "0", "greater than 0"),
        ("difficulty:\n  skip_threshold", "2", "less than or equal to 1"),
        ("confidence:\n  samples", "1000", "less than or equal to 8"),
        ("learning:\n  shadow_rate", "1.01", "less than or equal to 1"),
    ],
)
def test_dangerous_values_are_refused_at_their_line(tmp_path: Path, setting: str, value: str,
                                                    says: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\n# a comment line\n{setting}: {value}\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:4: "), problem  # the line of the setting
    assert says in problem, problem
