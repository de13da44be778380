"""Hand-made features of a prompt, the small model's answer, its token logprobs and its
agreement with more samples of the small model for the same prompt.

This is the one feature code path: training calls `feature_row` on logged or public rows,
serving calls it on the live request. Every feature has a fixed name and position
(`FEATURE_NAMES`); a value that cannot be computed (no answer, no logprobs, no samples) is
NaN, and the bundle records which groups its models were trained on.
"""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

__all__ = [
    "ANSWER_FEATURES",
    "CONSISTENCY_FEATURES",
    "FEATURE_NAMES",
    "GROUPS",
    "LOGPROB_FEATURES",
    "PROMPT_FEATURES",
    "answer_features",
    "consistency_features",
    "feature_row",
    "logprob_features",
    "prompt_features",
]

PROMPT_FEATURES = (
    "p_log_chars", "p_log_words", "p_lines", "p_sentences", "p_digit_frac", "p_upper_frac",
    "p_numbers", "p_max_number_log", "p_code", "p_math", "p_latex", "p_options", "p_option_len",
    "p_questions", "p_how_many", "p_calculate", "p_write", "p_explain", "p_true_false",
    "p_negated", "p_percent_money", "p_units",
)
ANSWER_FEATURES = (
    "a_log_chars", "a_log_words", "a_lines", "a_len_ratio", "a_empty", "a_hedges", "a_refusal",
    "a_self_correct", "a_final_stated", "a_final_pos", "a_final_count", "a_final_distinct",
    "a_letter_valid", "a_letters_mentioned", "a_option_in_body", "a_final_num_int",
    "a_final_eq_last", "a_final_in_prompt", "a_arith_checked", "a_arith_wrong",
    "a_arith_wrong_frac", "a_prompt_numbers_used", "a_overlap", "a_novel_word_frac",
    "a_repetition", "a_truncated", "a_questions", "a_numbers", "a_steps_per_number",
    "a_final_scale", "a_final_eq_body_last", "a_option_number_gap", "a_operand_reuse",
    "a_final_mentions", "a_option_length_rank", "a_option_value_extremity",
)
LOGPROB_FEATURES = (
    "lp_count", "lp_mean", "lp_min", "lp_q05", "lp_q10", "lp_q25", "lp_std", "lp_low_frac",
    "lp_final_span_mean", "lp_top_entropy",
)
CONSISTENCY_FEATURES = ("sc_samples", "sc_agree", "sc_distinct", "sc_mode_share", "sc_stated")
GROUPS = {"prompt": PROMPT_FEATURES, "answer": ANSWER_FEATURES, "logprobs": LOGPROB_FEATURES,
          "consistency": CONSISTENCY_FEATURES}
FEATURE_NAMES = PROMPT_FEATURES + ANSWER_FEATURES + LOGPROB_FEATURES + CONSISTENCY_FEATURES

_NAN = float("nan")
_WORD = re.compile(r"[A-Za-z][A-Za-z']+")
# `_numbers` relies on every match being a float once `_NUMBER_MARKS` are dropped
_NUMBER = re.compile(r"(?=[-$\d])(?<![\w.])-?\$?\d[\d,]*(?:\.\d+)?%?")
_NUMBER_MARKS = str.maketrans("", "", ",$%")
_OPTION = re.compile(r"^\s*\(?([A-J])[.)]\s+(.+)$", re.M)
_CODE_MARKERS = ("```", "def ", "class ", "return ", "#include", "import ", "=>", "){", ") {")
_MATH_MARKERS = ("=", "+", "*", "/", "^", "<", ">", "sqrt", "sum", "integral", "derivative",
                 "equation")
_LATEX = re.compile(r"\\[a-z]+|\$[^$]+\$")
# Each pattern starts with a lookahead on its possible first characters: the same matches, but
# the scanner skips most positions cheaply.
_UNITS = re.compile(r"(?=[kcmhsglpfiJKNPVWH])\b(?:km|kg|cm|mm|m/s|mph|hours?|minutes?|seconds?|"
                    r"miles?|meters?|grams?|liters?|pounds?|feet|inches|mol|J|K|N|Pa|V|W|Hz)\b")


