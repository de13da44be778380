"""Retraining from the gateway's own labelled traffic, promoted only when it holds up.

The decision log's labelled rows are split by time: the older part trains a candidate
bundle, the most recent part (never trained on) is replayed through a policy's quality
target (`router.replay`, the calibrator the gateway runs) once with the bundle in service and
once with the candidate. The candidate is promoted only if it holds the target there and
keeps more traffic on the small model than the one in service; promotion swaps the folder the
policy names, which the gateway picks up without a restart (bundles are hash-checked on
load and reloaded when their files change).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from router.quality import QualityTarget
from router.replay import Stream, replay

MIN_ROWS = 60  # fewer labelled rows cannot both train and judge a bundle


def split_by_time(rows: list[dict], holdout: float) -> tuple[list[dict], list[dict]]:
    """(older rows to train on, the most recent `holdout` share to judge on)."""
    if len(rows) < MIN_ROWS:
        raise ValueError(f"{len(rows)} labelled rows with text in the log; retraining needs "
                         f"at least {MIN_ROWS}")
    cut = len(rows) - max(int(round(len(rows) * holdout)), 1)
    return rows[:cut], rows[cut:]


def judge(scores: dict[str, np.ndarray], small: np.ndarray, large: np.ndarray,
          spec: QualityTarget, seed: int = 0) -> dict:
    """Each bundle's replay on the held-out rows, and whether the candidate may replace the
    current one."""
    reports = {name: replay(Stream(s, small, large, ["all"] * len(s)), spec, seed)
               for name, s in scores.items()}
    keys = ("quality_rel_large", "min_window_quality_rel_large", "small_share", "label_share")
    summary = {name: {k: r[k] for k in keys} for name, r in reports.items()}
    candidate, current = summary["candidate"], summary["current"]
    holds = candidate["quality_rel_large"] >= spec.target
    gains = candidate["small_share"] > current["small_share"]
    summary["promote"] = bool(holds and gains)
    summary["reason"] = ("holds the target and keeps more on the small model" if holds and gains
                         else "misses the quality target" if not holds
                         else "keeps no more traffic on the small model")
    return summary


def install(candidate: Path, target: Path) -> None:
    """Put the candidate bundle where the policy reads it, replacing what was there."""
    staged = target.with_name(target.name + ".incoming")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(candidate, staged)
    retired = target.with_name(target.name + ".retired")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        target.rename(retired)
    staged.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
