"""Rows that cannot be used are counted, reported and left out; a file with none fails clearly."""

from __future__ import annotations

import json
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


def _sparse_answers(tmp_path: Path, answered: int, same_outcome: bool = False) -> Path:
    """The answered fixture with a small answer on only `answered` rows (the rest prompt-only):
    the confidence model has almost nothing to learn from, in most cross-fit folds nothing."""
    frame = pd.read_parquet(FIXTURE)
    frame.loc[frame.index[answered:], "small_response"] = None
    if same_outcome:
        frame.loc[frame.index[:answered], ["small_score", "large_score"]] = 1.0
    path = tmp_path / "sparse.parquet"
    frame.to_parquet(path)
    return path


@pytest.mark.parametrize("answered, same_outcome", [(2, False), (20, True)])
def test_sparse_answers_train_and_cross_fit_without_the_confidence_model(
        fake_embedder, small_recipe, tmp_path, capsys, answered, same_outcome):
    from router.cli import main

    data = str(_sparse_answers(tmp_path, answered, same_outcome))
    assert main(["eval", "--cross-fit", "5", "--data", data, "--report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())["sparse"]
    assert 0 < report["difficulty"]["apgr"] < 1 and "confidence" not in report
    assert "no confidence model: " in capsys.readouterr().err
    assert main(["train", "--data", data, "--out", str(tmp_path / "b")]) == 0


def test_a_file_of_one_outcome_is_one_clear_line(fake_embedder, small_recipe, tmp_path, capsys):
    from router.cli import main

    frame = pd.read_parquet(FIXTURE)
    frame[["small_score", "large_score"]] = 1.0
    frame.to_parquet(path := tmp_path / "easy.parquet")
    for args in (["train", "--out", str(tmp_path / "b")],
                 ["eval", "--cross-fit", "5", "--report", str(tmp_path)]):
        assert main([*args, "--data", str(path)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("router: error: ") and "same outcome" in lines[-1]