class _Phrases:
    """Phrases (regex alternatives, starting at a word boundary) counted or found in a text.

    Most texts hold none of them, and a substring test for each phrase's literal start (its
    stem, which every match contains) costs far less than a regex scan, so the regex runs only
    when a stem is in the text (lowercased with `ignore_case`; then a text that is not ASCII
    always gets the regex: case-insensitive matching pairs a few letters `str.lower` does not).
    """

    def __init__(self, *phrases: str, ignore_case: bool = False, whole_word: bool = True):
        self._stems = tuple(re.match(r"[a-z0-9 ,'-]*", phrase).group() for phrase in phrases)
        if not all(self._stems):
            raise ValueError("every phrase must start with a literal")
        starts = "".join(sorted({stem[0] for stem in self._stems}))
        end = r"\b" if whole_word else ""
        self._regex = re.compile(rf"(?=[{starts}])\b(?:{'|'.join(phrases)}){end}",
                                 re.I if ignore_case else 0)
        self._ignore_case = ignore_case

    def count(self, text: str, lower: str | None = None) -> int:
        """Matches in `text`; pass `lower` (its lowercase form) when already at hand."""
        return len(self._regex.findall(text)) if self._present(text, lower) else 0

    def found(self, text: str, lower: str | None = None) -> bool:
        return self._present(text, lower) and self._regex.search(text) is not None

    def _present(self, text: str, lower: str | None) -> bool:
        if not self._ignore_case:  # a match holds its stem as written
            haystack = text
        elif not text.isascii():
            return True
        else:
            haystack = text.lower() if lower is None else lower
        return any(map(haystack.__contains__, self._stems))


_HEDGES = _Phrases("i think", "i believe", "maybe", "perhaps", "possibly", "probably", "not sure",
                   "might", "it seems", "likely", "unclear", "assume", "approximately",
                   "roughly", "guess", ignore_case=True)
_REFUSAL = _Phrases("i can(?:no|')t", "i am unable", "i'm unable", "as an ai", "i'm sorry",
                    "i apologi[sz]e", "cannot (?:be determined|answer)", "not enough information",
                    "none of the (?:above|options)", ignore_case=True, whole_word=False)
_SELF_CORRECT = _Phrases("wait", "actually", "let me re", "mistake", "correction", "re-evaluate",
                         "reevaluate", "re-calculate", "recalculate", "on second thought",
                         "however", ignore_case=True)
# Question types, read on the lowercased question
_HOW_MANY = _Phrases("how (?:many|much|long|far|old)")
_CALCULATE = _Phrases("calculate", "compute", "find", "solve", "determine", "evaluate")
_WRITE = _Phrases("write", "compose", "draft", "describe", "create", "generate")
_EXPLAIN = _Phrases("why", "explain", "discuss", "compare")
_TRUE_FALSE = _Phrases("statement 1", "true or false", "true, false")
_NEGATED = _Phrases("not", "except", "least", "false", "incorrect")

_FINAL = re.compile(
    r"(?=[#\\fa])(?:####\s*|\\boxed\{|(?:final )?answer(?: is)?\s*[:=]?\s*(?:is\s*)?|"
    r"answer is\s*)\(?\$?(-?[\d,]*\.?\d+|[A-J])\b", re.I,
)
_ARITH = re.compile(r"(?=[-($\d])((?:[-(]?\$?\d[\d,]*(?:\.\d+)?%?\)?\s*[-+*/x×÷]\s*)+"
                    r"[(]?\$?\d[\d,]*(?:\.\d+)?%?\)*)\s*=\s*\$?(-?\d[\d,]*(?:\.\d+)?)")
_CALC = re.compile(r"<<([^<>=]{1,80})=([^<>]{1,40})>>")
_LETTER_REF = re.compile(r"\(([A-J])\)")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_MONEY = re.compile(r"[$%€£]")
_TIMES_X = re.compile(r"(?<=[\d)\s])x(?=[\s\d(])")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")
_DIGITS = b"0123456789"
_UPPER = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_STOP = frozenset("the a an of to in and or is are be for on with as by that this it at from "
                  "which what how many much".split())


def _log1p(value: float) -> float:
    return math.log1p(max(value, 0.0))


def _to_float(token: str) -> float | None:
    try:  # most tokens are plain numbers
        return float(token)
    except ValueError:
        pass
    token = token.replace(",", "").replace("$", "").rstrip("%")
    try:
        return float(token)
    except ValueError:
        return None


def _numbers(text: str) -> list[float]:
    return [float(token.translate(_NUMBER_MARKS)) for token in _NUMBER.findall(text)]


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower())) - _STOP


