"""Whether a small model's answer agrees with a frontier answer to the same prompt.

The label for learning from traffic: when the frontier also answered (an escalation, or a
shadow call), a small answer that agrees with it counts as good enough. Answers with a stated
final answer (a number, an option letter) agree when those match; free text agrees when the
two share enough of their words (token F1).
"""

from __future__ import annotations

import re

_FINAL = re.compile(
    r"(?:answer is|answer:|final answer[^:\n]*:|####|\\boxed\{)\s*\(?\$?([A-J]\b|-?[\d,]*\.?\d+)",
    re.I,
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"[a-z0-9]+")
TEXT_AGREEMENT = 0.5  # token F1 at which two free-text answers count as the same answer


def final_answer(text: str) -> str | None:
    """The stated final answer (an option letter or a number), normalised; None if absent."""
    matches = _FINAL.findall(text)
    if matches:
        return _normalise(matches[-1])
    numbers = _NUMBER.findall(text[-200:])
    return _normalise(numbers[-1]) if numbers else None


def _normalise(value: str) -> str:
    value = value.strip().rstrip(".").replace(",", "").replace("$", "")
    if len(value) == 1 and value.isalpha():
        return value.upper()
    try:
        number = float(value)
    except ValueError:
        return value.lower()
    return f"{number:g}"


def token_f1(a: str, b: str) -> float:
    words_a, words_b = _WORD.findall(a.lower()), _WORD.findall(b.lower())
    if not words_a or not words_b:
        return float(words_a == words_b)
    common = sum(min(words_a.count(w), words_b.count(w)) for w in set(words_a))
    if common == 0:
        return 0.0
    precision, recall = common / len(words_a), common / len(words_b)
    return 2 * precision * recall / (precision + recall)


def agreement(small: str, large: str) -> float:
    """1.0 or 0.0 when both state a final answer (same or not); else their token F1."""
    final_small, final_large = final_answer(small), final_answer(large)
    if final_small is not None and final_large is not None:
        return float(final_small == final_large)
    return token_f1(small, large)


def agrees(small: str, large: str) -> bool:
    return agreement(small, large) >= TEXT_AGREEMENT
