"""The pair verifier: may the answer cached for one question be served for another?

Cosine similarity alone cannot tell "5 km" from "50 km", "ascending" from "descending" or two
long prompts that differ in one detail. The verifier looks at what differs between the cached
question and the new one (numbers, negations, opposite words, units, entities, programming
languages, two things trading places, which words changed and where, the embedding of the
changed parts) and a small gradient-boosted model turns those features into the probability
that the cached answer is right for the new question. Its threshold comes from a target
false-hit rate, through a calibration table measured on families the model was not fitted on.

The model ships as JSON (trees and calibration, with a SHA-256 of its content): no pickle is
ever loaded. `features` is the one code path used both in training and when serving.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from router.models import TreeEnsemble
from router.pairs.canonical import (
    COUNTRIES,
    NUMBER_WORDS,
    UNIT_ALIASES,
    align_typos,
    canonical,
)
from router.pairs.vectors import Embed, cache_vectors

MODEL_PATH = Path(__file__).parent / "verifier_model" / "verifier.json"

FEATURES = [
    "cosine", "diff_cosine", "normalized_equal", "bag_equal", "token_jaccard",
    "content_jaccard", "content_only_min", "content_only_max", "typo_pairs",
    "numbers_changed", "numbers_reordered", "negation_flip", "opposites",
    "direction_changes", "role_changes", "units_changed", "quantities_changed",
    "unit_order_changed", "months_changed", "entities_changed",
    "languages_changed", "wh_changed", "len_ratio", "log_len", "diff_ops", "diff_span",
    "first_diff", "last_diff", "one_side_empty", "last_line_changed", "inserted_content",
    "context_changed",
    # Veto only, after the model's columns: the shipped trees index columns by position and
    # never split on them (vetoed rows are left out of training).
    "swapped_roles", "operators_changed", "asks_changed",
]
# A difference of these kinds changes the answer whatever the model says: rejected outright.
VETOES = [
    "numbers_changed", "numbers_reordered", "negation_flip", "opposites", "direction_changes",
    "units_changed", "quantities_changed", "unit_order_changed", "months_changed",
    "entities_changed", "languages_changed", "context_changed", "swapped_roles",
    "operators_changed", "asks_changed",
]
# The probability may only fall as these grow (+1: only rise); keeps the model sane on
# families it never saw.
MONOTONE = {"cosine": 1, "diff_cosine": 1, "token_jaccard": 1, "content_jaccard": 1,
            "content_only_min": -1, "content_only_max": -1, "diff_span": -1,
            "role_changes": -1, "wh_changed": -1, "last_line_changed": -1,
            "inserted_content": -1}

_TOKEN = re.compile(
    r"\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])"  # 1,743 (thousands)
    r"|\d+(?:\.\d+)?"  # 42, 3.5 (211,3798 in a CSV row is two numbers)
    r"|[a-z][a-z0-9]*(?:['’][a-z]+)*[+#]*"  # words, c++, c#, don't
    r"|[$%€£¥#+*/<>=^]"
)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_SENTENCE_END = re.compile(r"(?:[.!?:]\s+|\n)")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9+#]*")

STOPWORDS = frozenset("""
a an the is are was were be been being am do does did doing have has had having i me my we our
you your he she it its they them their this that these those of in on at by with about as into
for to from or and but if then so than too very can could would should will shall may might
must what which who whom whose how why when where there here please pls hey hi hello thanks
thank cheers appreciate appreciated really just quick question kindly tell give show me some
any s t d ll re ve m much many way ways get got need want like know help write make let lets
also one ok okay well good great best i'd i'm it's what's that's how's there's you're
""".split())

NEGATIONS = frozenset(
    "not no never without none nobody nothing neither nor cannot cant can't don't doesn't "
    "didn't isn't aren't wasn't weren't won't wouldn't shouldn't couldn't mustn't".split()
)
# Words that turn a question around: "is X safe" / "is X dangerous", "foods to avoid".
POLARITY = NEGATIONS | frozenset(
    "avoid against oppose opposes opposing opposed unsafe dangerous harmful toxic "
    "risky bad worst worse disadvantages cons drawbacks".split()
)
OPPOSITES: tuple[tuple[str, str], ...] = tuple(
    tuple(pair.split("/")) for pair in """
