"""ShapesVQA scoring: exact match per question type after normalisation; yes/no (POPE) metrics; OCR.

Normalisation: lowercase, punctuation removed, number words mapped to digits, leading articles dropped.
Multiple-choice predictions are reduced to their option letter ("B", "B.", "B. blue" -> "b"). A yes/no
prediction that starts with neither counts as "no" for precision/recall (as POPE does) and as wrong.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .palette import NUMBER_WORDS
from .questions import YES_NO_TYPES

_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_NUMBERS = {w: str(i) for i, w in enumerate(NUMBER_WORDS)}


def normalize_answer(text: str) -> str:
    """'The Red.' -> 'red'; 'Three' -> '3'."""
    words = str(text).lower().translate(_PUNCT).split()
    words = [_NUMBERS.get(w, w) for w in words]
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def _choice_letter(text: str) -> str:
    m = re.match(r"\s*\(?([A-Da-d])(?:[.)\s:]|$)", str(text))
    return m.group(1).lower() if m else normalize_answer(text)


def _yes_no(text: str) -> str:
    w = normalize_answer(text).split()
    return w[0] if w and w[0] in ("yes", "no") else "other"


@dataclass(frozen=True)
class VQAReport:
    """accuracy: per question type; overall: over all questions; yes/no and OCR figures as named."""

    accuracy: dict[str, float]
    overall: float
    yes_no_accuracy: float
    yes_no_precision: float
    yes_no_recall: float
    yes_no_f1: float
    yes_ratio: float
    ocr_accuracy: float
    n: int


def score_vqa(items: Iterable[dict[str, Any]]) -> VQAReport:
    """Score predictions. items: dicts with "type", "answer" and "prediction" (question types from
    questions.QUESTION_TYPES). Types without items are absent from ``accuracy``; empty metrics are 0."""
    per: dict[str, list[bool]] = defaultdict(list)
    tp = fp = fn = n_yes_pred = n_yn = n_yn_ok = 0
    for it in items:
        kind, ans, pred = it["type"], it["answer"], it.get("prediction", "")
        if kind == "multiple_choice":
            ok = _choice_letter(pred) == ans.lower()
        elif kind in YES_NO_TYPES:
            p, a = _yes_no(pred), normalize_answer(ans)
            ok = p == a
            n_yn += 1
            n_yn_ok += ok
            n_yes_pred += p == "yes"
            tp += p == "yes" and a == "yes"
            fp += p == "yes" and a == "no"
            fn += p != "yes" and a == "yes"
        else:
            ok = normalize_answer(pred) == normalize_answer(ans)
        per[kind].append(ok)
    allv = [v for vs in per.values() for v in vs]
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return VQAReport(
        accuracy={k: sum(v) / len(v) for k, v in sorted(per.items())},
        overall=sum(allv) / len(allv) if allv else 0.0,
        yes_no_accuracy=n_yn_ok / n_yn if n_yn else 0.0,
        yes_no_precision=prec,
        yes_no_recall=rec,
        yes_no_f1=2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        yes_ratio=n_yes_pred / n_yn if n_yn else 0.0,
        ocr_accuracy=sum(per["ocr"]) / len(per["ocr"]) if per.get("ocr") else 0.0,
        n=len(allv),
    )
