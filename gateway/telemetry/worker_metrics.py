"""`/metrics` for several workers on one port: every worker's series, whichever one answers.

A scrape of the shared port reaches one worker, at random. So each worker writes its own
exposition to a folder the workers share (every `WRITE_INTERVAL_S`, atomically), and the one
that answers a scrape serves all the files of that folder merged, its own freshly collected,
each series labelled `worker="<slot>"`. Counters summed over `worker` count every request the
port served; a worker that died and was replaced restarts its series from zero under the same
label, which Prometheus reads as a counter reset (as for a restarted pod).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("smallfirst.metrics")
WRITE_INTERVAL_S = 1.0  # how stale another worker's figures may be in a scrape
SUFFIX = ".prom"


class WorkerExposition:
    """Writes this worker's exposition to `directory` and merges every worker's on a scrape."""

    def __init__(self, registry: CollectorRegistry, directory: Path, slot: int) -> None:
        self.registry = registry
        self.directory = Path(directory)
        self.slot = slot
        self._stop = threading.Event()
        self._writing = threading.Lock()  # the writer thread and a scrape share the temp file
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.directory / f"worker-{self.slot}{SUFFIX}"

    def start(self) -> None:
        self.write()
        self._thread = threading.Thread(target=self._loop, name="worker-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(WRITE_INTERVAL_S):
            try:
                self.write()
            except Exception:  # a full disk must not end the worker; the next try may work
                log.exception("worker metrics: cannot write %s", self.path)

    def write(self, text: bytes | None = None) -> None:
        text = generate_latest(self.registry) if text is None else text
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        with self._writing:
            partial.write_bytes(text)
            partial.replace(self.path)  # a reader sees the old file or the new one, never half

    def merged(self) -> bytes:
        """Every worker's series with a `worker` label; this worker's collected just now."""
        own = generate_latest(self.registry)
        try:
            self.write(own)
        except OSError:  # the others miss this worker's newest figures once; the scrape has them
            log.exception("worker metrics: cannot write %s", self.path)
        texts = {self.slot: own.decode()}
        for path in sorted(self.directory.glob(f"worker-*{SUFFIX}")):
            slot = int(path.name[len("worker-"):-len(SUFFIX)])
            if slot != self.slot:
                try:
                    texts[slot] = path.read_text()
                except OSError:  # replaced or removed meanwhile: that worker is left out once
                    continue
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(texts))
        return generate_latest(registry)


class _Merged:
    """A collector of the parsed expositions, one family per name, a `worker` label added."""

    def __init__(self, texts: dict[int, str]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for slot, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit)
                merged.samples.extend(s._replace(labels={**s.labels, "worker": str(slot)})
                                      for s in family.samples)
        return iter(families.values())
