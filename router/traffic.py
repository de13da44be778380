"""Training rows from the gateway's decision log (JSON lines), in the outcomes schema.

Only labelled rows with text become training rows: the gateway logs prompt and answer text
only where a policy allows it, and a label only when the frontier also answered the prompt
(an escalation, or a sampled shadow call). The small answer's score is its agreement with
the frontier's (`router.agreement`); the frontier's own score is taken as 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

OUTCOME_COLUMNS = ("id", "dataset", "task", "prompt", "small_model", "large_model",
                   "small_response", "large_response", "small_score", "large_score",
                   "small_cost", "large_cost")


def read_log(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        with open(path) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON line: {exc}") from exc


def outcome_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The usable records as outcome rows (one per request id; the last record wins)."""
    rows: dict[str, dict[str, Any]] = {}
    for record in records:
        needed = ("prompt", "small_response", "large_response", "agreement")
        if any(record.get(key) is None for key in needed):
            continue
        rows[record["request_id"]] = {
            "id": record["request_id"],
            "dataset": "traffic",
            "task": record.get("policy", ""),
            "prompt": record["prompt"],
            "small_model": record.get("small_model"),
            "large_model": record.get("large_model"),
            "small_response": record["small_response"],
            "large_response": record["large_response"],
            "small_score": float(record["agreement"]),
            "large_score": 1.0,
            "small_cost": None,
            "large_cost": None,
        }
    return list(rows.values())


def write_parquet(rows: list[dict[str, Any]], out: Path) -> Path:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(OUTCOME_COLUMNS))
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    return out
