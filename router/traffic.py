"""Training rows from the gateway's decision log (JSON lines, in files or in the Redis Stream
that replicas share), in the outcomes schema.

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
from urllib.parse import parse_qs, urlsplit, urlunsplit

OUTCOME_COLUMNS = ("id", "dataset", "task", "prompt", "small_model", "large_model",
                   "small_response", "large_response", "small_score", "large_score",
                   "small_cost", "large_cost")


DEFAULT_STREAM = "smallfirst:decisions"
STREAM_BATCH = 1000


def read_log(paths: Iterable[Path | str]) -> Iterator[dict[str, Any]]:
    """The records of decision-log files and streams (`redis://HOST:PORT/DB?stream=KEY`)."""
    for path in paths:
        if str(path).startswith(("redis://", "rediss://")):
            yield from read_stream(str(path))
            continue
        with open(path) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON line: {exc}") from exc


def read_stream(url: str) -> Iterator[dict[str, Any]]:
    """Every row of a decision stream, oldest first (XRANGE in batches; the stream is left as
    it is, so several trainings may read it)."""
    import redis

    parts = urlsplit(url)
    key = parse_qs(parts.query).get("stream", [DEFAULT_STREAM])[0]
    client = redis.Redis.from_url(urlunsplit(parts._replace(query="")), socket_timeout=10)
    start = "-"
    try:
        while batch := client.xrange(key, min=start, count=STREAM_BATCH):
            for entry_id, fields in batch:
                try:
                    yield json.loads(fields[b"row"])
                except (KeyError, json.JSONDecodeError) as exc:
                    raise ValueError(f"decision stream {key!r}: entry {entry_id.decode()} "
                                     f"is not a decision row ({exc})") from exc
            start = "(" + batch[-1][0].decode()
    except redis.RedisError as exc:  # the URL may hold a password: name only host and key
        raise OSError(f"cannot read the decision stream {key!r} at {parts.hostname}:"
                      f"{parts.port or 6379} ({exc})") from exc
    finally:
        client.close()


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