@lru_cache(maxsize=1024)  # a prompt is read by both scorers: parse it once
def _prompt_parts(
    prompt: str,
) -> tuple[tuple[float, ...], frozenset[str], dict[str, str], dict[str, list[float]]]:
    """(numbers, content words, lettered options, each option's numbers) of a prompt; treat
    as read-only."""
    options = _options(prompt)
    return (tuple(_numbers(prompt)), frozenset(_words(prompt)), options,
            {key: _numbers(text) for key, text in options.items()})


def _options(prompt: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in _OPTION.finditer(prompt)}


def _question_text(prompt: str) -> str:
    first_option = _OPTION.search(prompt)
    return prompt[: first_option.start()] if first_option else prompt


def _code_markers(text: str) -> int:
    """Code-looking substrings plus lines that end in `;` or `{` (cheap on long prompts)."""
    ends = sum(1 for line in text.splitlines() if line.rstrip().endswith((";", "{")))
    return ends + sum(text.count(m) for m in _CODE_MARKERS)


def prompt_features(prompt: str) -> list[float]:
    """Length, structure, code and maths markers and question type of a prompt."""
    text = prompt or ""
    chars = max(len(text), 1)
    numbers, _, options, _ = _prompt_parts(text)
    question = _question_text(text).lower()
    lower = text.lower()
    # ASCII bytes never occur inside a multi-byte UTF-8 sequence: count them on the bytes
    raw = text.encode("utf-8", "surrogatepass")
    return [
        _log1p(len(text)),
        _log1p(len(text.split())),
        float(text.count("\n") + 1),
        float(len(_SENTENCE_END.findall(text))),
        (len(raw) - len(raw.translate(None, _DIGITS))) / chars,
        (len(raw) - len(raw.translate(None, _UPPER))) / chars,
        _log1p(len(numbers)),
        _log1p(max((abs(v) for v in numbers), default=0.0)),
        float(_code_markers(text)),
        float(sum(lower.count(m) for m in _MATH_MARKERS)),
        float(len(_LATEX.findall(text))),
        float(len(options)),
        _log1p(float(np.mean([len(o) for o in options.values()])) if options else 0.0),
        float(question.count("?")),
        float(_HOW_MANY.found(question)),
        float(_CALCULATE.found(question)),
        float(_WRITE.found(question)),
        float(_EXPLAIN.found(question)),
        float(_TRUE_FALSE.found(lower)),
        float(_NEGATED.found(question)),
        float(bool(_MONEY.search(text))),
        float(len(_UNITS.findall(text))),
    ]


