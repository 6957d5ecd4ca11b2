"""Per-example text metrics, each a pure function returning a score in [0, 100].

- ``chrf``: character n-gram F-score (Popović 2015) with sacreBLEU's sentence-level defaults:
  n = 1..6, beta = 2, whitespace removed, no word n-grams; precision and recall are averaged over
  the orders for which both strings have n-grams, then combined. Matches
  ``sacrebleu.metrics.CHRF().sentence_score`` (tested), without needing sacreBLEU installed.
- ``rouge_l``: ROUGE-L F1 over lowercased word tokens (runs of letters/digits, any script), from
  the longest common subsequence. For ASCII text it equals ``rouge_score``'s ``rougeL`` F-measure
  without stemming (tested).
- ``exact_match``: 100 when both strings are equal after lowercasing, trimming and collapsing
  whitespace, and dropping one trailing full stop.
- ``numeric_match``: 100 when the first number in the prediction equals the reference's first number.
- ``final_number_match``: the same with the last number of each (the result after a calculation).

A task's score is the mean of its per-example scores (see ``inlaid.eval.tasks``).
"""

from __future__ import annotations

import re
from collections import Counter

CHRF_ORDER = 6
CHRF_BETA = 2.0
_WORD = re.compile(r"[^\W_]+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    """Lowercase, trim, collapse whitespace, drop one trailing full stop."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 if normalize(prediction) == normalize(reference) else 0.0


def _char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(prediction: str, reference: str) -> float:
    hyp, ref = "".join(prediction.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, CHRF_ORDER + 1):
        hyp_grams, ref_grams = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        num_hyp, num_ref = sum(hyp_grams.values()), sum(ref_grams.values())
        if num_hyp == 0 or num_ref == 0:
            continue  # sacreBLEU's effective-order rule: skip orders a string is too short for
        matches = sum((hyp_grams & ref_grams).values())
        precisions.append(matches / num_hyp)
        recalls.append(matches / num_ref)
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    b2 = CHRF_BETA ** 2
    return 100.0 * (1 + b2) * p * r / (b2 * p + r)


def words(text: str) -> list[str]:
    """Lowercased runs of letters and digits: the tokens ROUGE-L compares."""
    return _WORD.findall(text.lower())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence, O(len(a)·len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    hyp, ref = words(prediction), words(reference)
    common = lcs_length(hyp, ref)
    if common == 0:
        return 0.0
    p, r = common / len(hyp), common / len(ref)
    return 100.0 * 2 * p * r / (p + r)


def numbers(text: str) -> list[float]:
    """The numbers written with digits (thousands commas allowed), in order."""
    found = []
    for m in _NUMBER.finditer(text):
        try:
            found.append(float(m.group().rstrip(",").replace(",", "")))
        except ValueError:
            continue
    return found


def first_number(text: str) -> float | None:
    found = numbers(text)
    return found[0] if found else None


def last_number(text: str) -> float | None:
    found = numbers(text)
    return found[-1] if found else None


def _same_number(a: float | None, b: float | None) -> float:
    return 100.0 if a is not None and b is not None and abs(a - b) < 1e-9 else 0.0


def numeric_match(prediction: str, reference: str) -> float:
    return _same_number(first_number(prediction), first_number(reference))


def final_number_match(prediction: str, reference: str) -> float:
    return _same_number(last_number(prediction), last_number(reference))


METRICS = {"chrf": chrf, "rouge_l": rouge_l, "exact_match": exact_match, "numeric_match": numeric_match,
           "final_number_match": final_number_match}
