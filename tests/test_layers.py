"""The layering the architecture promises, checked on the code itself."""

import ast
import subprocess
import sys
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[1] / "gateway"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_lower_layers_never_import_the_engine_or_http():
    lower = [*GATEWAY.glob("telemetry/*.py"), *GATEWAY.glob("cache/*.py"),
             GATEWAY / "types.py", GATEWAY / "learning.py", GATEWAY / "backends.py"]
    for path in lower:
        above = {m for m in imported_modules(path)
                 if m in ("gateway.engine", "gateway.service") or m.startswith("gateway.api")}
        assert not above, f"{path.relative_to(GATEWAY)} imports {above}"


def test_types_import_nothing_that_handles_a_request():
    allowed = {"gateway.policy", "gateway.timing"}
    ours = {m for m in imported_modules(GATEWAY / "types.py") if m.startswith("gateway")}
    assert ours <= allowed


def test_serving_imports_no_provisioning_or_demo():
    """What `smallfirst serve` loads: the CLI, the app and the composition root."""
    probe = ("import sys, tooling.cli, gateway.api.app, gateway.service; "
             "print(sorted(m for m in sys.modules if m.startswith('tooling')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert "smallmodel" not in loaded and "demo" not in loaded and "_convert_gguf" not in loaded
