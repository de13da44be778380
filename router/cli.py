"""`router train|eval|calibrate|replay|retrain`: the command line of the learning package.

The gateway's `smallfirst` CLI calls `register(subparsers)` to mount these under `router`;
`python -m router.cli train ...` runs them without the gateway.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

__all__ = ["add_commands", "main", "register"]

DEFAULT_PRICE_RATIO = 20.0


def _data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--data", nargs="+", required=required, type=Path,
                        help="outcome parquet files (the labelled outcomes schema)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="embedding cache (default $SMALLFIRST_CACHE_DIR or .cache-embeddings)")
    parser.add_argument("--threads", type=int, default=1, help="embedding intra-op threads")
    parser.add_argument("--peer-samples", action="store_true",
                        help="where files share prompts (same dataset and id) answered by "
                        "different small models, use the other models' answers as stand-ins for "
                        "extra samples (self-consistency features)")


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="bundle folder (default: the shipped default bundle)")


def add_commands(sub) -> None:
    """Add train, eval, calibrate, replay and retrain to an argparse subparsers object."""
    train = sub.add_parser("train", help="train a bundle from outcome rows")
    _data_args(train, required=False)
    train.add_argument("--from-log", nargs="+", default=[], metavar="LOG",
                       help="the gateway's decision log (a JSON-lines file, or its Redis Stream "
                       "as redis://HOST:PORT/DB?stream=KEY): its labelled rows with text "
                       "become training rows, alone or added to --data")
    train.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    train.add_argument("--version", default=None, help="bundle version (default: today's date)")
    train.add_argument("--tolerance", type=float, default=0.05,
                       help="good enough: small_score >= large_score - tolerance")
    train.add_argument("--metrics", type=Path, default=None,
                       help="a report.json (from eval --cross-fit) to record in the bundle")
    train.add_argument("--model-card", type=Path, default=None, help="MODEL_CARD.md to include")
    train.set_defaults(func=_clean_errors(cmd_train))

    evaluate = sub.add_parser("eval", help="evaluate a bundle or a cross-fitted recipe")
    _data_args(evaluate)
    _model_arg(evaluate)
    evaluate.add_argument("--report", type=Path, required=True, help="folder for report.json")
    evaluate.add_argument("--cross-fit", type=int, default=0, metavar="K",
                          help="train K-fold by prompt on --data instead of loading a bundle")
    evaluate.add_argument("--train-data", nargs="+", type=Path, default=None,
                          help="transfer: train on these files, evaluate on --data")
    evaluate.add_argument("--tolerance", type=float, default=0.05)
    evaluate.add_argument("--price-ratio", type=float, default=DEFAULT_PRICE_RATIO,
                          help="large/small price per call when the data has no USD costs")
    evaluate.set_defaults(func=_clean_errors(cmd_eval))

    calibrate = sub.add_parser("calibrate", help="choose thresholds and write them to a policy")
    _data_args(calibrate)
    _model_arg(calibrate)
    goal = calibrate.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-quality", type=float, help="fraction of the large model's quality")
    goal.add_argument("--max-escalation-rate", type=float, help="share sent to the large model")
    calibrate.add_argument("--policy", type=Path, required=True, help="policy YAML to update")
    calibrate.add_argument("--bundle-ref", default=None,
                           help="bundle path to write into the policy (default: --model as given)")
    calibrate.set_defaults(func=_clean_errors(cmd_calibrate))

    replay = sub.add_parser("replay", help="replay outcomes through a policy's quality target")
    _data_args(replay)
    _model_arg(replay)
    replay.add_argument("--policy", required=True,
                        help="policy name (or alias) in --policies, or a policy YAML file")
    replay.add_argument("--policies", type=Path, default=Path("policies"))
    replay.add_argument("--shadow-rate", type=float, default=None,
                        help="override the policy's learning.shadow_rate")
    replay.add_argument("--seed", type=int, default=0, help="request order and shadow draws")
    replay.add_argument("--rate", type=float, default=10.0,
                        help="simulated requests a second (the shadow budget is per minute)")
    replay.add_argument("--segment-by", choices=("none", "task"), default="none",
                        help="one threshold per value of the file's `task` column")
    replay.add_argument("--cross-fit", type=int, default=0, metavar="K",
                        help="score rows out of fold (K-fold by prompt) instead of the bundle")
    replay.add_argument("--report", type=Path, required=True, help="report JSON (a PNG beside)")
    replay.set_defaults(func=_clean_errors(cmd_replay))

    retrain = sub.add_parser(
        "retrain", help="train on the decision log; install only if it holds the quality target")
    _data_args(retrain, required=False)
    retrain.add_argument("--from-log", nargs="+", required=True, metavar="LOG",
                         help="the gateway's decision log: JSON-lines files or Redis Streams "
                         "(redis://HOST:PORT/DB?stream=KEY), labelled rows with text")
    retrain.add_argument("--policy", required=True,
                         help="policy name (or alias) in --policies, or a policy YAML file")
    retrain.add_argument("--policies", type=Path, default=Path("policies"))
    retrain.add_argument("--holdout", type=float, default=0.3,
                         help="the most recent share of labelled rows, judged on, never trained on")
    retrain.add_argument("--install", type=Path, default=None,
                         help="bundle folder to replace (default: the one the policy's "
                         "confidence.bundle names, unless that is the shipped default)")
    retrain.add_argument("--seed", type=int, default=0)
    retrain.add_argument("--tolerance", type=float, default=0.05)
    retrain.set_defaults(func=_clean_errors(cmd_retrain), version=None, metrics=None,
                         model_card=None)


def register(subparsers) -> None:
    """Mount `router train|eval|calibrate` on the gateway CLI's subparsers."""
    router = subparsers.add_parser("router", help="train, evaluate and calibrate the router")
    add_commands(router.add_subparsers(dest="router_command", required=True))


