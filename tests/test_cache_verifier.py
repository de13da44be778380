"""The pair verifier: vetoes, the shipped model's integrity, its figures on held-out pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from router.pairs import training
from router.pairs.canonical import align_typos, canonical
from router.pairs.evaluate import evaluate
from router.pairs.verifier import (
    FEATURES,
    MODEL_PATH,
    VETOES,
    PairDiff,
    PairVerifier,
    VerifierError,
    _dictionary,
    _spelling_variant,
    diff_cosines,
    features,
    vetoed,
)

FIXTURE = Path(__file__).parent / "fixtures" / "cache_pairs.csv"
PAIRS = training.DEFAULT_PAIRS


@pytest.mark.parametrize("cached, new", [
    ("Convert 5 km to miles.", "Convert 50 km to miles."),
    ("Sort these in ascending order: 3, 1, 2", "Sort these in descending order: 3, 1, 2"),
    ("Is it safe to give grapes to dogs?", "Is it unsafe to give grapes to dogs?"),
    ("What is 32 feet in miles?", "What is 32 miles in feet?"),
    ("How do I migrate from MySQL to Oracle?", "How do I migrate from Oracle to MySQL?"),
    ("How do I read a file in Rust?", "How do I read a file in Go?"),
    ("Convert liters to milliliters.", "Convert milliliters to liters."),
    ("What foods should I eat if I have gout?",
     "What foods should I stay away from if I have gout?"),
    ("Which foods contain gluten?", "Which foods do not contain gluten?"),
    ("Notes:\nAlice owns item 1.\nBob owns item 2.\nWho owns item 2?",
     "Notes:\nAlice owns item 1.\nCarol owns item 2.\nWho owns item 2?"),
    ("Convert one mile to kilometers.", "Convert two miles to kilometers."),
    ("What is 1 + 1?", "What is 1 + 2?"),
    ("What is 5 - 3?", "What is 3 - 5?"),
    ("What is 5 km minus 3 km?", "What is 3 km minus 5 km?"),
])
def test_hard_differences_are_vetoed(cached: str, new: str) -> None:
    assert vetoed(features(cached, new, cosine=0.99, diff_cosine=0.99))
    assert PairVerifier.load().probability(cached, new, 0.99, 0.99) == 0.0


@pytest.mark.parametrize("cached, new", [
    ("If today is the 5th of October 2025, what date is it in 340 days?",
     "If today is 2025-10-05, what date is it in 340 days?"),
    ("What date is 338 days after November 25, 2021?", "What date is 338 days after 2021-11-25?"),
    ("Convert 163 kilometers to yards.", "Convert 163 km to yards."),
    ("What's 18250 KRW worth in Swiss francs?", "What's 18250 South Korean won worth in CHF?"),
    ("How fast is 48 meters per second in knots?", "How fast is 48 m/s in knots?"),
    ("Find 27 percent of 1,876.", "Find 27% of 1876."),
    ("Compare Perl and C sharp.", "Compare Perl and C#."),
    ("How much is 9420 Korean won in Swiss francs?",
     "How much is 9420 Korean won in Siwss feancs?"),
    ("How many liters make up 8 milliliters?", "8 milliliters is how many liters?"),
    ('Translate from Russian into Hindi: "thank you"',
     'Translate from Russian to Hindi: "thank you"'),
    ("What is the capital of the United Kingdom?", "What is the capital of Britain?"),
    ("It may be slow.", "It might be slow."),
    ("List customers with at least one order.", "List customers with an order."),
    ("Rename the column to a new one.", "Give the column a new name."),
    # an amount moved past a date is not two numbers trading places
    ("Add 155 days to the 28th of September 2019. What's the date?",
     "If today is the 28th of September 2019, what will the date be in 155 days?"),
])
def test_other_spellings_of_the_same_thing_are_not_vetoed(cached: str, new: str) -> None:
    assert not vetoed(features(cached, new, cosine=0.95, diff_cosine=0.9))


def test_canonical_names_keep_real_differences() -> None:
    assert canonical("25°C and 5 g") == "25 celsius and 5 gram"
    assert canonical("the 5th of October 2025") == canonical("October 5, 2025") == "2025 10 5"
    # "in" is a unit only right after a number
    assert canonical("What's in the box?") == "What's in the box?"
    assert vetoed(features("Convert 5 km to yards.", "Convert 5 miles to yards.", 0.95, 0.9))
    assert vetoed(features("What is 5 US dollars in yen?", "What is 5 Canadian dollars in yen?",
                           0.95, 0.9))


@pytest.mark.parametrize("question", [
    "Convert 2483 Australian dollars to Chinese yuan.",
    "2483 Australian dollars to Chinese yuan?",
    "How much is 2483 AUD in CNY?",
    "What's 2483 Australian dollars worth in Chinese yuan?",
    "How many yuan is 2483 Australian dollars?",
    "2483 AUD is how many CNY?",
    "I need 2483 Australian dollars expressed in renminbi.",
])
def test_conversion_requests_have_one_canonical_form(question: str) -> None:
    assert canonical(question).rstrip("?.") == "convert 2483 aud to cny"


def test_conversion_forms_keep_direction_amount_and_surroundings() -> None:
    assert canonical("What is 32 feet in miles?") == "convert 32 ft to mile?"
    assert canonical("How many feet is 32 miles?") == "convert 32 mile to ft?"
    assert vetoed(features("What is 32 feet in miles?", "How many feet is 32 miles?", 0.95, 0.9))
    assert vetoed(features("5 km to miles?", "How many miles is 50 km?", 0.95, 0.9))
    assert canonical("Quick question: what is 5 km in miles? Thanks!") == \
        "convert 5 km to mile?"
    # a qualifier after the target may matter, and "5 days in June" converts nothing
    assert canonical("Convert 5 cups to ml for baking.") == "Convert 5 cup to ml for baking."
    assert canonical("What happened 5 days in June?") == "What happened 5 day in June?"


@pytest.mark.parametrize("said, asked", [
    ("Capital of Indonesia? Thanks in advance!", "Capital of Indonesia?"),
    ("Hi there, what does the name Amara mean? Please help.", "what does the name Amara mean?"),
    ("Hello! Which city is the capital of Peru?", "Which city is the capital of Peru?"),
    ("Please, translate this: 'hola'", "translate this: 'hola'"),
    ("Hey, can you name the capital of Kenya?", "name the capital of Kenya?"),
    ("Could you please convert 426 metres to feet? Thank you!", "convert 426 meter to ft?"),
    ("Please answer this: How far is Pluto from the Sun?", "How far is Pluto from the Sun?"),
    ("I'd like you to name the capital of Chile. I'd really appreciate it.",
     "name the capital of Chile."),
    # courtesy inside the question is the question
    ("Hello world program in C", "Hello world program in C"),
    ("How do I say thank you in French?", "How do I say thank you in French?"),
    ("Can you speak French?", "Can you speak French?"),
    ("Thanks!", "Thanks!"),
])
def test_a_greeting_or_a_thank_you_around_a_question_is_left_out(said: str, asked: str) -> None:
    assert canonical(said) == asked


@pytest.mark.timeout(30)
def test_a_long_prompt_of_thank_yous_does_not_stall_the_lookup() -> None:
    """Unbounded, the sign-off search restarted after every "." and took minutes on this."""
    hostile = "thanks. " * 50_000 + "x"
    assert canonical(hostile).endswith("thanks. x")


def test_typo_alignment_never_turns_a_word_into_its_opposite() -> None:
    fixed, count = align_typos("Sort in ascending order", "Sort in descending order",
                               _spelling_variant)
    assert (fixed, count) == ("Sort in descending order", 0)
    fixed, count = align_typos("How do I make money?", "How do I make moeny?", _spelling_variant)
    assert (fixed, count) == ("How do I make money?", 1)


@pytest.mark.parametrize("cached, new", [
    ("How do I bake bread at home?", "How do I make bread at home?"),
    ("What is 310 miles in feet?", "What is 310 mules in feet?"),
    ("How can I cook hummus at home?", "How can I cook humus at home?"),
])
def test_typo_alignment_never_turns_one_real_word_into_another(cached: str, new: str) -> None:
    assert align_typos(cached, new, _spelling_variant) == (new, 0)


def test_typo_alignment_never_hides_a_negation() -> None:
    """"haven" is one letter from "have": aligned, "haven't" became "have't", which no
    negation list holds, and the negation veto did not fire."""
    cached = "Give me a SQL query that returns customers who have ordered within 30 days."
    new = "Give me a SQL query that returns customers who haven't ordered within 30 days."
    assert align_typos(cached, new, _spelling_variant) == (new, 0)
    assert vetoed(features(cached, new, cosine=0.97, diff_cosine=0.9))


@pytest.mark.parametrize("cached, new", [
    ("Is 5 > 3?", "Is 5 < 3?"),
    ("What is 6*3?", "What is 6/3?"),
    ("x = 5, find x^2", "x = 5, find x*2"),
])
def test_a_changed_operator_is_vetoed(cached: str, new: str) -> None:
    """The words and numbers are the same; the question is not."""
    assert vetoed(features(cached, new, cosine=0.95, diff_cosine=1.0))
    assert not vetoed(features("What is 6*3?", "what is 6 * 3", cosine=0.95, diff_cosine=1.0))


@pytest.mark.parametrize("cached, new", [
    ("Why were public libraries first created?", "When were public libraries first created?"),
    ("Who is Harsha Bhogle?", "Where is Harsha Bhogle?"),
    ("How can I become a pro boxer?", "Can I become a pro boxer?"),
    ("How are databases used?", "Why are databases used?"),
    ("What should you do if you hate your parents?", "Do you hate your parents?"),
    ("How come the sky is blue?", "When is the sky blue?"),
])
def test_a_question_asking_for_another_kind_of_answer_is_vetoed(cached: str, new: str) -> None:
    """The same words asking why instead of when, how instead of whether: another answer."""
    assert vetoed(features(cached, new, cosine=0.97, diff_cosine=0.97))


@pytest.mark.parametrize("cached, new", [
    ("How do I reverse a list in Python?", "What is the best way to reverse a list in Python?"),
    ("Where is a good place to live in Orange County?",
     "What is the best place to live in Orange County?"),
    ("Is it hard to create an Android game?", "How hard is it to create an Android game?"),
    ("Which is better, DynamoDB or SQLite?", "Should I use DynamoDB or SQLite?"),
    ("I was wondering, how should I start learning poker?", "How should I start learning poker?"),
    ("What is the most overrated city in India? Why?", "What is the most overrated city in India?"),
    ("Convert this table to JSON.", "What is this table as JSON?"),
])
def test_rewordings_that_ask_for_the_same_kind_of_answer_are_not_vetoed(cached: str,
                                                                        new: str) -> None:
    assert features(cached, new, cosine=0.97, diff_cosine=0.97)[FEATURES.index("asks_changed")] == 0


def test_warming_the_verifier_loads_its_word_list() -> None:
    _dictionary.cache_clear()
    PairVerifier.load().warm()
    assert _dictionary.cache_info().currsize == 1


def test_a_question_only_typos_apart_reads_as_the_cached_one() -> None:
    """The search's cosine of a misspelt question is low ("recioe" is three word pieces the
    embedder never saw together); corrected and canonical, the question is the cached one."""
    cached, new = "What's a good recipe for beef stew?", "What's a good recioe for beef stew?"
    cosine = FEATURES.index("cosine")
    assert features(cached, new, cosine=0.8, diff_cosine=1.0)[cosine] == 1.0
    assert features(cached, "What's a good recipe for fish stew?", 0.8, 0.5)[cosine] == 0.8
    # the same holds for another spelling of the same conversion, or an article more
    assert features("Convert 250 miles to kilometers.", "How many km is 250 miles?",
                    0.85, 1.0)[cosine] == 1.0
    assert features("Which city is the capital of Britain?",
                    "Which city is the capital of the UK?", 0.85, 1.0)[cosine] == 1.0
    verifier = PairVerifier.load()
    assert verifier.probability(cached, new, 0.8, 1.0) >= verifier.threshold_for(0.01)


def test_a_case_change_is_not_vetoed() -> None:
    verifier = PairVerifier.load()
    x = features("How do I sort a list in Python?", "how do i sort a list in python", 0.99, 1.0)
    assert not vetoed(x)
    assert verifier.probability_of(x) >= verifier.threshold_for(0.01)


def test_a_reworded_conversion_is_served_and_another_amount_is_not(embed) -> None:
    from router.pairs.vectors import cache_vectors

    verifier = PairVerifier.load()

    def probability(a: str, b: str) -> float:
        va, vb = cache_vectors(embed, [a, b])
        return verifier.probability(a, b, float(va @ vb), float(diff_cosines(embed, [(a, b)])[0]))

    cached = "Convert 250 miles to kilometers."
    assert probability(cached, "How many km is 250 miles?") >= verifier.threshold_for(0.01)
    assert probability(cached, "How many km is 25 miles?") == 0.0


def test_threshold_follows_the_target() -> None:
    verifier = PairVerifier.load()
    assert verifier.threshold_for(0.001) >= verifier.threshold_for(0.01) \
        >= verifier.threshold_for(0.1)


def test_edited_model_file_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "verifier.json"
    shutil.copy(MODEL_PATH, copy)
    data = json.loads(copy.read_text())
    data["init"] += 1.0
    copy.write_text(json.dumps(data))
    with pytest.raises(VerifierError, match="hash"):
        PairVerifier.load(copy)


def test_exported_trees_match_scikit_learn() -> None:
    frame = training.read_pairs(FIXTURE)
    x = training.pair_matrix(frame, None)
    y = frame.same_answer.to_numpy().astype(int)
    model = training.fit(x, y)
    body = {**training.export(model), "calibration": [[0.5, 0.0, 0.0, 1.0]]}
    ours = np.array([PairVerifier(body).probability_of(row) for row in x])
    assert np.allclose(ours, training.predict(model, x), atol=1e-6)


def test_accept_embeds_the_changed_parts_only_when_they_decide() -> None:
    """Same verdicts as scoring every pair in full, with fewer embeddings of changed parts."""
    frame = training.read_pairs(FIXTURE)
    x = training.pair_matrix(frame, None)
    verifier = PairVerifier.load()
    embedded = []
    for threshold in (0.5, 0.9, verifier.threshold_for(0.01)):
        for row, a, b, diff_cosine in zip(x, frame.q1, frame.q2, frame.diff_cosine, strict=True):
            diff = PairDiff.of(a, b)
            got = verifier.accept(diff, row[0], threshold, lambda diff=diff, d=diff_cosine:
                                  embedded.append(all(diff.compared_texts())) or d)
            full = verifier.probability_of(row)
            assert (got is not None) == (full >= threshold), (a, b, threshold)
            if got is not None:
                assert threshold <= got <= full + 1e-12
    would_embed = sum(all(PairDiff.of(a, b).compared_texts()) and not vetoed(row)
                      for row, a, b in zip(x, frame.q1, frame.q2, strict=True))
    # scoring every pair in full embeds `would_embed` pairs at each of the three thresholds;
    # the bounds spare well over half of those
    assert 0 < sum(embedded) <= 1.5 * would_embed


def test_prompts_sharing_their_context_compare_their_whole_last_lines() -> None:
    table = "Sales (CSV):\nregion,revenue\nNorth,2121\nSouth,775\n"
    diff = PairDiff.of(table + "Which region had the highest total revenue?",
                       table + "Identify the top region by revenue.")
    assert diff.diff_texts() == ("highest total", "identify top")
    assert diff.compared_texts() == ("region highest total revenue",
                                     "identify top region revenue")
    other_table = PairDiff.of(table + "What is the total revenue?",
                              table.replace("775", "776") + "What is the total revenue?")
    assert other_table.compared_texts() == other_table.diff_texts() == ("775", "776")


def test_prompts_sharing_their_context_are_judged_by_their_questions() -> None:
    """A long shared context must not make two different questions after it look alike:
    the model reads the pair of last lines, as it would the two questions alone, at the
    last lines' cosine; the vetoes still read the whole prompts."""
    table = "Sales (CSV):\nregion,revenue\nNorth,2121\nSouth,775\n"
    first, second = "Which region had the highest total revenue?", "List the regions."
    whole = features(table + first, table + second, cosine=0.99, diff_cosine=0.3)
    alone = features(first, second, cosine=0.3, diff_cosine=0.3)
    model = [i for i, name in enumerate(FEATURES) if name not in VETOES]
    np.testing.assert_array_equal(whole[model], alone[model])
    verifier = PairVerifier.load()
    assert verifier.probability_of(whole) == verifier.probability_of(alone)
    assert verifier.probability_of(whole) < verifier.threshold_for(0.01)
    # a context that differs is still vetoed, whatever the questions
    assert vetoed(features(table + first, table.replace("775", "776") + first, 0.99, 0.99))


