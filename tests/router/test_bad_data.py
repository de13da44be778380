"""Rows that cannot be used are counted, reported and left out; a file with none fails clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from router.data import load_outcomes

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "outcomes_routellm_gsm8k.parquet"


def test_rows_without_scores_are_left_out_and_counted(tmp_path: Path) -> None:
    frame = pd.read_parquet(FIXTURE)
    frame.loc[frame.index[:14], "small_score"] = None
    frame.loc[frame.index[14], "large_score"] = np.inf
    frame.loc[frame.index[15], "prompt"] = "  "
    path = tmp_path / "partly.parquet"
    frame.to_parquet(path)
    data = load_outcomes([path])
    assert len(data) == len(frame) - 16
    assert data.attrs["left_out"] == {"partly.parquet": 16}
    assert np.isfinite(data["small_score"].astype(float)).all()


def test_a_file_without_a_usable_row_is_one_clear_error(tmp_path: Path) -> None:
    frame = pd.read_parquet(FIXTURE)
    frame["small_score"] = None
    path = tmp_path / "unscored.parquet"
    frame.to_parquet(path)
    with pytest.raises(ValueError, match="unscored.parquet: no row has a prompt and both scores"):
        load_outcomes([path])