ascending/descending increasing/decreasing increase/decrease increases/decreases raise/lower
rise/fall higher/lower high/low highest/lowest maximum/minimum max/min maximize/minimize
largest/smallest biggest/smallest larger/smaller bigger/smaller most/least more/less
encode/decode encoding/decoding encrypt/decrypt compress/decompress serialize/deserialize
import/export upload/download push/pull send/receive buy/sell add/remove add/subtract
plus/minus enable/disable start/stop open/close on/off in/out up/down before/after
first/last earliest/latest oldest/newest old/new older/newer early/late past/future
for/against pros/cons advantages/disadvantages benefits/risks benefits/drawbacks
favor/against favour/against support/oppose supporting/opposing safe/unsafe safe/dangerous
safely/dangerous healthy/unhealthy good/bad better/worse best/worst positive/negative
true/false include/exclude allow/deny accept/reject win/lose gain/lose profit/loss
hot/cold warm/cold long/short fast/slow heavy/light cheap/expensive cheapest/priciest
north/south east/west left/right above/below over/under inside/outside internal/external
eat/avoid recommended/avoid legal/illegal possible/impossible valid/invalid
multiply/divide even/odd prime/composite lowercase/uppercase encode/encoding
raise/reduce raise/decrease increase/reduce increase/lower boost/reduce boost/lower
improve/worsen strengthen/weaken expand/shrink grow/shrink lengthen/shorten widen/narrow
gain/loss gaining/losing earn/spend lend/borrow borrow/repay
""".split()
)
_OPPOSITE_OF: dict[str, set[str]] = {}
for _a, _b in OPPOSITES:
    _OPPOSITE_OF.setdefault(_a, set()).add(_b)
    _OPPOSITE_OF.setdefault(_b, set()).add(_a)

ROLE_WORDS = frozenset("from to into in than per vs versus by onto until till".split())
DIRECTION_ROLES = frozenset({"from", "to", "into"})
# Canonical unit and currency names (see `canonical`), plus a few with no other spelling.
UNITS = frozenset(UNIT_ALIASES) | frozenset("stone degrees real won au".split())
_AMBIGUOUS_UNITS = frozenset("""
second minute hour day week month year decade stone degrees real won ton
""".split())

MONTHS = frozenset("""
january february march april june july august september october november december
jan feb mar apr jun jul aug sep sept oct nov dec monday tuesday wednesday thursday friday
saturday sunday
""".split())

# Canonical names only: `canonical` has already turned golang, cpp, csharp, js, ... into them.
LANGUAGES = frozenset("""
python java javascript typescript ts go rust c c++ c# f# ruby php swift kotlin scala haskell
julia r perl erlang elixir lua dart bash shell powershell sql objc matlab ocaml clojure groovy
fortran cobol zig nim crystal lisp scheme racket prolog vb vba delphi pascal assembly solidity
""".split())

ARTICLES = frozenset(("a", "an", "the"))
OPERATORS = frozenset("+*/<>=^")
# The kind of answer a question word asks for. What and which ask for any kind ("What is the
# best place ..." / "Where is a good place ..."); the others for one.
ASKS = {"why": "reason", "when": "time", "where": "place", "who": "person", "whom": "person",
        "whose": "person", "how": "way", "what": "any", "which": "any"}
WH_WORDS = frozenset(ASKS)
DEGREES = frozenset("""
    come much many long often far old big hard easy good bad likely safe important difficult
    reliable effective accurate expensive fast soon well
""".split())
AUXILIARIES = frozenset("""
    is are am was were can could do does did will would should shall has have had may might
    must isn't aren't wasn't weren't can't couldn't don't doesn't didn't won't wouldn't
    shouldn't hasn't haven't hadn't
