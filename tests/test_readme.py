"""What the README tells a new user to type is what the code accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from gateway.config import load_settings
from tooling.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_every_config_block_is_a_valid_configuration(tmp_path: Path) -> None:
    configs = [b for b in blocks("yaml") if "small_api_base" in b or "frontier_model" in b]
    assert len(configs) >= 2
    for number, text in enumerate(configs):
        path = tmp_path / f"config-{number}.yaml"
        path.write_text(text)
        settings = load_settings(path)
        assert settings.frontiers, text  # each one names a frontier


def test_every_smallfirst_command_parses() -> None:
    commands = [line.split("#")[0].strip() for block in blocks("bash")
                for line in block.splitlines() if line.strip().startswith("smallfirst ")]
    assert any(c.startswith("smallfirst small-model serve") for c in commands)
    assert any(c.startswith("smallfirst redis serve") for c in commands)
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert callable(args.func), command


def test_the_client_example_compiles_and_sets_sampling() -> None:
    (example,) = [b for b in blocks("python") if "OpenAI(base_url" in b]
    compile(example, "README example", "exec")
    assert "temperature=" in example
