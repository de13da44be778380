"""Semantic cache lookups against a large index (default 100k entries), through the gateway.

    python -m load.cache_scale [--entries 100000] [--layouts 1,10] [--queries 300]
                               [--concurrency 4] [--real 3000] [--deadline-ms MS]
                               [--embedding-threads 1]

For each layout (all entries in one tenant; the same number spread over 10 tenants, queried
as one of them) it starts Valkey with the query engine module (from the `dev` extra), the
scripted upstream (instant answers) and a gateway with `redis_url` and API keys for the
tenants, whose benchmark policy keeps more than `--entries` entries per tenant. It prefills
the cache directly in Valkey with the gateway's own storage code (`RedisExactStore.put`,
`SemanticIndex.put`, keys, tags and context hash computed as `LayeredCache.store` does for
the same HTTP request), so the gateway's lookups search those entries. It then sends, over
HTTP, interleaved and each text only once: reworded forms of prefilled questions (which
should be semantic hits) and questions from families never prefilled (misses), first one at
a time, then `--concurrency` at once, all with `Cache-Control: no-store` so the index stays
at its size. Prints the gateway's own `cache` step time (Server-Timing) p50/p90/p99/max,
end-to-end latency, the share served from the cache, and the lookups past the policy's
`lookup_deadline_ms` (served as misses; the gateway's own counter), plus the fill time, the
index's document count and memory, and the load average. Then the lookup alone: the same
kinds of query, one at a time, through the gateway's cache code in this process (exact read,
embedding, KNN search, verifier) timed to its end, with no HTTP, upstream or load generator
competing for the cores: what the policy's deadline is measured against.

How the vectors were made (the index is synthetic; only some entries are real questions):
`--real` distinct questions are generated from templates (tasks in programming languages,
capitals, recipes, travel, ...) and embedded once with the gateway's embedder; those entries
keep their real text and vector. Every other entry is the normalised sum of the vectors of
two random real questions plus a little Gaussian noise (sigma 0.01 per dimension), stored
with the two texts joined as its text, and with no exact entry (nobody asks it verbatim).
So the index is crowded around the real questions without holding 100k real embeddings; a
real index's neighbourhoods may be denser or sparser.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from gateway.api.openai_types import ChatCompletionRequest
from gateway.cache.fingerprint import context_hash, exact_key
from gateway.cache.layered import LayeredCache, build_cache
from gateway.cache.redis_exact import Keys, RedisExactStore, connect
from gateway.cache.semantic import SemanticIndex
from gateway.embedding import SharedEmbedding
from gateway.policy import CacheSettings
from gateway.types import CachedAnswer, CacheRequest
from load.cache_bench import LANGUAGES, TASKS, start_valkey
from load.harness import ROOT, free_port, start
from router.pairs.vectors import cache_vectors

PREFIX = "scale"
POLICY = "auto"
NOISE = 0.01
WRITES_AT_ONCE = 64

# Families of prefilled questions, and (further down) families only ever asked, never cached.
COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Kenya", "Norway", "Peru", "Vietnam",
             "Egypt", "Australia", "Mexico", "Poland", "Chile", "Thailand", "Ghana", "Turkey",
             "Iceland", "Portugal", "Argentina", "Nepal", "Morocco", "Sweden", "Indonesia",
             "Greece", "Colombia", "Ireland", "Finland", "Hungary", "Malaysia", "Senegal"]
CITIES = ["Paris", "Tokyo", "Lisbon", "Berlin", "Rome", "Madrid", "Prague", "Vienna", "Oslo",
          "Dublin", "Athens", "Cairo", "Seoul", "Bangkok", "Sydney", "Toronto", "Chicago",
          "Boston", "Denver", "Lima", "Bogota", "Nairobi", "Istanbul", "Budapest", "Warsaw",
          "Helsinki", "Reykjavik", "Hanoi", "Mumbai", "Marrakesh"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
FOODS = ["salmon", "broccoli", "lentils", "quinoa", "spinach", "blueberries", "almonds",
         "oatmeal", "sweet potatoes", "chickpeas", "avocado", "kale", "eggs", "tofu",
         "brown rice", "walnuts", "yogurt", "beetroot", "mushrooms", "garlic", "ginger",
         "green tea", "dark chocolate", "sardines", "cauliflower", "pumpkin seeds"]
DISHES = ["lasagna", "banana bread", "chicken curry", "pad thai", "a sourdough loaf",
          "beef stew", "risotto", "pancakes", "guacamole", "miso soup", "falafel", "paella",
          "ramen", "a cheesecake", "hummus", "tiramisu", "shakshuka", "gnocchi", "chili",
          "apple pie"]
DISH_QUESTIONS = ["How do I make {x} at home?", "What goes well with {x}?",
                  "How long does {x} keep in the fridge?", "Can I freeze {x}?",
                  "What is a vegetarian version of {x}?"]
SKILLS = ["the guitar", "chess", "Spanish", "watercolor painting", "public speaking",
          "touch typing", "calculus", "photography", "knitting", "swimming", "juggling",
          "sign language", "statistics", "woodworking", "piano", "rock climbing", "Mandarin",
          "drawing portraits", "speed reading", "meditation"]
SKILL_QUESTIONS = ["What is the best way to learn {x}?", "How long does it take to get good "
                   "at {x}?", "What are common beginner mistakes in {x}?",
                   "Is {x} hard to learn as an adult?"]
CONCEPTS = ["inflation", "photosynthesis", "black holes", "compound interest", "DNA "
            "replication", "the greenhouse effect", "machine learning", "blockchain",
            "supply and demand", "vaccines", "plate tectonics", "quantum entanglement",
            "the stock market", "natural selection", "nuclear fusion", "the immune system",
            "recursion", "public key cryptography", "game theory", "climate change",
            "the water cycle", "relativity", "opportunity cost", "neural networks"]
CONCEPT_QUESTIONS = ["Explain {x} in simple terms.", "Why does {x} matter?",
                     "What is a common misconception about {x}?", "Who discovered {x}?"]
APPLIANCES = ["dishwasher", "washing machine", "refrigerator", "microwave", "laptop",
              "printer", "bicycle", "car battery", "router", "vacuum cleaner", "toaster",
              "garage door"]
SYMPTOMS = ["makes a loud noise", "will not turn on", "keeps leaking water",
            "smells like burning", "stops halfway through", "is very slow",
            "shows an error light", "gets too hot"]
# Only ever asked: the misses.
PETS = ["dog", "cat", "parrot", "rabbit", "hamster", "goldfish", "horse", "ferret",
        "guinea pig", "tortoise", "puppy", "kitten"]
BEHAVIOURS = ["chew the furniture", "sleep all day", "bark at night", "refuse to eat",
              "scratch the door", "hide under the bed", "lick everything", "follow me around",
              "dig holes", "sneeze a lot", "shed so much", "ignore commands"]
BUSINESSES = ["bakery", "coffee shop", "bike repair shop", "bookstore", "yoga studio",
              "food truck", "flower shop", "barber shop", "pet grooming salon",
              "vintage clothing store", "craft brewery", "dental clinic"]

REWORDINGS = ["hi! {lower} thanks", "Hello, {lower}", "{bare}?? cheers", "{bare}",
              "quick question: {lower}"]


def prefill_questions() -> list[str]:
    """Distinct, real-looking questions (about 3,000), in a fixed shuffled order."""
    out = [f"How do I {t} in {lang}?" for t, lang in itertools.product(TASKS, LANGUAGES)]
    out += [f"What is the capital of {c}?" for c in COUNTRIES]
    out += [f"What is the best time of year to visit {c}?" for c in COUNTRIES]
    out += [f"What should I pack for a trip to {c} in {m}?"
            for c, m in itertools.product(CITIES, MONTHS)]
    out += [f"What is the weather usually like in {c} in {m}?"
            for c, m in itertools.product(CITIES, MONTHS)]
    out += [f"What are the health benefits of eating {f}?" for f in FOODS]
    out += [f"How many calories are in a serving of {f}?" for f in FOODS]
    out += [q.format(x=d) for q, d in itertools.product(DISH_QUESTIONS, DISHES)]
    out += [q.format(x=s) for q, s in itertools.product(SKILL_QUESTIONS, SKILLS)]
    out += [q.format(x=c) for q, c in itertools.product(CONCEPT_QUESTIONS, CONCEPTS)]
    out += [f"How do I fix a {a} that {s}?" for a, s in itertools.product(APPLIANCES, SYMPTOMS)]
    out += [f"What is the difference between {a} and {b}?"
            for a, b in itertools.combinations(CONCEPTS, 2)]
    out += [f"How do I get from {a} to {b}?" for a, b in itertools.permutations(CITIES, 2)]
    out += [f"What is the time difference between {a} and {b}?"
            for a, b in itertools.combinations(CITIES, 2)]
    out = list(dict.fromkeys(out))
    random.Random(7).shuffle(out)
    return out


def miss_questions() -> list[str]:
    """Questions of families never prefilled (about 650), shuffled."""
    out = [f"Why does my {p} {b}?" for p, b in itertools.product(PETS, BEHAVIOURS)]
    out += [f"What is a good name for a {b} in {c}?" for b, c in itertools.product(BUSINESSES,
                                                                                    CITIES)]
    out += [f"How do I stop my {p} from trying to {b}?" for p, b in itertools.product(
        PETS, BEHAVIOURS)]
    random.Random(8).shuffle(out)
    return out


def reworded(question: str, form: int) -> str:
    lower = question[0].lower() + question[1:]
    return REWORDINGS[form % len(REWORDINGS)].format(lower=lower, bare=question.rstrip("?."))


def body(text: str) -> dict:
    return {"model": POLICY, "max_tokens": 32, "messages": [{"role": "user", "content": text}]}


def cache_request(tenant: str, text: str) -> CacheRequest:
    """The CacheRequest the gateway builds for `body(text)` from this tenant."""
    params = ChatCompletionRequest.model_validate(body(text)).model_params()
    return CacheRequest(tenant, POLICY, POLICY, params)


# ---- prefill ---------------------------------------------------------------------------------

@dataclass
class Prefill:
    texts: list[str]  # the real questions, embedded
    vectors: np.ndarray  # their cache vectors, one row each

    @classmethod
    def embed(cls, count: int) -> Prefill:
        texts = prefill_questions()[:count]
        if len(texts) < count:
            raise SystemExit(f"--real: at most {len(texts)} distinct questions are generated")
        return cls(texts, cache_vectors(SharedEmbedding(), texts))

    def entries(self, n: int, rng: np.random.Generator):
        """(text, vector) for n entries: the real questions first, then sums of two."""
        real = min(n, len(self.texts))
        for i in range(real):
            yield self.texts[i], self.vectors[i]
        pairs: set[tuple[int, int]] = set()  # each pair once: a repeat would be one entry
        if n - real > len(self.texts) * (len(self.texts) - 1):
            raise SystemExit("--real is too small for that many distinct derived entries")
        while len(pairs) < n - real:
            a, b = (int(x) for x in rng.choice(len(self.texts), size=2, replace=False))
            if (a, b) in pairs:
                continue
            pairs.add((a, b))
            vector = self.vectors[a] + self.vectors[b] + rng.normal(0, NOISE, self.vectors.shape[1])
            yield (f"{self.texts[a]} {self.texts[b]}",
                   (vector / np.linalg.norm(vector)).astype(np.float32))


async def fill(redis_url: str, prefill: Prefill, n: int, tenants: list[str],
               max_per_tenant: int, ttl_s: int) -> dict[str, list[str]]:
    """Write n entries round-robin over the tenants; the real questions each tenant holds."""
    client, keys = connect(redis_url, timeout_s=60), Keys(PREFIX)
    exact, index = RedisExactStore(client, keys), SemanticIndex(client, keys)
    await index.ensure()
    held: dict[str, list[str]] = defaultdict(list)
    gate = asyncio.Semaphore(WRITES_AT_ONCE)
    real = set(prefill.texts)

    async def put(i: int, text: str, vector: np.ndarray) -> None:
        tenant = tenants[i % len(tenants)]
        request = cache_request(tenant, text)
        key = exact_key(request)
        answer = CachedAnswer("prefill", [f"Prefilled answer {i}."], "stop",
                              usage={"prompt_tokens": 12, "completion_tokens": 4,
                                     "total_tokens": 16}, created=int(time.time()))
        async with gate:  # as LayeredCache.store: exact, then semantic
            if text in real:  # derived texts are never asked verbatim: no exact entry
                await exact.put(tenant, POLICY, key, answer, ttl_s, max_per_tenant)
            await index.put(tenant, POLICY, key, context_hash(request), text, vector, answer,
                            ttl_s, max_per_tenant)
        if text in real:
            held[tenant].append(text)

    pending: set[asyncio.Task] = set()
    for i, (text, vector) in enumerate(prefill.entries(n, np.random.default_rng(11))):
        pending.add(asyncio.ensure_future(put(i, text, vector)))
        if len(pending) >= 4 * WRITES_AT_ONCE:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    for task in asyncio.as_completed(pending):
        await task
    await client.aclose()
    return held


async def index_info(redis_url: str) -> dict[str, str]:
    client = connect(redis_url, timeout_s=30)
    raw = await client.execute_command("FT.INFO", f"{PREFIX}:idx")
    info = {_s(k): _s(v) for k, v in zip(raw[::2], raw[1::2], strict=False)
            if not isinstance(v, list)}
    memory = await client.info("memory")
    await client.aclose()
    wanted = ("num_docs", "vector_index_sz_mb", "total_inverted_index_blocks", "indexing")
    return {**{k: info[k] for k in wanted if k in info},
            "valkey used_memory": memory.get("used_memory_human", "?")}


async def deadline_count(redis_url: str) -> int:
    client = connect(redis_url, timeout_s=30)
    value = await client.hget(f"{PREFIX}:stats", "deadline")
    await client.aclose()
    return int(value or 0)


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---- measurement -----------------------------------------------------------------------------

@dataclass
class Sample:
    kind: str  # "hit query" (a reworded prefilled question) or "miss query"
    route: str
    cache_ms: float | None
    total_ms: float


async def ask(client: httpx.AsyncClient, gateway: str, key: str, kind: str, text: str,
              gate: asyncio.Semaphore) -> Sample:
    headers = {"authorization": f"Bearer {key}", "cache-control": "no-store"}
    async with gate:
        begin = time.perf_counter()
        response = await client.post(f"{gateway}/v1/chat/completions", json=body(text),
                                     headers=headers)
        total = (time.perf_counter() - begin) * 1000
    response.raise_for_status()
    found = re.search(r"cache;dur=([\d.]+)", response.headers.get("server-timing", ""))
    return Sample(kind, response.headers.get("x-smallfirst-route", ""),
                  float(found.group(1)) if found else None, total)


async def measure(gateway: str, key: str, redis_url: str, held: list[str],
                  misses: list[str], args: argparse.Namespace, deadline_ms: float
                  ) -> dict[int, dict[int, float]]:
    """Per concurrency level, the cache step's percentiles over all lookups."""
    rng = random.Random(3)
    paraphrases = [reworded(q, f) for f in range(len(REWORDINGS)) for q in held]
    rng.shuffle(paraphrases)
    results = {}
    async with httpx.AsyncClient(timeout=60) as client:
        check = await ask(client, gateway, key, "check", held[0], asyncio.Semaphore(1))
        print(f"  check: a prefilled question asked verbatim is served as {check.route!r} "
              "(expected 'cache_exact': the gateway reads the prefilled keys)")
        warm = [ask(client, gateway, key, "warm", t, asyncio.Semaphore(1)) for t in misses[:5]]
        for one in warm:  # sequentially: loads the embedder and verifier off the clock
            await one
        misses = misses[5:]
        await asyncio.sleep(1.5)  # the gateway flushes its counters every second
        for concurrency in sorted({1, args.concurrency}):
            hits = [paraphrases.pop() for _ in range(min(args.queries, len(paraphrases)))]
            asked = [misses.pop() for _ in range(min(args.queries, len(misses)))]
            work = [("hit query", t) for t in hits] + [("miss query", t) for t in asked]
            rng.shuffle(work)
            before = await deadline_count(redis_url)
            gate = asyncio.Semaphore(concurrency)
            samples = await asyncio.gather(*(ask(client, gateway, key, kind, text, gate)
                                             for kind, text in work))
            await asyncio.sleep(1.5)  # the gateway flushes its counters every second
            past = await deadline_count(redis_url) - before
            results[concurrency] = report(samples, concurrency, deadline_ms, past)
    return results