""".split())
_CLAUSES = re.compile(r"(?<=[.!?,:;])\s+|\n")

def tokens(text: str) -> list[str]:
    """Lower-cased word tokens; number words become digits, `1,743` becomes `1743`."""
    text = unicodedata.normalize("NFKC", text).lower()
    out = []
    for token in _TOKEN.findall(text):
        token = token.replace("’", "'")
        if "," in token:
            token = token.replace(",", "")
        out.append(NUMBER_WORDS.get(token, token))
    return out


def _is_number(token: str) -> bool:
    return token[:1].isdigit() and bool(_NUMBER.fullmatch(token))


def _content(words: list[str]) -> list[str]:
    return [w for w in words if w not in STOPWORDS and not (len(w) == 1 and not w.isalnum())]


def _entities(text: str) -> set[str]:
    """Capitalised words that do not open a sentence or a line (names, places, products), and
    countries wherever they stand ("capital of iran")."""
    found = set()
    for sentence in _SENTENCE_END.split(text):
        words = _NAME.findall(sentence)
        found |= {w.lower() for w in words[1:] if w[0].isupper()}
    found |= {w.lower() for w in _NAME.findall(text)} & COUNTRIES
    return found - STOPWORDS


def _bare(words: set[str]) -> set[str]:
    """The words without a possessive ending ("iran's" -> "iran")."""
    return {w[:-2] if w.endswith("'s") else w for w in words}


def _stem(word: str) -> str:
    for suffix in ("ly", "s"):
        if word.endswith(suffix) and len(word) > 4:
            return word[: -len(suffix)]
    return word


def _opposites(only_a: set[str], only_b: set[str], both: set[str]) -> int:
    """Opposite words across the two sides (increase/decrease, safe/unsafe, ...)."""
    stems_b = {_stem(w) for w in only_b}
    count = sum(1 for w in only_a if any(_stem(o) in stems_b
                                         for o in _OPPOSITE_OF.get(_stem(w), set())
                                         | _OPPOSITE_OF.get(w, set())))
    stems = {_stem(w) for w in both}
    return count + sum(1 for w in only_a | only_b
                       if w.startswith("un") and len(w) > 4 and _stem(w[2:]) in stems)


def _negations(words: list[str]) -> int:
    return sum(w in POLARITY or w.endswith("n't") for w in words)


def _quantities(words: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(number, unit) pairs in order, and the order units first appear in."""
    units = UNITS - _AMBIGUOUS_UNITS
    pairs = [(w, nxt) for w, nxt in zip(words, words[1:], strict=False)
             if _is_number(w) and nxt in units]
    order: list[str] = []
    for word in words:
        if word in units and word not in order:
            order.append(word)
    return pairs, order


def _unarticled(words: list[str]) -> list[str]:
    return [w for w in words if w not in ARTICLES]


