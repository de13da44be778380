"""Scoring-time benchmark: difficulty and confidence per request, embedding given.

    python -m router.bench [--model DIR] [--data FILE] [--n 2000] [--with-answer-embedding]

Prints p50/p99 in milliseconds for each scorer and for one request (difficulty + confidence),
as wall time and as this thread's CPU time (which leaves out time the OS gave to other
processes, so it stays meaningful on shared cores), and the embedding time alongside for
scale: the prompt embedding is computed once per request and shared with the semantic cache,
so it is not part of the scoring budget. With `--with-answer-embedding` it also times
embedding the answer, the cost a model using an answer embedding would add to every
confidence call.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from router.embedding import Embedder
from router.serving import DEFAULT_BUNDLE, RouterBundle

SAMPLES = [
    ("Janet has 3 times as many marbles as Tom. Tom has 12. How many do they have together?",
     "Janet has 3 * 12 = <<3*12=36>>36 marbles. Together 36 + 12 = <<36+12=48>>48.\n#### 48"),
    ("Which of the following is a prime number?\nOptions:\nA. 21\nB. 27\nC. 31\nD. 33",
     "21 = 3*7, 27 = 3*9, 33 = 3*11; 31 has no divisors. The answer is (C)."),
    ("Write a haiku about autumn leaves.",
     "Crimson leaves drifting\nwhispers of the fading sun\nearth gathers its gold"),
    ("Explain the difference between TCP and UDP in two sentences.",
     "TCP is connection-oriented and guarantees ordered delivery. UDP is connectionless and "
     "faster but may drop or reorder packets."),
]


def _load_samples(path: Path | None, n: int) -> list[tuple[str, str]]:
    if path is None:
        return SAMPLES
    from router.data import load_outcomes

    frame = load_outcomes([path]).dropna(subset=["small_response"]).head(n)
    return list(zip(frame["prompt"], frame["small_response"], strict=True)) or SAMPLES


def _percentiles(samples: list[float]) -> str:
    p50, p99 = np.percentile(np.array(samples) * 1000, [50, 99])
    return f"p50 {p50:.3f} ms  p99 {p99:.3f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--data", type=Path, default=None, help="outcome parquet for real texts")
    parser.add_argument("--n", type=int, default=2000, help="scoring calls to time")
    parser.add_argument("--with-answer-embedding", action="store_true")
    args = parser.parse_args(argv)

    bundle = RouterBundle.load(args.model)
    embedder = Embedder()
    samples = _load_samples(args.data, 200)
    embeddings = embedder.embed([p for p, _ in samples])
    timings: dict[str, list[float]] = {"difficulty": [], "confidence": [], "request": [],
                                       "request (cpu)": [], "prompt embedding": [],
                                       "answer embedding": []}
    for i in range(args.n + 50):
        prompt, answer = samples[i % len(samples)]
        emb = embeddings[i % len(samples)]
        _prompt_only_cache_clear(bundle)
        c0, t0 = time.thread_time(), time.perf_counter()
        bundle.difficulty(prompt, emb)
        t1 = time.perf_counter()
        bundle.confidence(prompt, answer, None, emb)
        t2, c2 = time.perf_counter(), time.thread_time()
        if i >= 50:
            timings["difficulty"].append(t1 - t0)
            timings["confidence"].append(t2 - t1)
            timings["request"].append(t2 - t0)
            timings["request (cpu)"].append(c2 - c0)
    for i in range(min(args.n, 200)):
        prompt, answer = samples[i % len(samples)]
        t0 = time.perf_counter()
        embedder.embed([prompt])
        timings["prompt embedding"].append(time.perf_counter() - t0)
        if args.with_answer_embedding:
            t0 = time.perf_counter()
            embedder.embed([answer])
            timings["answer embedding"].append(time.perf_counter() - t0)
    print(f"bundle {bundle.path} ({bundle.version}); {len(samples)} texts, {args.n} calls")
    for name, values in timings.items():
        if values:
            print(f"{name:17} {_percentiles(values)}")
    return 0


def _prompt_only_cache_clear(bundle: RouterBundle) -> None:
    """Time the cold path: every request brings a new prompt (read once, by difficulty)."""
    from router.features import _prompt_parts
    from router.lexical import hashed

    bundle.clear_cache()
    for cached in (_prompt_parts, hashed):
        cached.cache_clear()


if __name__ == "__main__":
    raise SystemExit(main())