class Steps:
    """Where one lookup's time goes (lookups run one at a time): the exact read, the
    embeddings (the question's, and the changed parts' the verifier asks for), the KNN search
    and the verifier's own work. Wraps the cache's parts on this instance only."""

    NAMES = ("exact read", "embedding", "KNN search", "verifier")

    def __init__(self, cache: LayeredCache) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self.verifying = False
        embed, verify = cache._embed, cache._verify
        cache._embed = self._timed_embed(embed)  # read at call time by the embedding steps
        cache._verify = self._timed_verify(verify)
        cache.exact.get = self._timed_async("exact read", cache.exact.get)
        cache.semantic.search = self._timed_async("KNN search", cache.semantic.search)

    def take(self) -> dict[str, float]:
        taken, self.ms = dict(self.ms), defaultdict(float)
        return taken

    def _timed_embed(self, embed: Any) -> Any:
        def timed(texts: list[str]) -> Any:
            began = time.perf_counter()
            try:
                return embed(texts)
            finally:
                took = (time.perf_counter() - began) * 1000
                self.ms["embedding"] += took
                if self.verifying:
                    self.ms["verifier"] -= took  # counted as embedding, not twice
        return timed

    def _timed_verify(self, verify: Any) -> Any:
        def timed(*args: Any) -> Any:
            began, self.verifying = time.perf_counter(), True
            try:
                return verify(*args)
            finally:
                self.verifying = False
                self.ms["verifier"] += (time.perf_counter() - began) * 1000
        return timed

    def _timed_async(self, name: str, call: Any) -> Any:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return await call(*args, **kwargs)
            finally:
                self.ms[name] += (time.perf_counter() - began) * 1000
        return timed


