"""Several worker processes on one port, under a supervisor.

The supervisor binds the listening socket once and starts `workers` processes that inherit it;
the kernel gives each new connection to whichever worker accepts it first. Workers share
nothing but Redis: each builds its own Gateway. The supervisor replaces a worker that dies,
passes SIGTERM and SIGINT on (each worker drains as a single process does) and exits 0 once
all have stopped cleanly; SIGHUP (reload the policies) goes to every worker. It gives up,
stopping the others, when workers keep dying (`RESTARTS` within `RESTART_WINDOW_S`: exit 1)
or one refuses its configuration (exit 2).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from gateway.config import Settings

log = logging.getLogger("smallfirst.workers")

RESTARTS = 5
RESTART_WINDOW_S = 60.0
POLL_S = 0.2
BACKLOG = 2048  # uvicorn's default
CONFIG_ERROR = 2  # the command line's exit status for a configuration it refuses
# A clean exit: 0, or the signal passed on, re-raised once the drain is over (or taken while
# starting); 130 is the command line's status after Ctrl-C.
STOPPED = {0, 130, -signal.SIGTERM, -signal.SIGINT}

# (slot, listening descriptor, metrics folder) -> the worker's command line
WorkerCommand = Callable[[int, int, Path], list[str]]


def listen(host: str, port: int) -> socket.socket:
    """The listening socket every worker inherits."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, command: WorkerCommand, workers: int, sock: socket.socket,
                 grace_s: float = 30.0) -> None:
        self.command = command
        self.workers = workers
        self.sock = sock
        self.fd = sock.fileno()
        self.grace_s = grace_s
        self.directory = Path(tempfile.mkdtemp(prefix="smallfirst-workers-"))
        self.procs: dict[int, subprocess.Popen] = {}
        self.deaths: deque[float] = deque()
        self.stopping = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        signal.signal(signal.SIGHUP, lambda sig, frame: self._signal_all(sig))
        try:
            for slot in range(self.workers):
                self._start(slot)
            return self._watch()
        finally:
            self._stop_all()
            shutil.rmtree(self.directory, ignore_errors=True)

    def _start(self, slot: int) -> None:
        # Its own process group: a terminal's Ctrl-C reaches the supervisor alone, which passes
        # it on once (a second SIGINT would cut a worker's drain short).
        self.procs[slot] = subprocess.Popen(self.command(slot, self.fd, self.directory),
                                            pass_fds=(self.fd,), process_group=0)
        log.info("worker %d started (pid %d)", slot, self.procs[slot].pid)

    def _forward(self, sig: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            # No more replacements; once the workers close their copies, the port refuses.
            self.sock.close()
        self._signal_all(sig)

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    def _watch(self) -> int:
        while True:
            time.sleep(POLL_S)
            codes = {slot: proc.poll() for slot, proc in self.procs.items()}
            if self.stopping:
                if all(code is not None for code in codes.values()):
                    return 0 if all(code in STOPPED for code in codes.values()) else 1
                continue
            for slot, code in codes.items():
                if code is None:
                    continue
                if code == CONFIG_ERROR:
                    log.error("worker %d refused the configuration; stopping", slot)
                    return CONFIG_ERROR
                if self._too_many_deaths():
                    log.error("workers keep dying (%d within %.0f s, the last with status %s); "
                              "stopping", RESTARTS, RESTART_WINDOW_S, code)
                    return 1
                log.warning("worker %d (pid %d) exited with status %s; starting another",
                            slot, self.procs[slot].pid, code)
                self._start(slot)

    def _too_many_deaths(self) -> bool:
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths[0] < now - RESTART_WINDOW_S:
            self.deaths.popleft()
        return len(self.deaths) >= RESTARTS

    def _stop_all(self) -> None:
        """Stop what still runs (after giving up), within the grace period, then kill."""
        live = [proc for proc in self.procs.values() if proc.poll() is None]
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + self.grace_s
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_worker(settings: Settings, slot: int, fd: int, directory: Path) -> None:
    """One worker: its own Gateway on the inherited socket; its metrics shared with the
    others through `directory`. It stops (draining) if the supervisor is gone."""
    from gateway.api.app import create_app
    from gateway.api.server import serve
    from gateway.service import Gateway
    from gateway.telemetry.worker_metrics import WorkerExposition

    supervisor = os.getppid()
    sock = socket.socket(fileno=fd)
    gateway = Gateway.from_settings(settings)
    metrics = gateway.observer.metrics
    if metrics is not None:
        metrics.workers = WorkerExposition(metrics.registry, directory, slot)
        metrics.workers.start()
    try:
        serve(create_app(gateway), gateway, sockets=[sock], supervisor=supervisor)
    finally:
        if metrics is not None and metrics.workers is not None:
            metrics.workers.stop()
