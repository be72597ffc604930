"""Answer accuracy against known facts: the text scoring that generation (which replay answers state their fact)
and evaluation (recall) share. No torch here."""

from __future__ import annotations

import difflib
import re
import string

STOPWORDS = set(
    "a an the is are was were be been of to in on at for by with and or it its this that there their them they "
    "we our you your i my me he she his her what which who whom when where why how do does did must should can "
    "every each about above from into as than then so any all some not no nor only also".split()
)


def normalise(text: str) -> str:
    text = text.lower()
    text = text.translate(str.maketrans("", "", string.punctuation.replace("-", "")))
    return " ".join(text.split())


def key_terms(reference: str, question: str = "") -> list[str]:
    """Words of the reference answer that carry the fact: not stopwords, not already in the question."""
    q = set(normalise(question).split())
    return [w for w in normalise(reference).split() if w not in STOPWORDS and w not in q]


def score_answer(
    prediction: str, reference: str, question: str = "", threshold: float = 0.5, value: str | None = None
) -> dict:
    """exact (normalised equality), contains (reference inside prediction), key_recall (share of the key terms
    found in the prediction) and correct. Without ``value``: the reference's key terms, correct from
    ``threshold`` on. With the fact's ``value`` (the part of the reference the question asks for, e.g. "Room
    4C"): the value's key terms, all of them needed (the reference's other words, "takes place", are not the
    fact, and "am" of a wrong "11:30 am" is not half of "9:40 am")."""
    p, r = normalise(prediction), normalise(reference)
    terms = key_terms(value if value is not None else reference, question)
    words = set(p.split())
    hits = sum(1 for t in terms if t in words or (re.fullmatch(r"[\d.:-]+", t) and t in p))
    if terms:
        recall = hits / len(terms)
    else:  # every word of the fact is in the question: the fact stated whole
        recall = float(bool(r) and r in p) if value is None else float(normalise(value) in p)
    needed = 1.0 if value is not None else threshold
    return {"exact": p == r, "contains": bool(r) and r in p, "key_recall": recall, "correct": recall >= needed}


def near_copy(text: str, phrasing: str) -> bool:
    """``text`` holds ``phrasing`` (both reduced to lowercase words), or the two read nearly alike: how a training
    prompt is checked against a held-out question."""
    a, b = (" ".join(re.findall(r"[a-z0-9]+", t.lower())) for t in (text, phrasing))
    if bool(b) and b in a:
        return True
    m = difflib.SequenceMatcher(None, a, b)  # the cheap upper bounds first, as difflib.get_close_matches does
    return m.real_quick_ratio() >= 0.85 and m.quick_ratio() >= 0.85 and m.ratio() >= 0.85