async def direct_lookups(redis_url: str, settings: CacheSettings, tenant: str, held: list[str],
                         misses: list[str], args: argparse.Namespace) -> None:
    """The lookup alone, in this process, one at a time: the exact read, the embedding, the
    KNN search and the verifier, timed to the end of the search whatever the deadline, with
    no HTTP, no upstream and no load generator on the machine's cores; then where the time
    went, step by step."""
    cache = build_cache(redis_url, lambda _: settings, prefix=PREFIX,
                        embed=SharedEmbedding(threads=args.embedding_threads))
    await cache.start()
    cache.verifier.warm()  # type: ignore[union-attr]  # as the gateway's warm-up does
    steps = Steps(cache)
    rng = random.Random(5)
    hits = [reworded(q, f) for f in range(len(REWORDINGS)) for q in held]
    rng.shuffle(hits)
    count = args.queries
    work = [("hit query", t) for t in hits[:count]] + [("miss query", t) for t in misses[:count]]
    rng.shuffle(work)
    samples, spent = [], []
    try:
        for kind, text in [("warm", t) for t in misses[-5:]] + work:
            steps.take()
            begin = time.perf_counter()
            hit, pending = await cache.lookup_staged(cache_request(tenant, text))
            if pending is not None:
                hit = await pending.search
            samples.append(Sample(kind, "cache_" if hit else "", None,
                                  (time.perf_counter() - begin) * 1000))
            spent.append(steps.take())
    finally:
        await cache.close()
    deadline = settings.lookup_deadline_ms
    print(f"  the lookup alone, in-process, one at a time (load average "
          f"{os.getloadavg()[0]:.1f}); ms; lookup deadline {deadline:g} ms")
    print(f"    {'':12}{'n':>5}{'served':>8}  {'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}"
          f"{'>=dl':>7}")
    for kind in ("hit query", "miss query", "all"):
        chosen = [s for s in samples if kind in ("all", s.kind) and s.kind != "warm"]
        took = quantiles([s.total_ms for s in chosen])
        served = sum(bool(s.route) for s in chosen) / max(len(chosen), 1)
        late = sum(s.total_ms >= deadline for s in chosen) / max(len(chosen), 1)
        print(f"    {kind:12}{len(chosen):5d}{served:8.1%}  {took[50]:7.2f}{took[90]:7.2f}"
              f"{took[99]:7.2f}{took[100]:7.2f}{late:7.1%}")
    measured = [ms for s, ms in zip(samples, spent, strict=True) if s.kind != "warm"]
    print("    by step, all lookups (ms per lookup; a step's p99 is not a share of the "
          "total's)")
    for name in Steps.NAMES:
        took = quantiles([ms.get(name, 0.0) for ms in measured])
        print(f"      {name:12}  p50 {took[50]:6.2f}  p90 {took[90]:6.2f}  p99 {took[99]:6.2f}")