def test_fixture_columns_match_the_embedding_path(embed) -> None:
    """The fixture's precomputed cosines come from the same code path as serving, within the
    embedder's documented noise across CPUs: its activations are quantized per call, so a
    float rounding step upstream moves a cosine by a few thousandths, on any CPU."""
    from router.pairs.vectors import cache_vectors

    frame = training.read_pairs(FIXTURE).head(40)
    pairs = list(zip(frame.q1, frame.q2, strict=True))
    vectors = cache_vectors(embed, [t for pair in pairs for t in pair])
    cosine = np.einsum("ij,ij->i", vectors[0::2], vectors[1::2])
    diff = diff_cosines(embed, pairs)
    for ours, theirs in ((cosine, frame.cosine), (diff, frame.diff_cosine)):
        gap = np.abs(ours - theirs.to_numpy())
        assert gap.max() <= 1.5e-2 and gap.mean() <= 3e-3, (gap.max(), gap.mean())


def test_held_out_fixture_meets_the_safety_target(tmp_path: Path) -> None:
    report = evaluate(FIXTURE, embed=None, verifier=PairVerifier.load(),
                      plot=tmp_path / "tradeoff.png")
    assert report["rows_left_out_as_trained"] == 0  # the fixture is held-out rows only
    assert report["false_hit_rate"] <= 0.01
    assert report["worst_negative_kind"]["rate"] <= 0.07  # at most 1 of ~15 per kind
    assert report["hit_rate"] >= 0.2
    assert set(report["by_kind"]) >= {"negation", "direction", "paraphrase_case"}
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000