def _safe_eval(expression: str) -> float | None:
    """Evaluate + - * / arithmetic on numbers only; None for anything else."""
    expression = expression.replace(",", "").replace("$", "").replace("×", "*")
    expression = _TIMES_X.sub("*", expression).replace("÷", "/")
    expression = _PERCENT.sub(r"(\1/100)", expression)
    if len(expression) > 120 or "**" in expression:
        return None
    try:
        return _eval_node(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _eval_node(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
        left, right = _eval_node(node.left), _eval_node(node.right)
        ops = {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}
        return ops[type(node.op)] if type(node.op) in ops else left / right
    raise ValueError("not plain arithmetic")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(0.011 * max(abs(a), abs(b)), 0.011)


def _arithmetic(answer: str) -> tuple[int, int, float | None, Counter[float]]:
    """(checked, wrong, last computed value, operand counts) over `a op b = c` steps and
    <<a*b=c>> notes. Operands come from the notes when there are any: an answer with notes
    usually writes each step in both forms."""
    checked = wrong = 0
    last: tuple[int, float] | None = None
    operands = {_ARITH: Counter(), _CALC: Counter()}
    if "=" not in answer:  # both forms need one
        return checked, wrong, None, Counter()
    for pattern, counts in operands.items():
        for match in pattern.finditer(answer):
            counts.update(_numbers(match.group(1)))
            value, stated = _safe_eval(match.group(1)), _to_float(match.group(2).strip())
            if value is None or stated is None:
                continue
            checked += 1
            wrong += not _close(value, stated)
            if last is None or match.end() >= last[0]:
                last = (match.end(), stated)
    return checked, wrong, (last[1] if last else None), operands[_CALC] or operands[_ARITH]


def _final_answer(answer: str) -> tuple[list[re.Match[str]], str | None]:
    matches = list(_FINAL.finditer(answer))
    if matches:
        return matches, matches[-1].group(1)
    numbers = list(_NUMBER.finditer(answer[-200:]))
    return [], (numbers[-1].group() if numbers else None)


def _repetition(words: list[str]) -> float:
    grams = len(words) - 2
    if grams <= 0:
        return 0.0
    return 1.0 - len(set(zip(words, words[1:], words[2:], strict=False))) / grams


def answer_features(prompt: str, answer: str | None) -> list[float]:
    """Length, hedging, stated final answer, arithmetic and overlap features of an answer."""
    if answer is None:
        return [_NAN] * len(ANSWER_FEATURES)
    text, prompt = answer.strip(), prompt or ""
    words = text.split()
    matches, final = _final_answer(text)
    prompt_number_list, prompt_words, options, option_numbers = _prompt_parts(prompt)
    final_value = _to_float(final) if final and not final.isalpha() else None
    checked, wrong, last, operands = _arithmetic(text)
    prompt_numbers = set(prompt_number_list)
    answer_numbers = _numbers(text)
    answer_words = _words(text)
    body = text[: matches[-1].start()] if matches else text
    option_text = options.get(final.upper(), "") if final and final.isalpha() else ""
    chosen = final.upper() if option_text else None
    finals = [m.group(1).upper() for m in matches]
    lower = text.lower()
    return [
        _log1p(len(text)),
        _log1p(len(words)),
        float(text.count("\n") + 1),
        math.log((len(text) + 1) / (len(prompt) + 1)),
        float(not text),
        float(_HEDGES.count(text, lower)),
        float(_REFUSAL.count(text, lower)),
        float(_SELF_CORRECT.count(text, lower)),
        float(bool(matches)),
        matches[0].start() / max(len(text), 1) if matches else _NAN,
        float(len(matches)),
        float(len(set(finals))),
        float(final.upper() in options) if final and final.isalpha() and options else _NAN,
        float(len(set(_LETTER_REF.findall(body)))),
        float(bool(option_text) and option_text.lower()[:40] in body.lower()),
        float(final_value.is_integer()) if final_value is not None else _NAN,
        float(_close(final_value, last)) if final_value is not None and last is not None
        else _NAN,
        float(final_value in prompt_numbers) if final_value is not None else _NAN,
        float(checked),
        float(wrong),
        wrong / checked if checked else _NAN,
        len(prompt_numbers & set(answer_numbers)) / len(prompt_numbers) if prompt_numbers
        else _NAN,
        len(answer_words & prompt_words) / max(len(answer_words | prompt_words), 1),
        len(answer_words - prompt_words) / max(len(answer_words), 1),
        _repetition(lower.split()),
        float(bool(text) and text[-1] not in ".!?)]}*\"'`$%" and not text[-1].isdigit()),
        float(text.count("?")),
        _log1p(len(answer_numbers)),
        checked / max(len(prompt_numbers), 1),
        _scale(final_value, prompt_numbers),
        _eq_body_last(final_value, body),
        _option_number_gap(option_numbers.get(chosen, []), body),
        _operand_reuse(operands, prompt_number_list) if operands else _NAN,
        float(sum(_close(final_value, v) for v in answer_numbers)) if final_value is not None
        else _NAN,
        *_option_ranks(options, option_numbers, chosen),
    ]


def _scale(final_value: float | None, prompt_numbers: set[float]) -> float:
    """log10 of the final number against the prompt's largest number."""
    if final_value is None:
        return _NAN
    largest = max((abs(v) for v in prompt_numbers), default=0.0)
    return math.log10(abs(final_value) + 1.0) - math.log10(largest + 1.0)


def _eq_body_last(final_value: float | None, body: str) -> float:
    """Whether the stated final number is the last number of the reasoning before it."""
    numbers = _numbers(body[-400:]) if final_value is not None else []
    return float(_close(final_value, numbers[-1])) if numbers else _NAN


def _option_number_gap(chosen: list[float], body: str) -> float:
    """log10 of the relative gap between the reasoning's last numbers and the numbers of the
    option it picks: a computation that lands far from its chosen option was likely followed
    by a guess (NaN when either side has no number)."""
    computed = _numbers(body[-300:])[-3:] if chosen else []
    if not computed:
        return _NAN
    gap = min(abs(a - b) / max(abs(a), abs(b), 1e-9) for a in computed for b in chosen)
    return math.log10(gap + 1e-4)


def _operand_reuse(operands: Counter[float], prompt_numbers: Sequence[float]) -> float:
    """The most extra uses of one prompt number as an operand, beyond its occurrences in the
    prompt (negative when every one is used less): applying one quantity to each of several
    others is a common misreading."""
    given = Counter(prompt_numbers)
    return float(max((operands[v] - n for v, n in given.items()), default=0))


def _option_ranks(options: dict[str, str], option_numbers: dict[str, list[float]],
                  chosen: str | None) -> tuple[float, float]:
    """Where the chosen option stands among the others: (share of them that are shorter,
    |2 r - 1| with r the share of numeric options below its value: 1 for the smallest or
    largest value, 0 for the median). Test writers tend to make the right option the most
    complete one and to place numeric distractors on both sides of the right value."""
    if chosen is None or len(options) < 2:
        return _NAN, _NAN
    length = len(options[chosen])
    shorter = sum(len(text) < length for text in options.values()) / (len(options) - 1)
    values = {key: numbers[0] for key, numbers in option_numbers.items() if numbers}
    if chosen not in values or len(values) < 3:
        return shorter, _NAN
    below = sum(v < values[chosen] for v in values.values()) / (len(values) - 1)
    return shorter, abs(2.0 * below - 1.0)


def logprob_features(
    logprobs: Sequence[float] | None,
    final_pos: float = _NAN,
    top_logprobs: Sequence[Sequence[float]] | None = None,
) -> list[float]:
    """Statistics of the answer's token logprobs; all NaN when none came back."""
    if not logprobs:
        return [_NAN] * len(LOGPROB_FEATURES)
    lp = np.asarray(logprobs, dtype=np.float64)
    start = int(final_pos * len(lp)) if not math.isnan(final_pos) else max(len(lp) - 8, 0)
    return [
        _log1p(len(lp)),
        float(lp.mean()),
        float(lp.min()),
        *(float(q) for q in np.quantile(lp, [0.05, 0.10, 0.25])),
        float(lp.std()),
        float((lp < -2.0).mean()),
        float(lp[min(start, len(lp) - 1) :].mean()),
        _top_entropy(top_logprobs),
    ]


def _top_entropy(top_logprobs: Sequence[Sequence[float]] | None) -> float:
    if not top_logprobs:
        return _NAN
    entropies = []
    for alternatives in top_logprobs:
        p = np.exp(np.asarray(alternatives, dtype=np.float64))
        if p.size and p.sum() > 0:
            p = p / p.sum()
            entropies.append(float(-(p * np.log(np.maximum(p, 1e-12))).sum()))
    return float(np.mean(entropies)) if entropies else _NAN


def _answer_key(text: str) -> str | float | None:
    """A text's final answer in a comparable form: a letter, a number, or None if none."""
    _, final = _final_answer(text.strip())
    if final is None or final.isalpha():
        return final.upper() if final else None
    value = _to_float(final)
    return value if value is not None else final


def consistency_features(answer: str | None, samples: Sequence[str] | None) -> list[float]:
    """Self-consistency: how the answer's final answer agrees with those of k more samples of
    the same prompt; all NaN without samples.

    All but the count are shares, so a model trained with one extra sample reads k of them:
    `sc_agree` samples stating the answer's final answer (0 if the answer states none),
    `sc_distinct` (distinct final answers among answer and samples - 1) / k (0: all agree),
    `sc_mode_share` answer and samples holding the most common final answer, `sc_stated`
    samples that state a final answer at all.
    """
    if answer is None or not samples:
        return [_NAN] * len(CONSISTENCY_FEATURES)
    main = _answer_key(answer)
    keys = [_answer_key(s) for s in samples]
    counts = Counter(key for key in (main, *keys) if key is not None)
    k = len(keys)
    return [
        float(k),
        sum(key == main for key in keys) / k if main is not None else 0.0,
        max(len(counts) - 1, 0) / k,
        max(counts.values(), default=0) / (k + 1),
        sum(key is not None for key in keys) / k,
    ]


def feature_row(
    prompt: str,
    answer: str | None = None,
    logprobs: Sequence[float] | None = None,
    top_logprobs: Sequence[Sequence[float]] | None = None,
    samples: Sequence[str] | None = None,
) -> np.ndarray:
    """All hand features in `FEATURE_NAMES` order, as float64 (NaN where not computable).

    `samples` are more answers of the small model to the same prompt (self-consistency)."""
    answer_part = answer_features(prompt, answer)
    final_pos = answer_part[ANSWER_FEATURES.index("a_final_pos")]
    return np.array(
        prompt_features(prompt) + answer_part + logprob_features(logprobs, final_pos, top_logprobs)
        + consistency_features(answer, samples),
        dtype=np.float64,
    )