def report(samples: list[Sample], concurrency: int, deadline_ms: float, past: int
           ) -> dict[int, float]:
    print(f"  concurrency {concurrency} (load average {os.getloadavg()[0]:.1f}); ms; "
          f"lookup deadline {deadline_ms:g} ms")
    print(f"    {'':12}{'n':>5}{'served':>8}  {'cache p50':>9}{'p90':>7}{'p99':>7}{'max':>7}"
          f"{'>=dl':>7}  {'e2e p50':>8}{'p99':>7}")
    for kind in ("hit query", "miss query", "all"):
        chosen = [s for s in samples if kind in ("all", s.kind)]
        cache = [s.cache_ms for s in chosen if s.cache_ms is not None]
        served = sum(s.route.startswith("cache_") for s in chosen) / max(len(chosen), 1)
        late = sum(ms >= deadline_ms for ms in cache) / max(len(cache), 1)
        c, e = quantiles(cache), quantiles([s.total_ms for s in chosen])
        print(f"    {kind:12}{len(chosen):5d}{served:8.1%}  {c[50]:9.2f}{c[90]:7.2f}"
              f"{c[99]:7.2f}{c[100]:7.2f}{late:7.1%}  {e[50]:8.2f}{e[99]:7.2f}")
    print(f"    past the deadline, served as misses (gateway counter): {past} of "
          f"{len(samples)} lookups ({past / max(len(samples), 1):.1%})")
    return c