def _matrices(args, paths: list[Path]):
    from router.data import load_outcomes
    from router.train import build_matrices

    frame = load_outcomes(paths)
    for name, count in frame.attrs["left_out"].items():
        print(f"router: {name}: {count} rows left out (no prompt, or a score missing)",
              file=sys.stderr)
    if getattr(args, "peer_samples", False):
        from router.data import add_peer_samples

        frame = add_peer_samples(frame)
    return frame, build_matrices(frame, args.cache_dir, args.threads)


def cmd_train(args) -> int:
    import tempfile

    from router.traffic import outcome_rows, read_log, write_parquet

    with tempfile.TemporaryDirectory() as tmp:
        if args.from_log:
            rows = outcome_rows(read_log(args.from_log))
            print(f"{len(rows)} labelled rows with text in the decision log")
            if rows:
                args.data = [*(args.data or []), write_parquet(rows, Path(tmp) / "traffic.parquet")]
        if not args.data:
            print("router train: no training rows (give --data, or a --from-log with labelled "
                  "rows that carry text)", file=sys.stderr)
            return 2
        return _train(args)


def _train(args) -> int:
    from router.bundle import write_bundle
    from router.data import fingerprint
    from router.embedding import DIM, MAX_TOKENS, MODEL_ID
    from router.features import FEATURE_NAMES
    from router.train import TrainConfig, fit

    frame, m = _matrices(args, args.data)
    models = fit(m, TrainConfig(tolerance=args.tolerance))
    _print_notes(models.notes)
    metadata = {
        "version": args.version or dt.date.today().isoformat(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "label": f"small_score >= large_score - {args.tolerance}",
        "feature_spec": {
            "embedding_model": MODEL_ID, "embedding_dim": DIM, "max_tokens": MAX_TOKENS,
            "feature_names": list(FEATURE_NAMES), "feature_set": models.feature_groups,
        },
        "training": {
            "data": fingerprint(args.data), "rows": len(frame),
            "rows_with_answers": int(m.has_answer.sum()), "config": asdict(models.config),
            "command": "router train " + " ".join(f"--{k} {v}" for k, v in (
                ("data", " ".join(p.name for p in args.data)), ("tolerance", args.tolerance)))
            + (" --peer-samples" if args.peer_samples else ""),
        },
        "thresholds": models.thresholds.as_dict(),
        "metrics": json.loads(args.metrics.read_text()) if args.metrics else {},
    }
    extra = {"MODEL_CARD.md": args.model_card.read_text()} if args.model_card else {}
    digest = write_bundle(args.out, metadata, models.difficulty, models.confidence, extra)
    print(f"wrote {args.out} (digest {digest[:16]}, {len(frame)} rows)")
    return 0


class _Loaded:
    """A loaded bundle's models in the shape `evaluate.predict` expects."""

    def __init__(self, bundle) -> None:
        self.difficulty = bundle.difficulty_model
        self.confidence = bundle.confidence_model
        self.skip_threshold = bundle.metadata.get("thresholds", {}).get("skip_threshold", 0.0)


def _load_models(args):
    from router.serving import DEFAULT_BUNDLE, RouterBundle

    bundle = RouterBundle.load(args.model or DEFAULT_BUNDLE)
    return bundle, _Loaded(bundle)


def cmd_eval(args) -> int:
    from router import evaluate
    from router.progress import progress
    from router.train import TrainConfig

    frame, m = _matrices(args, args.data)
    config = TrainConfig(tolerance=args.tolerance)
    setup: dict = {"data": [p.name for p in args.data], "price_ratio": args.price_ratio}
    if args.cross_fit:
        predictions = evaluate.crossfit(m, config, args.cross_fit, progress)
        setup["evaluation"] = f"cross-fitted, {args.cross_fit} folds by prompt"
    elif args.train_data:
        _, train_m = _matrices(args, args.train_data)
        predictions = evaluate.transfer(train_m, m, config)
        setup["evaluation"] = "transfer: trained on " + ", ".join(p.name for p in args.train_data)
    else:
        bundle, loaded = _load_models(args)
        predictions = evaluate.predict(loaded, m)
        trained_on = set(bundle.metadata.get("training", {}).get("data", {}))
        setup["evaluation"] = f"bundle {bundle.path} ({bundle.version})"
        setup["in_sample_files"] = sorted(trained_on & {p.name for p in args.data})
    _print_notes(predictions.notes)
    predictions.baseline_litellm_complexity = evaluate.litellm_complexity(m.prompts)
    args.report.mkdir(parents=True, exist_ok=True)
    sources = frame["source_file"].to_numpy()
    report = {}
    for name in sorted(set(sources)):
        rows = sources == name
        usd = _usd_per_call(frame, rows)
        ratio = usd[1] / usd[0] if usd and usd[0] > 0 else args.price_ratio
        report[name] = evaluate.dataset_report(predictions, m, rows, args.tolerance, ratio)
        if usd:
            for values in report[name].values():
                if "cost_at_95" in values:
                    values["cost_at_95_usd_per_prompt"] = values["cost_at_95"] * usd[1]
        evaluate.plot_curves(predictions, m, rows, name, args.report / f"{name}.png")
    report["_setup"] = setup
    (args.report / "report.json").write_text(json.dumps(report, indent=2, default=_json) + "\n")
    _print_table(report)
    return 0


def _print_notes(notes) -> None:
    for note in notes:
        print(f"router: {note}", file=sys.stderr)


def _usd_per_call(frame, rows) -> tuple[float, float] | None:
    """Mean USD per call (small, large) when every row carries costs; else None."""
    costs = frame.loc[rows, ["small_cost", "large_cost"]]
    if not costs.notna().all().all():
        return None
    return float(costs["small_cost"].astype(float).mean()), float(
        costs["large_cost"].astype(float).mean())


def _json(value):
    return None if value != value else float(value)


def _print_table(report: dict) -> None:
    columns = ("roc_auc", "calibration_error", "apgr", "cpt_50", "cpt_80", "small_share_at_95")
    print(f"{'dataset':42} {'mode':27} " + " ".join(f"{c[:12]:>12}" for c in columns))
    for name, modes in report.items():
        if name.startswith("_"):
            continue
        for mode, values in modes.items():
            if mode == "summary":
                continue
            cells = " ".join(f"{values.get(c, float('nan')):12.3f}" for c in columns)
            print(f"{name[:42]:42} {mode:27} {cells}")


def cmd_calibrate(args) -> int:
    from router.calibrate import choose_thresholds, write_policy
    from router.evaluate import predict

    _, m = _matrices(args, args.data)
    bundle, loaded = _load_models(args)
    p = predict(loaded, m)
    rows = m.has_answer if bundle.confidence_model is not None and m.has_answer.any() else None
    pick = {"target_quality": args.target_quality, "max_escalation_rate": args.max_escalation_rate}
    if rows is None:
        thresholds = choose_thresholds(p.difficulty, None, m.small, m.large, **pick)
    else:
        thresholds = choose_thresholds(p.difficulty[rows], p.confidence[rows], m.small[rows],
                                       m.large[rows], **pick)
    reference = args.bundle_ref or str(args.model or "default")
    goal = (f"target quality {args.target_quality}" if args.target_quality is not None
            else f"max escalation rate {args.max_escalation_rate}")
    write_policy(args.policy, thresholds, reference,
                 f"{goal} on {', '.join(p.name for p in args.data)}")
    print(json.dumps({"policy": str(args.policy), "bundle": reference, **thresholds.as_dict()}))
    return 0


def cmd_replay(args) -> int:
    from router import evaluate
    from router.quality import quality_target
    from router.replay import Stream, plot, replay
    from router.train import TrainConfig

    spec = quality_target(_policy_document(args.policy, args.policies), args.shadow_rate)
    frame, m = _matrices(args, args.data)
    if args.cross_fit:
        p = evaluate.crossfit(m, TrainConfig(), args.cross_fit)
        _print_notes(p.notes)
        scoring = f"cross-fitted, {args.cross_fit} folds by prompt"
    else:
        bundle, loaded = _load_models(args)
        p = evaluate.predict(loaded, m)
        trained_on = set(bundle.metadata.get("training", {}).get("data", {}))
        scoring = f"bundle {bundle.version}" + (
            " (in sample: trained on this file)" if trained_on & {x.name for x in args.data}
            else "")
    answered = ~np.isnan(p.confidence)
    scores = np.where(answered, p.confidence, p.difficulty)
    segments = (frame["task"].astype(str).tolist() if args.segment_by == "task"
                else ["all"] * len(frame))
    stream = Stream(scores, m.small, m.large, segments, difficulty=p.difficulty)
    report = replay(stream, spec, args.seed, args.rate)
    report["setup"].update(
        data=[x.name for x in args.data], policy=args.policy, scoring=scoring,
        score="confidence" if answered.all() else
        "difficulty (no answers)" if not answered.any() else "confidence, else difficulty")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2, default=_json) + "\n")
    plot(report, f"{', '.join(x.stem for x in args.data)}: seed {args.seed}",
         args.report.with_suffix(".png"))
    keys = ("quality_rel_large", "min_window_quality_rel_large", "small_share", "label_share",
            "skip_share", "hindsight_small_share", "hindsight_small_share_at_target")
    print(json.dumps({k: round(report[k], 4) for k in keys}))
    return 0


