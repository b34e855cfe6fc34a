"""Verifiable answers: extract the final number a model wrote and compare it with the reference, exactly.

Small models rarely answer with the number alone ("13 + 15 = 28"), so extraction tries, in
order: the number after GSM8K's ``####``, the content of the last ``\\boxed{...}``, the number after
"answer is", the number after the last ``=``, then the last number in the text. Numbers are compared
as exact fractions (``0.75``, ``3/4`` and ``\\frac{3}{4}`` are equal; ``0.1 + 0.2`` style float noise
cannot make a right answer wrong), after removing thousands separators, ``$`` and ``%``. A reference that is not
a number itself gives the answer it marks (a GSM8K solution's ``####``, a ``\\boxed{}``) by the same extraction.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_FRAC = re.compile(r"-?\\d?frac\{(-?\d+)\}\{(\d+)\}")
_PATTERNS = [
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"answer is[:\s]*(" + _NUMBER + ")", re.IGNORECASE),
]


def normalize_number(text: str) -> Fraction | None:
    """``"1,234.50"`` -> 2469/2; ``"3/4"``, ``"\\frac{3}{4}"`` -> 3/4; ``"$5"``, ``"50%"`` -> 5, 50; else None."""
    text = text.strip()
    frac = _FRAC.fullmatch(text)
    if frac:
        sign = -1 if text.startswith("-") else 1
        return sign * Fraction(int(frac.group(1)), int(frac.group(2))) if int(frac.group(2)) else None
    cleaned = text.replace(",", "").replace("$", "").replace("%", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> Fraction | None:
    for pattern in _PATTERNS[:1]:
        found = pattern.findall(text)
        if found:
            return normalize_number(found[-1])
    boxed = _boxed(text)
    if boxed is not None:
        whole = normalize_number(boxed.replace("\\!", "").replace(" ", ""))
        if whole is not None:
            return whole
        inner = _FRAC.findall(boxed) or re.findall(_NUMBER, boxed)
        if inner:
            last = inner[-1]
            return (
                Fraction(int(last[0]), int(last[1]))
                if isinstance(last, tuple) and int(last[1])
                else normalize_number(str(last))
            )
    for pattern in _PATTERNS[1:]:
        found = pattern.findall(text)
        if found:
            return normalize_number(found[-1])
    after_equals = re.findall(r"=\s*(" + _NUMBER + ")", text)
    if after_equals:
        return normalize_number(after_equals[-1])
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def reference_answer(reference: str | float | Fraction) -> Fraction | None:
    """The gold number: the reference itself when it is one (``72``, ``3/4``, ``\\frac{3}{4}``); in a solution text,
    the answer it marks (GSM8K's ``#### N``, a ``\\boxed{}``), read the way a completion's is; else None: a gold
    that cannot be read is not guessed at from its last number."""
    if isinstance(reference, Fraction):
        return reference
    text = str(reference)
    number = normalize_number(text)
    if number is None and (_PATTERNS[0].search(text) or "\\boxed{" in text):
        return extract_answer(text)
    return number


def is_correct(completion: str, reference: str | float | Fraction) -> bool:
    predicted = extract_answer(completion)
    gold = reference_answer(reference)
    return predicted is not None and gold is not None and predicted == gold
