"""The judge's pure core: where the verdict sits in a judgment, the grammar that holds
generation to it, P(answer 1 better) from two logits, and the results of one pair.

P(A better) comes from the verdict token: at the position where the judgment's JSON
expects the verdict (`{"rationale": "...", "better_answer": ` in the template's own keys)
the model's probabilities of "1" and "2" are read and normalised over the two;
P(A) = mean(p(slot of A) in order ab, p(slot of A) in order ba). The verdict is A or B
when both orders agree, otherwise "inconsistent".

Nothing here touches a model, a file or a heavy library.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from ..frame import closing_grammar, judgment_grammar, verdict_prefix  # noqa: F401  (the one judgment frame)
from ..prompts import JudgeTemplate, slot_to_label

MODES = ("rationale", "verdict")
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_CTX = 4096



def split_canonical_judgment(template: JudgeTemplate, text: str) -> tuple[str | None, int | None, str | None]:
    """(rationale, slot, prefix) of a reply in the canonical form, where prefix is the
    reply up to the verdict value. A reply cut off inside the rationale gives (partial
    rationale, None, the reply closed at the verdict position): the model's own text is
    kept, so the verdict is read right after what it wrote. Anything else: all None."""
    head = "{" + json.dumps(template.rationale_key, ensure_ascii=False) + ': "'
    marker = ", " + json.dumps(template.verdict_key, ensure_ascii=False) + ": "
    stripped = text.strip()
    if not template.rationale:  # `{"better_answer": k}`
        only = verdict_prefix(template)
        if stripped.startswith(only) and stripped[len(only):len(only) + 1] in ("1", "2"):
            return None, int(stripped[len(only)]), only
        return None, None, (only if stripped == "" or only.startswith(stripped) else None)
    if not stripped.startswith(head):
        return None, None, None
    try:
        value = json.loads(stripped)
    except ValueError:
        value = None
    if isinstance(value, dict) and value.get(template.verdict_key) in (1, 2) and isinstance(value.get(template.rationale_key), str):
        cut = stripped.rindex(marker) + len(marker)
        return value[template.rationale_key], value[template.verdict_key], stripped[:cut]
    # Cut off: keep the complete part of the rationale string (no half escape).
    match = re.match(r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*', stripped[len(head):])
    partial = match.group(0)
    try:
        rationale = json.loads('"' + partial + '"')
    except ValueError:
        return None, None, None
    return rationale, None, head + partial + '"' + marker


def p_slot1(logit_1: float, logit_2: float) -> float:
    """P(answer 1 is better) from the two verdict logits (softmax over the two)."""
    diff = logit_2 - logit_1
    if diff > 60:
        return math.exp(-diff)
    return 1.0 / (1.0 + math.exp(diff))


def cap_lengths(len_a: int, len_b: int, room: int) -> tuple[int, int]:
    """Token budgets for two answers that must share `room` tokens: the shorter keeps
    all it can, the longer gets the rest (both get half when both are long)."""
    if len_a + len_b <= room:
        return len_a, len_b
    half = room // 2
    if len_a <= half:
        return len_a, room - len_a
    if len_b <= half:
        return room - len_b, len_b
    return half, room - half


# ---------------------------------------------------------------- results


class Generation(NamedTuple):
    text: str
    finished: bool  # ended by the model (EOS), not by max_new_tokens
    tokens: int
    p1: float | None  # P(answer 1 better) read at the verdict token while generating, if it was


@dataclass
class OrderJudgment:
    """The judgment of one answer order."""

    order: str  # "ab" or "ba"
    slot: int | None  # the better answer as shown (1 or 2); None when unreadable (HF only)
    p1: float  # P(answer 1 is better) from the verdict token
    rationale: str | None
    text: str | None  # the raw reply (rationale mode)
    finished: bool = True  # False: cut off at max_new_tokens; the verdict then comes from p1
    method: str = "verdict"  # grammar | verdict | a parse_verdict method | probability
    tokens: int = 0  # tokens generated (rationale mode)

    @property
    def label(self) -> str | None:
        """The verdict as a record label: "A" or "B"."""
        return slot_to_label(self.slot, self.order)

    @property
    def p_a(self) -> float:
        return self.p1 if self.order == "ab" else 1.0 - self.p1


@dataclass
class JudgeResult:
    verdict: str  # "A", "B" or "inconsistent" (the two orders disagree)
    p_a: float  # P(A better), averaged over both orders
    orders: dict[str, OrderJudgment]
    mode: str
    seconds: float = 0.0
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_record(self) -> dict:
        ab, ba = self.orders["ab"], self.orders["ba"]
        return {
            "verdict": self.verdict,
            "p_a": round(self.p_a, 6),
            "verdict_ab": ab.label,
            "verdict_ba": ba.label,
            "p1_ab": round(ab.p1, 6),
            "p1_ba": round(ba.p1, 6),
            "rationale_ab": ab.rationale,
            "rationale_ba": ba.rationale,
            "finished_ab": ab.finished,
            "finished_ba": ba.finished,
            "tokens_ab": ab.tokens,
            "tokens_ba": ba.tokens,
            "mode": self.mode,
            "truncated": self.truncated,
            "seconds": round(self.seconds, 4),
        }


def combine(ab: OrderJudgment, ba: OrderJudgment, mode: str) -> JudgeResult:
    labels = {ab.label, ba.label}
    verdict = labels.pop() if len(labels) == 1 and None not in labels else "inconsistent"
    return JudgeResult(verdict, (ab.p_a + ba.p_a) / 2, {"ab": ab, "ba": ba}, mode)

