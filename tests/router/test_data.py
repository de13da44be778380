import numpy as np
import pytest

from router.data import REQUIRED_COLUMNS, EmbeddingCache, fingerprint, load_outcomes
from tests.router.conftest import FIXTURE_FILES, REAL_DATA, HashEmbedder


def test_fixtures_load_in_the_outcomes_schema():
    frame = load_outcomes(FIXTURE_FILES)
    assert set(REQUIRED_COLUMNS) <= set(frame.columns)
    assert frame["small_logprobs"].isna().all()
    assert len(fingerprint(FIXTURE_FILES)) == len(FIXTURE_FILES)


def test_embedding_cache_round_trip(tmp_path):
    calls = []

    def compute(texts):
        calls.append(len(texts))
        return HashEmbedder().embed(texts)

    texts = ["a b", "c d", "a b", "e"]
    first = EmbeddingCache(tmp_path, "m").get_many(texts, compute, batch_size=2)
    assert sum(calls) == 3
    again = EmbeddingCache(tmp_path, "m").get_many(texts, compute)
    assert sum(calls) == 3
    np.testing.assert_array_equal(first, again)


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="labelled outcomes data not present")
def test_real_outcomes_files_load():
    files = sorted(REAL_DATA.glob("*.parquet"))
    frame = load_outcomes(files[:1])
    assert len(frame) > 1000
    assert frame["small_score"].between(0, 1).all() and frame["large_score"].between(0, 1).all()


def test_peer_samples_are_other_small_models_answers_to_the_same_prompt():
    import pandas as pd

    from router.data import add_peer_samples

    frame = pd.DataFrame({
        "dataset": ["d", "d", "d", "e"], "id": ["1", "1", "2", "1"],
        "prompt": ["p1", "p1", "p2", "p1"], "small_model": ["a", "b", "a", "b"],
        "small_response": ["A says", "B says", "A alone", "other dataset"],
        "small_samples": [None, None, None, ["kept"]],
    })
    out = add_peer_samples(frame)
    assert out["small_samples"].tolist() == [["B says"], ["A says"], None, ["kept"]]
    assert frame["small_samples"].tolist()[0] is None  # the input is not modified


def test_training_caches_embeddings_under_the_embedders_vectors_id(fake_embedder, tmp_path):
    """Vectors of another graph (a fallback install) are never mixed into a cache."""
    from router.train import build_matrices

    build_matrices(load_outcomes([FIXTURE_FILES[-1]]), tmp_path)
    shards = list(tmp_path.glob("*.npz"))
    assert shards and all(p.name.startswith(f"{fake_embedder.vectors_id}-") for p in shards)
