import threading

import numpy as np
import pytest

from router.serving import DEFAULT_BUNDLE, RouterBundle
from tests.router.conftest import HashEmbedder

PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def test_scores_are_probabilities(trained_bundle):
    bundle = RouterBundle.load(trained_bundle)
    emb = HashEmbedder().embed([PROMPT])[0]
    d = bundle.difficulty(PROMPT, emb)
    good = bundle.confidence(PROMPT, "3 + 4 = 7 apples.\n#### 7", None, emb)
    bad = bundle.confidence(PROMPT, "3 + 4 = 9 apples.\n#### 9.5", None, emb)
    assert all(0.0 < s < 1.0 for s in (d, good, bad))
    assert bundle.feature_set["confidence"][0] == "prompt_embedding"
    assert "lp_mean" not in bundle.feature_set["confidence"]  # fixtures carry no logprobs
    assert "sc_agree" not in bundle.feature_set["confidence"]  # nor more samples
    # logprobs are accepted (and ignored by a bundle trained without them)
    assert bundle.confidence(PROMPT, "#### 7", [-0.1, -0.2], emb) == pytest.approx(
        bundle.confidence(PROMPT, "#### 7", None, emb))


def test_difficulty_model_does_not_read_typesetting_shares(trained_bundle):
    from router.features import FEATURE_NAMES

    bundle = RouterBundle.load(trained_bundle)
    shares = {"p_digit_frac", "p_upper_frac"}
    confidence = {FEATURE_NAMES[c] for c in bundle.confidence_model.columns}
    difficulty = {FEATURE_NAMES[c] for c in bundle.difficulty_model.columns}
    assert shares <= confidence  # the confidence model keeps them: leaving them out is deliberate
    assert not shares & difficulty and "p_how_many" in difficulty
    assert not shares & set(bundle.feature_set["difficulty"])


def test_embedding_is_computed_when_not_given(trained_bundle, fake_embedder):
    bundle = RouterBundle.load(trained_bundle)
    emb = fake_embedder.embed([PROMPT])[0]
    assert bundle.difficulty(PROMPT) == pytest.approx(bundle.difficulty(PROMPT, emb))
    with pytest.raises(ValueError, match="384"):
        bundle.difficulty(PROMPT, np.zeros(10))


def test_thread_safe_scoring(trained_bundle):
    bundle = RouterBundle.load(trained_bundle)
    emb = HashEmbedder().embed([PROMPT])[0]
    expected = bundle.confidence(PROMPT, "#### 7", None, emb)
    results = []

    def work():
        results.extend(bundle.confidence(PROMPT, "#### 7", None, emb) for _ in range(50))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 200


@pytest.mark.skipif(not (DEFAULT_BUNDLE / "MANIFEST.sha256").exists(), reason="no default bundle")
def test_default_bundle_loads_and_scores():
    bundle = RouterBundle.load("default")
    emb = np.full(384, 1 / np.sqrt(384), dtype=np.float32)
    assert 0.0 < bundle.difficulty(PROMPT, emb) < 1.0
    assert 0.0 < bundle.confidence(PROMPT, "#### 7", None, emb) < 1.0
    assert bundle.version and bundle.metadata["training"]["data"]


def test_serving_scores_match_the_batch_path(trained_bundle):
    from router.features import feature_row

    bundle = RouterBundle.load(trained_bundle)
    emb = HashEmbedder().embed([PROMPT])
    answer = "3 + 4 = 7 apples.\n#### 7"
    d = bundle.difficulty_model.predict(feature_row(PROMPT)[None, :], emb, [PROMPT])[0]
    c = bundle.confidence_model.predict(feature_row(PROMPT, answer)[None, :], emb, [PROMPT])[0]
    assert bundle.difficulty(PROMPT, emb[0]) == pytest.approx(d, abs=1e-12)
    assert bundle.confidence(PROMPT, answer, None, emb[0]) == pytest.approx(c, abs=1e-12)


def test_one_request_reads_its_prompt_once(trained_bundle, monkeypatch):
    from dataclasses import replace

    import router.serving

    own = RouterBundle.load(trained_bundle)
    # the confidence model fits its own prompt parts (on every row) and computes its logits
    assert own.confidence_model.lexical is not own.difficulty_model.lexical
    shared = RouterBundle(own.path, own.digest, own.metadata, own.difficulty_model, replace(
        own.confidence_model, linear=own.difficulty_model.linear,
        lexical=own.difficulty_model.lexical))
    real = router.serving.prompt_features
    emb = HashEmbedder().embed([PROMPT])[0]
    for bundle in (own, shared):
        calls = []
        monkeypatch.setattr(router.serving, "prompt_features",
                            lambda p, calls=calls: calls.append(p) or real(p))
        bundle.difficulty(PROMPT, emb)
        bundle.confidence(PROMPT, "#### 7", None, emb)
        bundle.confidence(PROMPT, "#### 8", None, emb)
        assert calls == [PROMPT]
        other = HashEmbedder().embed(["another prompt"])[0]  # another embedding: scored anew
        bundle.difficulty(PROMPT, other)
        assert calls == [PROMPT, PROMPT]
        bundle.clear_cache()
        bundle.difficulty(PROMPT, emb)
        assert len(calls) == 3
    # with the prompt read, only a model with its own prompt parts computes logits again
    def computed(*_):
        raise AssertionError("stacked logits computed again")

    monkeypatch.setattr(type(own.confidence_model), "stacked_logits", computed)
    assert 0.0 <= shared.confidence(PROMPT, "#### 9", None, emb) <= 1.0
    with pytest.raises(AssertionError, match="computed again"):
        own.confidence(PROMPT, "#### 9", None, emb)


def test_bundle_trained_with_peer_samples_uses_them(fake_embedder, small_recipe, tmp_path):
    import pandas as pd

    from router.cli import main
    from tests.router.conftest import FIXTURE_FILES

    frame = pd.read_parquet(FIXTURE_FILES[0])  # multiple choice, one small model
    peer = frame.copy()
    peer["small_model"] = "peer"
    # the peer agrees exactly where the small answer was right
    right = frame["small_score"] >= 0.5
    peer["small_response"] = frame["small_response"].where(right, "The answer is (J).")
    peer.to_parquet(tmp_path / "peer.parquet")
    out = tmp_path / "bundle"
    args = ["train", "--data", str(FIXTURE_FILES[0]), str(tmp_path / "peer.parquet"),
            "--peer-samples", "--out", str(out), "--version", "t",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    bundle = RouterBundle.load(out)
    assert "sc_agree" in bundle.feature_set["confidence"]
    assert bundle.metadata["training"]["command"].endswith("--peer-samples")
    embs = HashEmbedder().embed(frame["prompt"].tolist())
    rows = list(zip(frame["prompt"], frame["small_response"], embs, strict=True))
    agree = np.array([bundle.confidence(p, a, None, e, samples=[a]) for p, a, e in rows])
    disagree = np.array([bundle.confidence(p, a, None, e, samples=["The answer is (J)."])
                         for p, a, e in rows])
    assert (agree >= disagree).all() and agree.mean() > disagree.mean() + 0.1
    alone = bundle.confidence(*rows[0][:2], None, rows[0][2])  # no samples: NaN features
    assert 0.0 < alone < 1.0
