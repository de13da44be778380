"""Policies mounted from a Kubernetes ConfigMap reload in place, without a restart.

The kubelet does not edit a mounted ConfigMap's files: each key is a symlink `name ->
..data/name`, `..data` is a symlink to a timestamped folder, and an update writes a new
timestamped folder and swaps `..data` to it with one rename. This builds that layout, lets the
store's real watcher run, and performs the same swap.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.policy_store import PolicyStore

WATCH_TIMEOUT_S = 10.0
_stamp = itertools.count()


class ConfigMapVolume:
    """A folder laid out and updated the way the kubelet writes a ConfigMap volume."""

    def __init__(self, root: Path, files: dict[str, str]) -> None:
        self.root = root
        self.update(files)

    def update(self, files: dict[str, str]) -> None:
        stamp = self.root / time.strftime(f"..%Y_%m_%d_%H_%M_%S.{next(_stamp)}")
        stamp.mkdir()
        for name, text in files.items():
            (stamp / name).write_text(text)
        data = self.root / "..data"
        old = data.resolve() if data.is_symlink() else None
        os.symlink(stamp.name, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", data)  # the one atomic step
        for link in self.root.iterdir():
            if link.is_symlink() and link.name != "..data" and link.name not in files:
                link.unlink()
        for name in files:
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)
        if old is not None:
            shutil.rmtree(old)


def policy(name: str, threshold: float) -> str:
    return (f"name: {name}\nroute: cascade\n"
            f"confidence: {{scorer: logprob, threshold: {threshold}}}\n")


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[tuple[PolicyStore, ConfigMapVolume]]:
    volume = ConfigMapVolume(tmp_path, {"default.yaml": policy("auto", 0.5)})
    store = PolicyStore(tmp_path, "auto")
    stop = asyncio.Event()
    task = asyncio.create_task(store.watch(stop))
    await asyncio.sleep(0.5)  # the watcher is set up
    yield store, volume
    stop.set()
    await asyncio.wait_for(task, 5)


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WATCH_TIMEOUT_S
    while not check():
        assert time.monotonic() < deadline, f"not reloaded within {WATCH_TIMEOUT_S}s: {what}"
        await asyncio.sleep(0.05)


async def test_configmap_update_is_reloaded(watched: tuple[PolicyStore, ConfigMapVolume]) -> None:
    store, volume = watched
    assert store.get("auto").confidence.threshold == 0.5
    volume.update({"default.yaml": policy("auto", 0.7), "chat.yaml": policy("chat", 0.6)})
    await until(lambda: store.get("chat") is not None, "a key added to the ConfigMap")
    assert store.get("auto").confidence.threshold == 0.7
    volume.update({"default.yaml": policy("auto", 0.8)})
    await until(lambda: store.get("chat") is None, "a key removed from the ConfigMap")
    assert store.get("auto").confidence.threshold == 0.8
    assert store.last_error is None


async def test_invalid_update_keeps_the_last_good_set(
    watched: tuple[PolicyStore, ConfigMapVolume],
) -> None:
    store, volume = watched
    volume.update({"default.yaml": "name: auto\nroute: nowhere\n"})
    await until(lambda: store.last_error is not None, "an invalid update")
    assert store.get("auto").confidence.threshold == 0.5
    volume.update({"default.yaml": policy("auto", 0.9)})
    await until(lambda: store.last_error is None, "a fixed update")
    assert store.get("auto").confidence.threshold == 0.9
