"""Relevance pairs: a question's own reply against a reply written for another question.

The easiest real judging signal a preference file holds. Every pair of a preference
file is a question with two replies written for it; a relevance pair keeps the
question and one of its replies (the right answer) and sets beside it a reply taken
from another pair (the wrong answer). A judge must read the question and both answers
to tell them apart, but needs no taste: "which answer is about this question" is
decidable where "which of two on-topic replies do people prefer" often is not. It is
the task the embedded demo trains on (docs/benchmarks.md, "Learning curves", shows
why), and a check that a judge reads the question at all.

Pure and seeded: the same pairs, seed and settings give the same relevance pairs on
every machine. Held-out questions stay held out when the caller splits the source
pairs first (`relevance_split`): their replies are only ever paired with each other.
"""

from __future__ import annotations

import hashlib
import random

from .data import PreferencePair, heldout_split
from .errors import InputError


def pair_chars(pair: PreferencePair) -> int:
    return len(pair.question) + len(pair.answer_a) + len(pair.answer_b)


def _rng(seed: int, *parts: object) -> random.Random:
    key = "|".join(str(p) for p in (seed, *parts)).encode("utf-8")
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))


def relevance_pairs(pairs: list[PreferencePair], *, seed: int = 0, per_question: int = 1) -> list[PreferencePair]:
    """`per_question` relevance pairs for each source pair: its question, one of its two
    replies (right) and one reply of another source pair (wrong), the right answer in
    slot A or B at random. Ties count as sources too: both their replies answer the
    question. Ids are `<source id>~rel<k>`."""
    if per_question < 1:
        raise InputError(f"data.pairs_per_question: expected 1 or more, got {per_question}")
    if len(pairs) < 2:
        raise InputError(f"data.task=relevance needs at least 2 pairs to take wrong answers from, got {len(pairs)}")
    out = []
    for i, pair in enumerate(pairs):
        for k in range(per_question):
            rng = _rng(seed, pair.id, k)
            right = rng.choice((pair.answer_a, pair.answer_b))
            j = rng.randrange(len(pairs) - 1)
            other = pairs[j + (j >= i)]
            wrong = rng.choice((other.answer_a, other.answer_b))
            a_first = rng.random() < 0.5
            out.append(PreferencePair(
                id=f"{pair.id}~rel{k}", question=pair.question,
                answer_a=right if a_first else wrong, answer_b=wrong if a_first else right,
                label="A" if a_first else "B", source=pair.source, subset="relevance"))
    return out


def relevance_split(pairs: list[PreferencePair], heldout: int, *, seed: int = 0, per_question: int = 1,
                    max_chars: int | None = None) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs) of the relevance task. The source pairs are
    split first (`heldout` questions, by a hash of their ids), then each side is paired
    within itself: no held-out question or reply is ever seen in training. Held-out
    questions give one pair each; training questions `per_question`. Sources with an
    empty reply, or (`max_chars`) whose question and replies are longer, are left out,
    and a question that occurs more than once is used once (its first pair)."""
    # An empty reply answers nothing: it cannot be the right answer. A question asked in
    # several conversations is kept once, so it cannot fall on both sides of the split.
    sources = list({p.question: p for p in reversed(pairs) if p.answer_a.strip() and p.answer_b.strip()
                    and (max_chars is None or pair_chars(p) <= max_chars)}.values())[::-1]
    if len(sources) < 2:
        raise InputError(f"data.task=relevance: only {len(sources)} distinct questions with two non-empty replies"
                         + (f" of at most {max_chars} characters" if max_chars is not None else ""))
    train, held = heldout_split(sources, heldout) if heldout else (sources, [])
    if heldout and len(held) < 2:
        raise InputError(f"data.heldout={heldout}: the relevance task needs at least 2 held-out questions")
    return (relevance_pairs(train, seed=seed, per_question=per_question),
            relevance_pairs(held, seed=seed, per_question=1) if held else [])