def quantiles(values: list[float]) -> dict[int, float]:
    if not values:
        return dict.fromkeys((50, 90, 99, 100), float("nan"))
    array = np.asarray(values)
    return {q: float(np.percentile(array, q)) for q in (50, 90, 99, 100)}


# ---- the stack -------------------------------------------------------------------------------

def write_config(tmp: Path, upstream: str, redis_url: str, port: int, tenants: list[str],
                 args: argparse.Namespace) -> tuple[Path, CacheSettings]:
    """Gateway config, keys file and policies; returns the config and the cache settings."""
    policies = tmp / "policies"
    shutil.copytree(ROOT / "policies", policies)
    auto = yaml.safe_load((policies / "default.yaml").read_text())
    cache = {**auto.get("cache", {}), "max_entries_per_tenant": args.entries + 10_000}
    if args.deadline_ms is not None:
        cache["lookup_deadline_ms"] = args.deadline_ms
    auto["cache"] = cache
    (policies / "default.yaml").write_text(yaml.safe_dump(auto))
    (tmp / "keys.yaml").write_text(yaml.safe_dump(
        {"tenants": {t: {"keys": [f"sk-{t}"]} for t in tenants}}))
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "small_model": "hosted_vllm/small-stand-in", "small_api_base": f"{upstream}/v1",
        "policies": str(policies), "api_keys_file": str(tmp / "keys.yaml"), "port": port,
        "watch_policies": False, "redis_url": redis_url, "cache_prefix": PREFIX,
        "embedding_threads": args.embedding_threads,
    }))
    return config, CacheSettings(**cache)