def cmd_retrain(args) -> int:
    import tempfile

    from router import evaluate
    from router.quality import quality_target
    from router.retrain import install, judge, split_by_time
    from router.serving import DEFAULT_BUNDLE, RouterBundle
    from router.traffic import outcome_rows, read_log, write_parquet

    document = _policy_document(args.policy, args.policies)
    spec = quality_target(document)
    named = (document.get("confidence") or {}).get("bundle", "default")
    current = DEFAULT_BUNDLE if named == "default" else args.policies / named
    target = args.install or (None if named == "default" else current)
    if target is None:
        raise ValueError(f"policy {args.policy!r} uses the shipped bundle: give --install DIR "
                         "(and point its confidence.bundle there)")
    train_rows, held_rows = split_by_time(outcome_rows(read_log(args.from_log)), args.holdout)
    with tempfile.TemporaryDirectory() as tmp:
        args.data = [*(args.data or []), write_parquet(train_rows, Path(tmp) / "train.parquet")]
        args.out = Path(tmp) / "candidate"
        _train(args)
        _, m = _matrices(args, [write_parquet(held_rows, Path(tmp) / "held.parquet")])
        scores = {}
        for name, path in (("current", current), ("candidate", args.out)):
            bundle = RouterBundle.load(path)
            p = evaluate.predict(_Loaded(bundle), m)
            scores[name] = np.where(np.isnan(p.confidence), p.difficulty, p.confidence)
        summary = judge(scores, m.small, m.large, spec, args.seed)
        summary.update(trained_rows=len(train_rows), held_out_rows=len(held_rows))
        if summary["promote"]:
            install(args.out, target)
            summary["installed"] = str(target)
    print(json.dumps(summary, default=_json))
    return 0 if summary["promote"] else 1


def _policy_document(name: str, folder: Path) -> dict:
    """A policy's YAML by file path, or by its name or an alias among the folder's files."""
    import yaml

    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return yaml.safe_load(path.read_text()) or {}
    for candidate in sorted(folder.glob("*.y*ml")):
        document = yaml.safe_load(candidate.read_text()) or {}
        if isinstance(document, dict) and name in (document.get("name"),
                                                   *document.get("aliases", [])):
            return document
    raise ValueError(f"no policy named {name!r} in {folder}")


def _clean_errors(command):
    """Bad input (a missing file or column, no usable row) is one line and exit code 2, however
    the command is reached (`router ...` or `smallfirst router ...`)."""

    @functools.wraps(command)
    def run(args) -> int:
        try:
            return command(args)
        except (ValueError, OSError) as exc:
            print(f"router: error: {exc}", file=sys.stderr)
            return 2

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="router", description=__doc__.splitlines()[0])
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