def _number_order(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The bare numbers in order, and the amounts (a number and its unit) in order: "5 - 3"
    and "3 - 5" differ, "5 km minus 3 km" and "3 km minus 5 km" too, but "add 155 day to
    2019 9 28" and "2019 9 28 ... in 155 day" do not (an amount moved past a date)."""
    bound = [i for i, (w, nxt) in enumerate(zip(words, words[1:], strict=False))
             if _is_number(w) and nxt in UNITS]
    bare = [w for i, w in enumerate(words) if _is_number(w) and i not in bound]
    return bare, [(words[i], words[i + 1]) for i in bound]


def _counted(numbers: list[str]) -> list[str]:
    """The numbers that count as changed when they differ: all but 1, since "one" is as often
    a pronoun ("a new one", "one can") or "a" ("at least one order") as a count; a 1 against
    another number still shows as that number on one side only."""
    return sorted(n for n in numbers if n != "1")


def _asks(text: str) -> set[str]:
    """The kinds of answer a text asks for, clause by clause: a clause's question word's (among
    its first three words), or "yes/no" when it opens with an auxiliary verb ("any" with an
    "or": "Should I use X or Y?"). Empty for an instruction."""
    kinds = set()
    for clause in _CLAUSES.split(text):
        words = tokens(clause)
        first = [w if w in AUXILIARIES else w.split("'")[0] for w in words[:3]]
        if first and first[0] in AUXILIARIES:
            kinds.add("any" if "or" in words else "yes/no")
        kinds.update(_asked(w, words[k + 1:k + 2]) for k, w in enumerate(first) if w in ASKS)
    return kinds


def _asked(word: str, after: list[str]) -> str:
    """The kind of answer a question word asks for, given the word after it: "how" before an
    adjective asks how much ("How hard is it ...?" / "Is it hard ...?"), "how come" why."""
    if word == "how" and after and after[0] in DEGREES:
        return "reason" if after[0] == "come" else "degree"
    return ASKS[word]


def _asks_changed(a: set[str], b: set[str]) -> bool:
    """Two questions asking for different kinds of answer ("Why were ..." / "When were ...",
    "How can I ...?" / "Can I ...?"); "any" goes with every kind but yes or no, "degree" with
    yes or no too."""
    if not a or not b or a & b:
        return False
    if "degree" in a | b and "yes/no" in a | b:
        return False
    return not (("any" in a and b - {"yes/no"}) or ("any" in b and a - {"yes/no"}))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


INFLECTIONS = frozenset("s es ed d ing able ly er ers al".split())


def _spelling_variant(a: str, b: str) -> bool:
    """A typo of the same word: one letter added, dropped, changed or two swapped ("recioe"/
    "recipe", "mteers"/"meters"; two edits in long words), not another form of it ("mean"/
    "means"), another word ("bake"/"make", "where"/"there": both are in the dictionary),
    another name ("Austria"/"Australia") or its opposite ("ascending"/"descending")."""
    short, long_ = sorted((a, b), key=len)
    if long_.startswith(short) and long_[len(short):] in INFLECTIONS:
        return False
    if (a in _dictionary() and b in _dictionary()) or _opposites({a}, {b}, set()):
        return False
    return _edits(a, b) <= (2 if len(short) >= 8 else 1)


@lru_cache(maxsize=1)
def _dictionary() -> Any:
    """English words (about 160,000, from `pyspellchecker`'s frequency list, which leaves
    common misspellings out): a word in it is not a typo of another one."""
    from spellchecker import SpellChecker

    return SpellChecker(language="en", distance=1).word_frequency


def _edits(a: str, b: str) -> int:
    """Optimal string alignment distance (Levenshtein with adjacent swaps)."""
    if abs(len(a) - len(b)) > 2:
        return 3
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def _roles(words: list[str]) -> dict[str, str]:
    """Content word -> the preposition right in front of it ("from X to Y"; "to convert
    X to Y" gives X none)."""
    roles: dict[str, str] = {}
    current = ""
    for word in words:
        if word in ROLE_WORDS:
            current = "to" if word == "into" else word  # "translate into X" = "to X"
        elif word not in STOPWORDS:
            roles.setdefault(word, current)
            current = ""
    return roles


def _role_changes(ta: list[str], tb: list[str], named: set[str]) -> tuple[int, int]:
    """(shared words whose preposition changed, of which a direction changed).

    A direction change: "from X to Y" against "from Y to X", or a unit, currency or name
    moving into or out of "in"/"to" ("5 miles in km" against "5 km in miles").
    """
    roles_a, roles_b = _roles(ta), _roles(tb)
    changed = [(w, roles_a[w], roles_b[w]) for w in roles_a.keys() & roles_b.keys()
               if roles_a[w] != roles_b[w]]
    moves = {w: (ra, rb) for w, ra, rb in changed
             if ({ra, rb} <= DIRECTION_ROLES | {""} and {ra, rb} & DIRECTION_ROLES)
             or ({ra, rb} <= DIRECTION_ROLES | {"", "in"} and w in named)}
    # Words trading places ("a string to base32" / "base32 to a string"), or one moving from
    # "from" to "to": a plain word gaining a "to" ("how to make X" / "recipe for X") is not.
    reversed_moves = {(rb, ra) for ra, rb in moves.values()}
    direction = sum(1 for ra, rb in moves.values()
                    if (ra, rb) in reversed_moves or {ra, rb} <= DIRECTION_ROLES)
    return len(changed), direction


# Words that join two things without ordering them ("A and B", "A or B", "A vs B"; a comma
# or slash reads as "and"), and words that make the relation itself symmetric ("is A the same
# as B", "how does A differ from B", "compare A with B").
COORDINATORS = frozenset("and or nor vs versus v".split())
SYMMETRIC = frozenset("""
same similar similarity similarities equal equals equivalent identical alike different
difference differences differ differs compare comparing comparison related
""".split())
# Words that give the two sides of a relation different roles ("A than B", "A to B", "A of B").
RELATIONS = (ROLE_WORDS - COORDINATORS) | frozenset("""
of before after over under above below with for on at against toward towards without
""".split())
_ARTICLES = frozenset({"the", "a", "an"})
_MARKS = re.compile(r"(?<!\d),|,(?!\d)|[/&;]")
_MAX_SWAP_CHANGES = 2  # content words one side has and the other lacks, at most (both sides)
_MAX_SWAP_SPAN = 30  # shared content words between the first and the last out of order
_MAX_SWAP_LEFT = 3  # tokens of either side still unaligned once the two runs are exchanged


def _marked(text: str) -> list[str]:
    """`tokens`, with a comma, slash, ampersand or semicolon read as "and", without articles
    ("an elephant" / "a hippo") or possessive endings ("the seller's agent")."""
    return [w[:-2] if w.endswith("'s") else w for w in tokens(_MARKS.sub(" and ", text))
            if w not in _ARTICLES]


def _matched(a: list[str], b: list[str]) -> int:
    """Tokens in the longest-common-block alignment of `a` and `b`."""
    blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    return sum(block.size for block in blocks)


def _kind(word: str) -> str:
    """What a word stands for, as far as trading places goes: a number, a unit or a thing."""
    if _is_number(word):
        return "number"
    return "unit" if word in UNITS else "thing"


def _swapped_roles(text_a: str, text_b: str) -> int:
    """1 when two things trade places across a relation that is not symmetric ("Is A older
    than B?" / "Is B older than A?", "the time in Tokyo when it is noon in New York" / "...
    in New York when ... in Tokyo", "all squares rectangles" / "all rectangles squares").

    The two questions must have the same content words (but for `_MAX_SWAP_CHANGES`), and
    those they share must come in the same order once two runs of them of the same kinds are
    exchanged, with the same words between them on both sides ("issues with social justice" /
    "social justice issues" has not). The exchange must also make the whole new question line
    up with the cached one better than it does, and all but a few tokens (`_MAX_SWAP_LEFT`):
    a moved clause ("In Python, how ...?" / "How ... in Python?") keeps its neighbours and
    does not. Nor do two things trading places in "A and B", "A vs B", "between A and B" or
    "is A the same as B" (`_symmetric`).
    """
    ma, mb = _marked(text_a), _marked(text_b)
    ca, cb = Counter(_content(ma)), Counter(_content(mb))
    if sum(((ca - cb) + (cb - ca)).values()) > _MAX_SWAP_CHANGES:
        return 0
    shared = {w for w in ca & cb if w not in COORDINATORS | SYMMETRIC}
    at_a = [i for i, w in enumerate(ma) if w in shared]
    order_a = [ma[i] for i in at_a]
    at_b = [j for j, w in enumerate(mb) if w in shared]
    order_b = [mb[j] for j in at_b]
    if order_a == order_b or len(order_a) != len(order_b):
        return 0
    start = next(k for k, (x, y) in enumerate(zip(order_a, order_b, strict=True)) if x != y)
    end = len(order_a) - next(k for k, (x, y) in enumerate(
        zip(order_a[::-1], order_b[::-1], strict=True)) if x != y)
    run_a, run_b = order_a[start:end], order_b[start:end]
    if len(run_a) > _MAX_SWAP_SPAN:
        return 0
    n = len(run_a)
    for first in range(1, n):
        for last in range(1, n - first + 1):
            x, middle, y = run_a[:first], run_a[first:n - last], run_a[n - last:]
            if (run_b != y + middle + x
                    or {_kind(w) for w in x} != {_kind(w) for w in y}):
                continue
            # the token spans of y and x in the new question (y first), and what joins them
            y0, y1 = at_b[start], at_b[start + last - 1] + 1
            x0, x1 = at_b[start + n - first], at_b[start + n - 1] + 1
            joined_a = ma[at_a[start + first - 1] + 1:at_a[start + n - last]]
            if _bare_gap(mb[y1:x0]) != _bare_gap(joined_a):  # "issues with X" / "X issues"
                continue
            back = mb[:y0] + mb[x0:x1] + mb[y1:x0] + mb[y0:y1] + mb[x1:]
            matched = _matched(ma, back)
            if (matched > _matched(ma, mb) and len(ma) + len(mb) - 2 * matched <= _MAX_SWAP_LEFT
                    and not _symmetric(mb, y0, y1, x0)):
                return 1
    return 0


def _bare_gap(words: list[str]) -> list[str]:
    """The words between two things, but single letters ("World War I")."""
    return [w for w in words if len(w) > 1]


def _symmetric(words: list[str], first: int, gap_start: int, gap_end: int) -> bool:
    """Whether the thing starting at `words[first]` and the one after `words[gap_start:
    gap_end]` are joined by a symmetric relation: a coordinator or a symmetric word between
    them (or a symmetric word right before the first: "compare A with B"), and no relation
    word between them but one right after a symmetric word ("similar to", "same as")."""
    gap = words[gap_start:gap_end]
    before = words[max(0, first - 1):first]
    if not any(w in COORDINATORS | SYMMETRIC for w in gap + before):
        return False
    joined = before + gap
    return all(w not in RELATIONS or (k > 0 and joined[k - 1] in SYMMETRIC)
               for k, w in enumerate(joined) if k >= len(before))


def _last_line_text(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _last_line(text: str) -> list[str]:
    return _content(tokens(_last_line_text(text)))


def _context(text: str) -> list[str] | None:
    """The tokens before the last line of a multi-line prompt (its shared context)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return tokens("\n".join(lines[:-1])) if len(lines) > 1 else None


@dataclass(frozen=True)
class PairDiff:
    """What differs between the cached question `a` and the new one `b`."""

    text_a: str  # canonical texts (typos in the new one aligned with the cached one)
    text_b: str
    typos: int
    a: list[str]
    b: list[str]
    opcodes: list[tuple[str, int, int, int, int]]

    @classmethod
    def of(cls, a: str, b: str) -> PairDiff:
        b, typos = align_typos(a, b, _spelling_variant)
        return cls.of_canonical(canonical(a), canonical(b), typos)

    @classmethod
    def of_canonical(cls, a: str, b: str, typos: int = 0) -> PairDiff:
        """The comparison of two texts already in canonical form."""
        ta, tb = tokens(a), tokens(b)
        matcher = difflib.SequenceMatcher(None, ta, tb, autojunk=False)
        return cls(a, b, typos, ta, tb, matcher.get_opcodes())

    def changed(self) -> tuple[list[str], list[str]]:
        """The tokens of each side inside the non-equal stretches."""
        only_a, only_b = [], []
        for tag, i1, i2, j1, j2 in self.opcodes:
            if tag != "equal":
                only_a += self.a[i1:i2]
                only_b += self.b[j1:j2]
        return only_a, only_b

    def inserted(self) -> list[str]:
        """Tokens only one side has, in stretches the other side has nothing for."""
        out: list[str] = []
        for tag, i1, i2, j1, j2 in self.opcodes:
            if tag in ("insert", "delete"):
                out += self.a[i1:i2] + self.b[j1:j2]
        return out

    def diff_texts(self) -> tuple[str, str]:
        """The changed content of each side."""
        only_a, only_b = self.changed()
        return " ".join(_content(only_a)), " ".join(_content(only_b))

    @cached_property
    def shares_context(self) -> bool:
        """Two multi-line prompts with the same context: they differ in their last lines."""
        context = _context(self.text_a)
        return context is not None and context == _context(self.text_b)

    @cached_property
    def question(self) -> PairDiff:
        """The comparison of the last lines alone (meant for prompts sharing their context)."""
        return PairDiff.of_canonical(_last_line_text(self.text_a),
                                     _last_line_text(self.text_b))

    def compared_texts(self) -> tuple[str, str]:
        """The texts whose cosine is `diff_cosine`: the changed content of each side, or,
        when two multi-line prompts share their context, their whole last lines (the changed
        words alone of "Which region had the highest total revenue?" and "Identify the top
        region by revenue." leave out the region and the revenue they both ask about)."""
        if self.shares_context:
            return " ".join(_last_line(self.text_a)), " ".join(_last_line(self.text_b))
        return self.diff_texts()


def features(a: str, b: str, cosine: float, diff_cosine: float) -> np.ndarray:
    """The verifier's input for cached question `a` and new question `b`."""
    return features_of(PairDiff.of(a, b), cosine, diff_cosine)


def features_of(diff: PairDiff, cosine: float, diff_cosine: float) -> np.ndarray:
    """`features` of a pair already compared (serving reuses the comparison for the
    changed-part cosine).

    Two prompts sharing their context are judged as the pair of their last lines, the
    question each asks of it (their cosine, `diff_cosine`, in both cosine columns): the
    whole texts would make any two questions after one long context look like
    near-duplicates, and the model would learn the context's length, not the questions.
    The vetoes still read the whole texts."""
    whole = _values(diff, cosine, diff_cosine)
    if diff.shares_context:
        asked = _values(diff.question, diff_cosine, diff_cosine)
        whole.update({k: v for k, v in asked.items() if k not in VETOES})
    return np.array([whole[name] for name in FEATURES], dtype=np.float64)


def _values(diff: PairDiff, cosine: float, diff_cosine: float) -> dict[str, float]:
    a, b = diff.text_a, diff.text_b
    ta, tb = diff.a, diff.b
    sa, sb = set(ta), set(tb)
    ca, cb = set(_content(ta)), set(_content(tb))
    only_a, only_b = diff.changed()
    rest_a, rest_b = set(_content(list(set(only_a) - sb))), set(_content(list(set(only_b) - sa)))
    nums_a = [t for t in ta if _is_number(t)]
    nums_b = [t for t in tb if _is_number(t)]
    # "Iran's" names Iran: a name is compared without its possessive
    bare_a, bare_b = _bare(sa), _bare(sb)
    entities = (_entities(a) - bare_b) | (_entities(b) - bare_a)
    named = UNITS | LANGUAGES | _entities(a) | _entities(b)
    roles, direction = _role_changes(ta, tb, named)
    (pairs_a, order_a), (pairs_b, order_b) = _quantities(ta), _quantities(tb)
    longest = max(len(ta), len(tb), 1)
    changed_at = [i1 for tag, i1, _, _, _ in diff.opcodes if tag != "equal"]
    changed_end = [i2 for tag, _, i2, _, _ in diff.opcodes if tag != "equal"]
    span = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in diff.opcodes if tag != "equal")
    da, db = diff.diff_texts()
    values = {
        # The same words once canonical and typos corrected (articles aside): the same
        # question, whatever a typo or another spelling ("km" / "kilometers", "the UK" /
        # "Britain") did to the search's embedding.
        "cosine": 1.0 if _unarticled(ta) == _unarticled(tb) else cosine,
        "diff_cosine": diff_cosine,
        "normalized_equal": float(ta == tb),
        "bag_equal": float(sorted(ta) == sorted(tb)),
        "token_jaccard": _jaccard(sa, sb),
        "content_jaccard": _jaccard(ca, cb),
        "content_only_min": min(len(rest_a), len(rest_b)),
        "content_only_max": max(len(rest_a), len(rest_b)),
        "typo_pairs": diff.typos,
        "numbers_changed": float(_counted(nums_a) != _counted(nums_b)),
        "numbers_reordered": float(sorted(nums_a) == sorted(nums_b)
                                   and _number_order(ta) != _number_order(tb)),
        "negation_flip": float(_negations(ta) % 2 != _negations(tb) % 2),
        "opposites": _opposites(sa - sb, sb - sa, sa | sb),
        "direction_changes": direction,
        "role_changes": roles,
        "units_changed": len((sa ^ sb) & (UNITS - _AMBIGUOUS_UNITS)),
        "quantities_changed": float(sorted(pairs_a) != sorted(pairs_b)),
        # "8 ml in liters" = "liters in 8 ml": the number pins the source unit
        "unit_order_changed": float(set(order_a) == set(order_b) and order_a != order_b
                                    and not (pairs_a and sorted(pairs_a) == sorted(pairs_b))),
        "months_changed": len((sa ^ sb) & MONTHS),
        "entities_changed": len(entities & _bare(rest_a | rest_b)),
        "languages_changed": float((sa & LANGUAGES) != (sb & LANGUAGES)),
        "wh_changed": float((sa & WH_WORDS) != (sb & WH_WORDS)),
        "len_ratio": min(len(a), len(b)) / max(len(a), len(b), 1),
        "log_len": float(np.log1p(longest)),
        "diff_ops": len(changed_at),
        "diff_span": span / longest,
        "first_diff": (min(changed_at) / longest) if changed_at else 1.0,
        "last_diff": (max(changed_end) / longest) if changed_end else 1.0,
        "one_side_empty": float(bool(da) != bool(db)),
        "last_line_changed": float(_last_line(a) != _last_line(b)),
        "inserted_content": len(_content(diff.inserted())),
        "context_changed": float(_context_changed(a, b)),
        "swapped_roles": _swapped_roles(a, b),
        "operators_changed": float(sorted(t for t in ta if t in OPERATORS)
                                   != sorted(t for t in tb if t in OPERATORS)),
        "asks_changed": float(_asks_changed(_asks(a), _asks(b))),
    }
    return values


def _context_changed(a: str, b: str) -> bool:
    """Two multi-line prompts whose context (all but the last line) differs in content."""
    ca, cb = _context(a), _context(b)
    return ca is not None and cb is not None and _content(ca) != _content(cb)


_COSINE, _DIFF_COSINE = FEATURES.index("cosine"), FEATURES.index("diff_cosine")
assert MONOTONE["diff_cosine"] == MONOTONE["cosine"] == 1  # `PairVerifier.accept` relies on it


def _set_diff_cosine(x: np.ndarray, diff: PairDiff, value: float) -> None:
    """Put the changed-part cosine in every column that holds it (see `features_of`)."""
    x[_DIFF_COSINE] = value
    if diff.shares_context:
        x[_COSINE] = value


def vetoed(x: np.ndarray) -> bool:
    """Whether a hard difference (number, negation, opposite, unit, entity, ...) is present."""
    return any(x[FEATURES.index(name)] > 0 for name in VETOES)


def diff_cosines(embed: Embed, pairs: list[tuple[str, str]]) -> np.ndarray:
    """Cosine between the `compared_texts` of each pair (1.0 when nothing changed)."""
    return changed_part_cosines(embed, [PairDiff.of(a, b) for a, b in pairs])


def changed_part_cosines(embed: Embed, diffs: list[PairDiff]) -> np.ndarray:
    """`diff_cosines` of pairs already compared."""
    texts = [diff.compared_texts() for diff in diffs]
    todo = [i for i, (x, y) in enumerate(texts) if x and y]
    out = np.array([1.0 if not (x or y) else 0.0 for x, y in texts])
    if todo:
        vectors = cache_vectors(embed, [t for i in todo for t in texts[i]])
        out[todo] = np.einsum("ij,ij->i", vectors[0::2], vectors[1::2])
    return out


# ---- the shipped model ----------------------------------------------------------------------


class VerifierError(RuntimeError):
    """The shipped verifier file is missing, corrupt or of another version."""


def _ensemble(trees: list[dict[str, list]], baseline: float, rate: float) -> TreeEnsemble:
    """The JSON trees (leaves have left = -1) as the router's flat `TreeEnsemble`, which
    walks all of them at once: a Python loop over 300 trees took half the verifier's time."""
    columns = {k: np.concatenate([np.asarray(t[k]) for t in trees])
               for k in ("feature", "threshold", "left", "right", "value")}
    return TreeEnsemble.from_nodes(
        sizes=[len(t["feature"]) for t in trees], leaf=columns["left"] < 0,
        feature=columns["feature"], threshold=columns["threshold"], left=columns["left"],
        right=columns["right"],
        missing_left=np.zeros(len(columns["left"]), dtype=bool),  # NaN goes right, as `x <= t`
        value=rate * columns["value"], baseline=baseline, depth=max(map(_depth, trees)))


def _depth(tree: dict[str, list]) -> int:
    """Edges on the longest path from the root to a leaf."""
    depth, level = 0, [0]
    while True:
        level = [c for n in level if tree["left"][n] >= 0
                 for c in (tree["left"][n], tree["right"][n])]
        if not level:
            return depth
        depth += 1


class PairVerifier:
    """Gradient-boosted trees over `features`, loaded from JSON, with a calibration table."""

    # Longer prompts are never compared: the model was fitted on prompts up to about 2,100
    # characters, and comparing two of unrelated words takes 0.3 s at 4,000 (1.6 s at 8,000).
    max_chars = 4_000

    def __init__(self, data: dict[str, Any]) -> None:
        trained_on = data.get("features") or []
        # a model fitted before a veto-only column was added reads the columns it knows
        if trained_on != FEATURES[:len(trained_on)] or not set(FEATURES[len(trained_on):]) <= \
                set(VETOES) - set(MONOTONE):
            raise VerifierError("the verifier was trained on another feature set; rebuild it")
        self.data = data
        self.trees = _ensemble(data["trees"], float(data["init"]), float(data["learning_rate"]))
        self.calibration = data["calibration"]  # [threshold, worst-kind fhr, fhr, hit rate]

    @classmethod
    def load(cls, path: Path = MODEL_PATH) -> PairVerifier:
        return _load(str(path))

    def probability_of(self, x: np.ndarray) -> float:
        """The probability the cached answer is right (0.0 when a veto applies)."""
        if vetoed(x):
            return 0.0
        return float(1.0 / (1.0 + np.exp(-self.trees.raw(x)[0])))

    def probability(self, a: str, b: str, cosine: float, diff_cosine: float) -> float:
        return self.probability_of(features(a, b, cosine, diff_cosine))

    def accept(self, diff: PairDiff, cosine: float, threshold: float,
               changed_part_cosine: Callable[[], float]) -> float | None:
        """The probability when it reaches `threshold`, else None (always None when a veto
        applies). The changed parts are embedded (a second model call, about as long as the
        first) only when that can change the verdict: the model only rises with
        `diff_cosine` (see MONOTONE), so a pair rejected at its highest value or accepted at
        its lowest needs none. For the latter the probability returned is a lower bound."""
        x = features_of(diff, cosine, np.inf)  # +-inf: past every split on either side
        if vetoed(x) or self.probability_of(x) < threshold:
            return None
        if all(diff.compared_texts()):
            _set_diff_cosine(x, diff, -np.inf)
            lowest = self.probability_of(x)
            if lowest >= threshold:
                return lowest
        _set_diff_cosine(x, diff, changed_part_cosine())  # embeds only when both have content
        probability = self.probability_of(x)
        return probability if probability >= threshold else None

    def warm(self) -> None:
        """Load what a first comparison would (the word list typos are told apart with, about
        0.2 s), so no request pays for it."""
        self.probability("Say hello.", "Say helo.", 1.0, 1.0)

    def threshold_for(self, max_false_hit_rate: float) -> float:
        """The lowest threshold whose calibrated worst-kind false-hit rate meets the target.

        The table's rates come from predictions on families each model did not see, and the
        worst kind counts: meeting the target overall is not enough.
        """
        chosen = 1.0
        for threshold, worst, _overall, _hits in sorted(self.calibration, reverse=True):
            if worst > max_false_hit_rate:
                break
            chosen = threshold
        return chosen


@lru_cache(maxsize=4)
def _load(path: str) -> PairVerifier:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise VerifierError(f"cannot read the pair verifier {path}: {exc}") from exc
    body = {k: v for k, v in data.items() if k != "sha256"}
    if data.get("sha256") != content_hash(body):
        raise VerifierError(f"{path}: content hash mismatch (corrupt or edited by hand)")
    return PairVerifier(body)


def content_hash(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
