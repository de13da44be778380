"""`smallfirst cache ...`: stats, purge, eval and train.

    smallfirst cache stats [--config FILE]
    smallfirst cache purge --tenant T [--policy P] [--config FILE]
    smallfirst cache eval --pairs FILE [--report FILE.json] [--plot FILE.png]
    smallfirst cache eval --by-template-holdout [--pairs FILE] [--trees N] [--report FILE.json]
    smallfirst cache train [--pairs FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, load_settings


def register(subparsers: Any) -> None:
    """Add the `cache` command group to the CLI."""
    cache = subparsers.add_parser("cache", help="the response cache").add_subparsers(
        required=True)

    stats = cache.add_parser("stats", help="entries per tenant/policy and hit counters")
    stats.add_argument("--config", type=Path, help="gateway config file (for redis_url)")
    stats.set_defaults(func=cmd_stats)

    purge = cache.add_parser("purge", help="delete a tenant's entries (optionally one policy)")
    purge.add_argument("--config", type=Path)
    purge.add_argument("--tenant", required=True)
    purge.add_argument("--policy")
    purge.set_defaults(func=cmd_purge)

    evaluate = cache.add_parser("eval", help="the semantic verifier on labelled pairs")
    evaluate.add_argument("--pairs", type=Path, default=None,
                          help="parquet/CSV/JSON lines with q1, q2, same_answer, kind "
                          "(required, except with --by-template-holdout: the training pairs)")
    evaluate.add_argument("--report", type=Path, help="write the figures as JSON")
    evaluate.add_argument("--plot", type=Path, help="trade-off plot (default: beside the "
                          "report, or cache-eval.png)")
    evaluate.add_argument("--policies", type=Path, default=Path("policies"))
    evaluate.add_argument("--policy", default="auto", help="whose threshold to evaluate")
    evaluate.add_argument("--include-trained", action="store_true",
                          help="also count rows the shipped verifier was fitted on")
    evaluate.add_argument("--by-template-holdout", action="store_true",
                          help="leave each kind of pair out of training in turn, retrain on "
                          "the others and score the kind the verifier never saw")
    evaluate.add_argument("--trees", type=int, default=None,
                          help="with --by-template-holdout: trees per model (default: the "
                          "training recipe's)")
    evaluate.add_argument("--calibration-repeats", type=int, default=None,
                          help="with --by-template-holdout: cross-fitting repeats for the "
                          "calibration table (default: the training recipe's)")
    evaluate.add_argument("--min-kind-rows", type=int, default=100,
                          help="with --by-template-holdout: smaller kinds are left out with "
                          "the kinds that share their name's first word")
    evaluate.add_argument("--together", action="append", default=[], metavar="KIND,KIND",
                          help="with --by-template-holdout: leave these kinds out together "
                          "(a whole source, e.g. qqp_dup,qqp_nondup); repeatable")
    evaluate.set_defaults(func=cmd_eval)

    train = cache.add_parser("train", help="rebuild the shipped pair verifier")
    train.add_argument("--pairs", type=Path, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train)


def _store(config: Path | None) -> Any:
    settings = load_settings(config)
    if not settings.redis_url:
        raise ConfigError("no redis_url configured: the in-process cache lives inside each "
                          "gateway process and ends with it")
    from gateway.cache.redis_exact import Keys, RedisExactStore, connect

    return RedisExactStore(connect(settings.redis_url, timeout_s=5), Keys(settings.cache_prefix))


async def _with_store(config: Path | None, work: Any) -> Any:
    store = _store(config)
    try:
        return await work(store)
    finally:
        await store.close()


def cmd_stats(args: argparse.Namespace) -> int:
    stats = asyncio.run(_with_store(args.config, lambda s: s.stats()))
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    removed = asyncio.run(_with_store(args.config, lambda s: s.purge(args.tenant, args.policy)))
    scope = f"tenant {args.tenant!r}" + (f", policy {args.policy!r}" if args.policy else "")
    print(f"purged {removed} keys of {scope}")
    return 0


def _policy_settings(directory: Path, name: str) -> Any:
    from gateway.policy import CacheSettings
    from gateway.policy_store import PolicyError, load_policy_dir

    try:
        policy = load_policy_dir(directory).by_name.get(name)
    except (PolicyError, OSError):
        policy = None
    return policy.cache if policy is not None else CacheSettings()


def cmd_eval(args: argparse.Namespace) -> int:
    from router import Embedder
    from router.pairs.evaluate import evaluate
    from router.pairs.verifier import PairVerifier

    settings = _policy_settings(args.policies, args.policy)
    if args.by_template_holdout:
        return _holdout(args, settings)
    if args.pairs is None:
        print("smallfirst: --pairs FILE is required", file=sys.stderr)
        return 2
    plot = args.plot or (args.report.with_suffix(".png") if args.report else
                         Path("cache-eval.png"))
    report = evaluate(
        args.pairs, Embedder(), PairVerifier.load(),
        max_false_hit_rate=settings.semantic_max_false_hit_rate,
        threshold=settings.semantic_threshold, min_cosine=settings.semantic_min_cosine,
        include_trained=args.include_trained, plot=plot,
    )
    _print_report(report)
    _write(args.report, report)
    return 0


def _write(path: Path | None, report: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def _holdout(args: argparse.Namespace, settings: Any) -> int:
    from router import Embedder
    from router.pairs.evaluate import holdout_by_kind
    from router.pairs.training import CALIBRATION_REPEATS, DEFAULT_PAIRS

    pairs = args.pairs or DEFAULT_PAIRS
    if not pairs.is_file():
        print(f"smallfirst: no labelled pairs at {pairs}", file=sys.stderr)
        return 2

    def progress(fold: dict[str, Any]) -> None:
        print(f"  left out {fold['left_out']}: threshold {fold['threshold']:.4f} "
              f"({fold['elapsed_s']:.0f} s)", file=sys.stderr, flush=True)

    try:
        report = holdout_by_kind(
            pairs, Embedder(), max_false_hit_rate=settings.semantic_max_false_hit_rate,
            min_cosine=settings.semantic_min_cosine, min_rows=args.min_kind_rows,
            together=[group.split(",") for group in args.together], trees=args.trees,
            repeats=args.calibration_repeats or CALIBRATION_REPEATS, progress=progress)
    except ValueError as exc:  # e.g. --together naming a kind the pairs do not have
        print(f"smallfirst: {exc}", file=sys.stderr)
        return 2
    _print_holdout(report)
    _write(args.report, report)
    return 0


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _print_holdout(report: dict[str, Any]) -> None:
    print(f"{report['rows']} pairs, each kind scored by a verifier trained without it "
          f"({report['trees']} trees, {report['calibration_repeats']} calibration repeats, "
          f"target {report['max_false_hit_rate']:.0%} false hits; {report['seconds']:.0f} s)")
    print(f"  {'kind':26s} {'rows':>5s}  {'measures':15s} {'rate':>6s}  95% interval"
          f"    threshold")
    for kind, row in report["by_kind"].items():
        print(f"  {kind:26s} {row['rows']:5d}  {row['means']:15s} {_percent(row['rate']):>6s}"
              f"  [{_percent(row['lower_95'])}, {_percent(row['upper_95'])}]"
              f"  {row['threshold']:.4f}")
    low, high = report["hit_rate_95"] or (None, None)
    print(f"hit rate (paraphrases served):  {_percent(report['hit_rate'])} "
          f"[{_percent(low)}, {_percent(high)}]")
    print(f"false-hit rate (wrong answers): {_percent(report['false_hit_rate'])} "
          f"(upper 95% {_percent(report['false_hit_rate_upper_95'])})")
    worst = report["worst_negative_kind"]
    print(f"worst negative kind:            {worst['kind']} {_percent(worst['rate'])} "
          f"(upper 95% {_percent(worst['upper_95'])})")
    print(f"targets met: {report['targets_met']}")


def _print_report(report: dict[str, Any]) -> None:
    print(f"{report['rows']} pairs ({report['rows_left_out_as_trained']} left out: trained on)"
          f"; threshold {report['threshold']:.4f}")
    print(f"hit rate (paraphrases served):      {report['hit_rate']}")
    print(f"false-hit rate (wrong answers):     {report['false_hit_rate']}")
    print(f"false hits, upper 95% bound:        {report['false_hit_rate_upper_95']}")
    worst = report["worst_negative_kind"]
    print(f"worst negative kind:                {worst['kind']} {worst['rate']}"
          f" (upper 95% {worst['upper_95']})")
    cosine = report["cosine_only"]
    print(f"cosine alone at the same target:    hit rate {cosine['hit_rate_at_target_overall']}"
          f" (overall), {cosine['hit_rate_at_target_worst_kind']} (every kind)")
    for kind, row in report["by_kind"].items():
        print(f"  {kind:26s} {row['means']:15s} {row['rate']:.4f}  (n={row['rows']}, "
              f"95% [{row['lower_95']:.4f}, {row['upper_95']:.4f}])")
    print(f"targets met: {report['targets_met']}; plot: {report.get('plot')}")


def cmd_train(args: argparse.Namespace) -> int:
    from router import Embedder
    from router.pairs.training import DEFAULT_PAIRS, train

    pairs = args.pairs or DEFAULT_PAIRS
    if not pairs.is_file():
        print(f"smallfirst: no labelled pairs at {pairs}", file=sys.stderr)
        return 2
    print(json.dumps(train(pairs, Embedder(), seed=args.seed), indent=2))
    return 0