def run_layout(entries: int, layout: int, prefill: Prefill, upstream: str,
               args: argparse.Namespace) -> dict[int, dict[int, float]]:
    tenants = [f"tenant{i:02d}" for i in range(layout)]
    print(f"\n{entries} entries over {layout} tenant(s); queries as {tenants[0]} "
          f"({entries // layout} entries)")
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        valkey, redis_url = start_valkey(Path(tmp))
        procs = [valkey]
        try:
            config, settings = write_config(Path(tmp), upstream, redis_url, port, tenants, args)
            procs.append(start([sys.executable, "-m", "tooling.cli", "serve", "--config",
                                str(config)], f"{gateway}/healthz"))
            began = time.perf_counter()
            held = asyncio.run(fill(redis_url, prefill, entries, tenants,
                                    args.entries + 10_000, settings.ttl_s))
            took = time.perf_counter() - began
            print(f"  fill: {entries} entries in {took:.1f} s ({entries / took:.0f}/s), "
                  f"load average {os.getloadavg()[0]:.1f}")
            info = asyncio.run(index_info(redis_url))
            print("  index: " + ", ".join(f"{k} {v}" for k, v in info.items()))
            results = asyncio.run(measure(gateway, f"sk-{tenants[0]}", redis_url,
                                          held[tenants[0]], miss_questions(), args,
                                          settings.lookup_deadline_ms))
            asyncio.run(direct_lookups(redis_url, settings, tenants[0], held[tenants[0]],
                                       miss_questions(), args))
            return results
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)


