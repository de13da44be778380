"""`/metrics` for several workers on one port: every worker's series, whichever one answers.

A scrape of the shared port reaches one worker, at random. That worker asks the others for
their figures through a folder they share: it writes the time of the scrape to `scrape`, each
worker's watcher thread (which looks every `WATCH_S`) writes its Prometheus text to
`worker-<slot>.prom` stamped with that time, and once every live worker has answered (or
`ANSWER_S` has passed: then a worker's previous text) the texts are merged, each series
labelled `worker="<slot>"`. Counters summed over `worker` count every request the port served
before the scrape. A replaced worker restarts its series from zero under the same label, which
Prometheus reads as a counter reset (as for a restarted pod). Nothing is collected between
scrapes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

log = logging.getLogger("smallfirst.metrics")
WATCH_S = 0.05  # how often a worker looks for a scrape request (a read of a few bytes)
ANSWER_S = 1.0  # how long a scrape waits for the other workers' fresh figures
STAMP = "# smallfirst worker pid={pid} scrape={scrape}\n"  # a comment: no series of its own


class WorkerExposition:
    """This worker's side of the shared folder: answers scrape requests, and merges every
    worker's text when it is the one scraped."""

    def __init__(self, registry: CollectorRegistry, directory: Path, slot: int) -> None:
        self.registry = registry
        self.directory = Path(directory)
        self.slot = slot
        self.request = self.directory / "scrape"
        self._stop = threading.Event()
        self._writing = threading.Lock()  # the watcher and a scrape share the temp file
        self._answered = 0  # the latest scrape this worker's file answers

    def path(self, slot: int) -> Path:
        return self.directory / f"worker-{slot}.prom"

    def start(self) -> None:
        self.write(0)  # present from the start, figures or not
        threading.Thread(target=self._watch, name="worker-metrics", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_S):
            asked = _read_int(self.request)
            if asked > self._answered:
                try:
                    self.write(asked)
                except Exception:  # a full disk must not end the worker; the next ask may work
                    log.exception("worker metrics: cannot write %s", self.path(self.slot))

    def write(self, scrape: int) -> bytes:
        """This worker's text, stamped with the scrape it answers, written atomically."""
        text = STAMP.format(pid=os.getpid(), scrape=scrape).encode() + \
            generate_latest(self.registry)
        partial = self.path(self.slot).with_suffix(f".{os.getpid()}.tmp")
        with self._writing:
            partial.write_bytes(text)
            partial.replace(self.path(self.slot))  # readers see the old text or the new
            self._answered = max(self._answered, scrape)
        return text

    async def merged(self) -> bytes:
        """Every worker's series, as of this scrape, with a `worker` label."""
        scrape = time.monotonic_ns()  # one clock for every process on the machine
        try:
            texts = {self.slot: self.write(scrape).decode()}  # before asking: no double work
            _write_atomically(self.request, str(scrape))
        except OSError:  # the shared folder is gone or full: this worker's figures alone
            log.exception("worker metrics: cannot share figures through %s", self.directory)
            return merge({self.slot: generate_latest(self.registry).decode()})
        deadline = time.monotonic() + ANSWER_S
        while True:
            waiting = self._others(scrape, texts)
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(WATCH_S / 2)
        if waiting:
            log.warning("worker metrics: workers %s did not answer the scrape within %.1f s; "
                        "their previous figures are served", sorted(waiting), ANSWER_S)
        return merge(texts)

    def _others(self, scrape: int, texts: dict[int, str]) -> set[int]:
        """Reads the other workers' texts into `texts`; the live ones yet to answer `scrape`."""
        waiting = set()
        for path in self.directory.glob("worker-*.prom"):
            slot = int(path.stem.removeprefix("worker-"))
            if slot == self.slot:
                continue
            try:
                text = path.read_text()
            except OSError:
                continue
            texts[slot] = text
            pid, answered = _stamp(text)
            if answered < scrape and _alive(pid):
                waiting.add(slot)
        return waiting


def merge(texts: dict[int, str]) -> bytes:
    """Prometheus texts as one: each family's lines together (as the format requires), its
    HELP and TYPE once, every sample with `worker="<slot>"` first among its labels."""
    families: dict[str, list[str]] = {}
    first: dict[str, int] = {}  # family -> the slot whose HELP and TYPE lines are kept
    for slot, text in sorted(texts.items()):
        label = f'worker="{slot}"'
        lines: list[str] = []
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                name = line.split(" ", 3)[2]
                lines = families.setdefault(name, [])
                if first.setdefault(name, slot) == slot:
                    lines.append(line)
            elif line and not line.startswith("#"):
                brace, space = line.find("{"), line.find(" ")
                if 0 <= brace < space:
                    lines.append(f"{line[:brace + 1]}{label},{line[brace + 1:]}")
                else:
                    lines.append(f"{line[:space]}{{{label}}}{line[space:]}")
    return "".join(line + "\n" for lines in families.values() for line in lines).encode()


def _stamp(text: str) -> tuple[int, int]:
    """(pid, scrape) from a worker text's first line."""
    first = text.split("\n", 1)[0]
    if not first.startswith("# smallfirst worker "):
        return 0, 0
    fields = dict(part.split("=", 1) for part in first.split()[3:])
    return int(fields.get("pid", 0)), int(fields.get("scrape", 0))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    partial.write_text(text)
    partial.replace(path)
