"""Loading, validating and hot-swapping the policy directory.

A reload validates every file first and swaps the whole set atomically; an invalid edit
leaves the last good set serving and is kept as `last_error` for `GET /admin/policies`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.policy import Policy

log = logging.getLogger("smallfirst.policy")

POLICY_SUFFIXES = (".yaml", ".yml")


class PolicyError(Exception):
    """One or more policy files are invalid; `problems` holds 'file:line: message' lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PolicySet:
    """Policies by every name they answer to."""

    policies: tuple[Policy, ...]
    by_name: dict[str, Policy] = field(repr=False)
    loaded_at: float

    @classmethod
    def of(cls, policies: Iterable[Policy]) -> PolicySet:
        policies = tuple(policies)
        return cls(policies, {n: p for p in policies for n in p.names}, time.time())


def _node_at(root: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """The deepest YAML node along a pydantic error location."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                return node
            key, value = match[0]
            node = key if part == loc[-1] else value
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return node
            node = node.value[part]
        else:
            return node
    return node


def _describe(path: Path, root: yaml.Node | None, err: dict[str, Any]) -> str:
    node = _node_at(root, tuple(err["loc"]))
    line = node.start_mark.line + 1 if node is not None else 1
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{path}:{line}: {where}: {err['msg']}"


def load_policy_file(path: Path) -> Policy:
    """Parse and validate one policy file; the policy's name defaults to the file's stem."""
    try:
        text = path.read_text()
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read: {exc}"]) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise PolicyError([f"{path}:{line}: invalid YAML: {exc}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError([f"{path}:1: expected a mapping of policy settings"])
    data.setdefault("name", path.stem)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError([_describe(path, root, e) for e in exc.errors()]) from exc


def policy_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file())


def load_policy_dir(directory: Path) -> PolicySet:
    """Validate every policy file in `directory`; all problems are reported together."""
    if not directory.is_dir():
        raise PolicyError([f"{directory}: not a directory (resolved to {directory.resolve()}); "
                           "pass --policies DIR, or run from the repository, whose policies/ "
                           "holds the shipped ones"])
    policies, problems, owner = [], [], {}
    for path in policy_files(directory):
        try:
            policy = load_policy_file(path)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        for name in policy.names:
            if name in owner:
                problems.append(f"{path}:1: name {name!r} is already used by {owner[name]}")
            owner[name] = path
        policies.append(policy)
    if not policies and not problems:
        problems.append(f"{directory}: no policy files (*.yaml)")
    if problems:
        raise PolicyError(problems)
    return PolicySet.of(policies)


class PolicyStore:
    """The serving policy set, swapped whole on a successful reload."""

    def __init__(self, directory: Path, default_policy: str) -> None:
        self.directory = directory
        self.default_policy = default_policy
        self.current = self._load_checked()
        self.last_error: list[str] | None = None
        self.reloads = 0

    def _load_checked(self) -> PolicySet:
        policies = load_policy_dir(self.directory)
        if self.default_policy not in policies.by_name:
            raise PolicyError([f"{self.directory}: default policy {self.default_policy!r} missing"])
        return policies

    def get(self, name: str) -> Policy | None:
        return self.current.by_name.get(name)

    @property
    def default(self) -> Policy:
        return self.current.by_name[self.default_policy]

    def reload(self) -> bool:
        """Reload from disk; on any problem keep serving the last good set."""
        try:
            policies = self._load_checked()
        except PolicyError as exc:
            self.last_error = exc.problems
            log.error("policy reload rejected, last good policies keep serving:\n%s", exc)
            return False
        self.current, self.last_error = policies, None
        self.reloads += 1
        log.info("policies reloaded: %s", ", ".join(p.name for p in policies.policies))
        return True

    def status(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "default": self.default_policy,
            "loaded_at": self.current.loaded_at,
            "reloads": self.reloads,
            "last_error": self.last_error,
            "policies": [p.model_dump(mode="json") for p in self.current.policies],
        }

    async def watch(self, stop: asyncio.Event | None = None) -> None:
        """Reload whenever a file in the directory changes (runs until cancelled)."""
        from watchfiles import awatch

        async for _changes in awatch(self.directory, stop_event=stop, debounce=200):
            self.reload()