def compare(runs: dict[str, dict[int, dict[int, float]]]) -> None:
    """The cache step's p50 and p99, all lookups, as ratios to the small index's."""
    base = runs.get("baseline")
    if base is None:
        return
    print("\ncache step vs the baseline index (same machine, same run): p50 ratio, p99 ratio")
    for name, levels in runs.items():
        for concurrency, c in levels.items():
            b = base[concurrency]
            print(f"  {name:12} concurrency {concurrency}: {c[50] / b[50]:.2f}x, "
                  f"{c[99] / b[99]:.2f}x  ({c[50]:.2f} / {c[99]:.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--layouts", default="1,10",
                        help="tenant counts to spread the entries over, comma-separated")
    parser.add_argument("--real", type=int, default=3000,
                        help="distinct real questions embedded (the rest are derived)")
    parser.add_argument("--queries", type=int, default=300,
                        help="hit queries and as many miss queries per concurrency level")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--baseline-entries", type=int, default=1000,
                        help="a small one-tenant index measured first, side by side (0: none)")
    parser.add_argument("--embedding-threads", type=int, default=1,
                        help="the embedder's intra-op threads (gateway and lookup alone)")
    parser.add_argument("--deadline-ms", type=float, default=None,
                        help="override the policy's cache lookup_deadline_ms (default: keep)")
    args = parser.parse_args()
    layouts = [int(x) for x in args.layouts.split(",")]
    print(f"cache scale: load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    began = time.perf_counter()
    prefill = Prefill.embed(min(args.real, args.entries))
    print(f"embedded {len(prefill.texts)} real questions in {time.perf_counter() - began:.1f} s")
    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    proc = start([sys.executable, "-m", "load.upstream", "--port", str(up_port)],
                 f"{upstream}/health")
    try:
        runs = {}
        if args.baseline_entries:
            runs["baseline"] = run_layout(args.baseline_entries, 1, prefill, upstream, args)
        for layout in layouts:
            runs[f"{layout} tenant(s)"] = run_layout(args.entries, layout, prefill, upstream,
                                                     args)
        compare(runs)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
