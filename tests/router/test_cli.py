import argparse
import json

from router.cli import main, register
from tests.router.conftest import FIXTURE_FILES, SMALL_RECIPE

METRICS = {"roc_auc", "calibration_error", "apgr", "cpt_50", "cpt_80", "small_share_at_95",
           "cost_at_95", "price_ratio"}


def test_register_mounts_router_commands():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["router", "eval", "--data", "x.parquet", "--report", "r"])
    assert args.func.__name__ == "cmd_eval"


def test_train_writes_a_verified_bundle(trained_bundle):
    meta = json.loads((trained_bundle / "bundle.json").read_text())
    assert meta["version"] == "test"
    assert set(meta["training"]["data"]) == {p.name for p in FIXTURE_FILES}
    assert (trained_bundle / "MANIFEST.sha256").read_text().count("\n") == 2
    assert meta["training"]["config"]["tolerance"] == 0.05  # the CLI's config, as trained
    assert SMALL_RECIPE.items() <= meta["training"]["config"].items()


def test_eval_bundle_report_and_plots(trained_bundle, fake_embedder, tmp_path):
    report_dir = tmp_path / "report"
    args = ["eval", "--model", str(trained_bundle), "--data", *map(str, FIXTURE_FILES),
            "--report", str(report_dir)]
    assert main(args) == 0
    report = json.loads((report_dir / "report.json").read_text())
    gsm = report["outcomes_routellm_gsm8k"]
    assert {"difficulty", "confidence", "combined", "random", "oracle",
            "baseline_litellm_complexity"} <= set(gsm)
    assert METRICS <= set(gsm["combined"])
    peer = gsm["baseline_litellm_complexity"]
    assert 0 < peer["apgr"] < 1 and peer["roc_auc"] == peer["roc_auc"]  # computed, not NaN
    assert "confidence" not in report["outcomes_routellm_mmlu"]  # no answers published there
    assert report["_setup"]["in_sample_files"]
    assert (report_dir / "outcomes_routellm_gsm8k.png").stat().st_size > 1000


def test_eval_cross_fit_has_the_baseline(fake_embedder, small_recipe, tmp_path):
    args = ["eval", "--cross-fit", "2", "--data", str(FIXTURE_FILES[-1]), "--report",
            str(tmp_path)]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert "baseline_tfidf" in report["outcomes_routellm_mmlu"]


def test_calibrate_writes_policy(trained_bundle, fake_embedder, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("# keep me\nname: auto\nconfidence:\n  threshold: 0.5  # old\n"
                      "  min_token_logprob: -9.0  # and me\n")
    args = ["calibrate", "--model", str(trained_bundle), "--data", *map(str, FIXTURE_FILES),
            "--target-quality", "0.9", "--policy", str(policy), "--bundle-ref", "b"]
    assert main(args) == 0
    text = policy.read_text()
    assert "# keep me" in text and "# and me" in text and "bundle: b" in text
    assert "# old" not in text and "target quality 0.9" in text


def test_bad_input_is_a_clean_error(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "none.parquet"), "--out", str(tmp_path)]) == 2
    assert "router: error" in capsys.readouterr().err


def test_train_from_the_gateway_decision_log(fake_embedder, small_recipe, tmp_path):
    import pandas as pd

    gsm = next(p for p in FIXTURE_FILES if "gsm8k" in p.name)
    frame = pd.read_parquet(gsm).head(60)
    log = tmp_path / "decisions.jsonl"
    records = [{"request_id": f"r{i}", "policy": "auto", "prompt": row.prompt,
                "small_response": row.small_response, "large_response": "The answer is 42.",
                "agreement": float(row.small_score >= row.large_score),
                "small_model": "small", "large_model": "large"}
               for i, row in enumerate(frame.itertuples())]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "bundle"
    assert main(["train", "--data", str(gsm), "--from-log", str(log), "--out", str(out),
                 "--version", "traffic", "--cache-dir", str(tmp_path / "cache")]) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert set(meta["training"]["data"]) == {gsm.name, "traffic.parquet"}
    assert meta["training"]["rows"] == len(pd.read_parquet(gsm)) + len(records)


def test_train_refuses_a_log_without_usable_rows(tmp_path, capsys):
    log = tmp_path / "decisions.jsonl"
    log.write_text(json.dumps({"request_id": "a", "agreement": 1.0}) + "\n")  # no text
    assert main(["train", "--from-log", str(log), "--out", str(tmp_path / "b")]) == 2
    assert "no training rows" in capsys.readouterr().err


def test_train_from_the_decision_stream_replicas_share(fake_embedder, small_recipe, tmp_path,
                                                       redis_url, monkeypatch, capsys):
    import uuid

    import pandas as pd
    import redis

    from router import traffic

    monkeypatch.setattr(traffic, "STREAM_BATCH", 7)  # several XRANGE pages
    gsm = next(p for p in FIXTURE_FILES if "gsm8k" in p.name)
    frame = pd.read_parquet(gsm).head(30)
    key = f"decisions-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    for i, row in enumerate(frame.itertuples()):
        client.xadd(key, {"row": json.dumps({
            "request_id": f"r{i}", "policy": "auto", "prompt": row.prompt,
            "small_response": row.small_response, "large_response": "The answer is 42.",
            "agreement": float(row.small_score >= row.large_score)})})
    client.close()
    out = tmp_path / "bundle"
    assert main(["train", "--data", str(gsm), "--from-log", f"{redis_url}?stream={key}",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "30 labelled rows" in capsys.readouterr().out
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["training"]["rows"] == len(pd.read_parquet(gsm)) + 30


def test_an_unreachable_decision_stream_is_a_clean_error(tmp_path, capsys):
    from tests.conftest import free_port

    url = f"redis://:secret-password@127.0.0.1:{free_port()}/0?stream=decisions"
    assert main(["train", "--from-log", url, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "cannot read the decision stream 'decisions'" in err and "secret" not in err