def test_cli_eval_writes_the_report(tmp_path: Path) -> None:
    from tooling.cli import main

    report = tmp_path / "eval.json"
    assert main(["cache", "eval", "--pairs", str(FIXTURE), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert {"hit_rate", "false_hit_rate", "by_kind"} <= set(data)
    assert report.with_suffix(".png").is_file()


@pytest.mark.skipif(not PAIRS.is_file(), reason="labelled pairs (shared data) not present")
def test_split_is_by_family_and_model_matches_it() -> None:
    frame = training.read_pairs(PAIRS)
    test = training.held_out(frame)
    names = np.array(training.groups(frame))
    assert not set(names[test]) & set(names[~test])  # no group on both sides
    assert set(frame.kind[test]) == set(frame.kind)
    trained = set(PairVerifier.load().data["trained_rows"])
    ids = [training.row_id(a, b) for a, b in zip(frame.q1, frame.q2, strict=True)]
    assert trained == {i for i, held in zip(ids, test, strict=True) if not held}
    fitted_on = PairVerifier.load().data["features"]
    # columns added after the fit are veto-only: the trees never read them
    assert FEATURES[:len(fitted_on)] == fitted_on
    assert set(FEATURES[len(fitted_on):]) <= set(VETOES)


def test_pair_cosines_are_cached_only_under_a_named_embedder(tmp_path: Path) -> None:
    """The disk cache is keyed by the embedder's `vectors_id`; one that names none (whose
    vectors could be anything) is never cached."""
    frame = training.read_pairs(FIXTURE).head(4).drop(columns=["cosine", "diff_cosine"])

    def unnamed(texts: list[str]) -> np.ndarray:
        return np.eye(384, dtype=np.float32)[[len(t) % 384 for t in texts]]

    training.pair_matrix(frame, unnamed, tmp_path / "unnamed")
    assert not (tmp_path / "unnamed").exists()

    class Named:
        vectors_id = "named"

        def __call__(self, texts: list[str]) -> np.ndarray:
            return unnamed(texts)

    first = training.pair_matrix(frame, Named(), tmp_path / "named")
    assert len(list((tmp_path / "named").glob("cache-*.npy"))) == 2
    np.testing.assert_array_equal(training.pair_matrix(frame, Named(), tmp_path / "named"), first)
    Named.vectors_id = "another graph"
    training.pair_matrix(frame, Named(), tmp_path / "named")
    assert len(list((tmp_path / "named").glob("cache-*.npy"))) == 4
