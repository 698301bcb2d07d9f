"""Stage S2: label judgments against the human label and build contrastive pairs.

A judgment is *positive* when its verdict names the human-preferred answer (in the
order it was shown), *negative* when it names the other one, *unknown* when no verdict
can be read. Per pair and order, as in the Con-J reference:

  repeat   up to k (positive, negative) pairs from the repeated samples
  unknown  one (positive, unknown) pair when both exist
  hint     one (true-hint positive, reversed-hint negative) pair

With `rationale: false` (the verdict-only ablation) every target is the verdict alone,
and the (positive, unknown) pair is left out. A pair whose texts an example already has
is not emitted twice (verdict-only, that leaves one pair per example).

Every DPO pair's prompt is the plain judge prompt, without the hint, in the same
order: the model learns to reach the right verdict without being told. Only a
well-formed positive (read from a whole JSON object) is used as a chosen judgment.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .config import FilterConfig
from .parsing import RATIONALE_KEYS, VERDICT_KEYS, Verdict, cap_rationale, format_judgment, parse_verdict
from .prompts import JudgeTemplate, build_messages, ordered_answers, true_slot

POSITIVE, NEGATIVE, UNKNOWN = "positive", "negative", "unknown"
PAIR_KINDS = ("repeat", "unknown", "hint")
# A chosen judgment is a demonstration: it must have been read from a whole JSON
# object. A verdict recovered from broken text (key_value, bracket) still counts as
# positive, but its "rationale" may hold fragments of JSON.
WELL_FORMED = ("json", "fenced_json", "embedded_json")


def can_be_chosen(item: "Labelled", cfg: FilterConfig) -> bool:
    return item.status == POSITIVE and (not cfg.well_formed_chosen or item.verdict.method in WELL_FORMED)


def read_judgment(text: str, template: JudgeTemplate) -> Verdict:
    """Parse a judgment, trying the template's own keys first."""
    return parse_verdict(
        text or "",
        rationale_keys=(template.rationale_key, *RATIONALE_KEYS),
        verdict_keys=(template.verdict_key, *VERDICT_KEYS),
    )


def judgment_status(slot: int | None, label: str, order: str) -> str:
    """positive / negative / unknown for a verdict slot shown in `order`."""
    if slot not in (1, 2) or label not in ("A", "B"):
        return UNKNOWN
    return POSITIVE if slot == true_slot(label, order) else NEGATIVE


def clean_judgment(verdict: Verdict, template: JudgeTemplate, max_chars: int, rationale: bool = True) -> str:
    """A readable judgment as a training target: the template's JSON with a capped
    rationale, or the verdict alone (`rationale=False`, the verdict-only ablation)."""
    if not rationale:
        return format_judgment(None, verdict.slot, verdict_key=template.verdict_key)
    text = cap_rationale(verdict.rationale or "", max_chars)
    return format_judgment(text, verdict.slot, rationale_key=template.rationale_key, verdict_key=template.verdict_key)


def clip_text(text: str, max_chars: int) -> str:
    """Malformed judgments stay as written, only cut to a bounded length."""
    return text if len(text) <= max_chars else text[:max_chars]


@dataclass
class Labelled:
    row: dict
    verdict: Verdict
    status: str


def distinct(items: list[Labelled], template: JudgeTemplate, cfg: FilterConfig) -> list[Labelled]:
    """The first of each training target text: samples that read the same teach the same."""
    seen, out = set(), []
    for item in items:
        text = clean_judgment(item.verdict, template, cfg.max_rationale_chars, cfg.rationale)
        if text not in seen:
            seen.add(text)
            out.append(item)
    return out


@dataclass
class FilterResult:
    pairs: list[dict]
    stats: dict
    labelled: list[Labelled] = field(repr=False, default_factory=list)


def build_pairs(pairs, judgments: list[dict], template: JudgeTemplate, cfg: FilterConfig) -> FilterResult:
    """Contrastive DPO pairs and statistics from the sampled judgments."""
    by_id = {p.id: p for p in pairs}
    rng = random.Random(cfg.seed)
    groups: dict[tuple[str, str], dict[str, list[Labelled]]] = defaultdict(lambda: defaultdict(list))
    labelled = []
    for row in judgments:
        pair = by_id.get(row["id"])
        if pair is None or pair.label not in ("A", "B"):
            continue
        verdict = read_judgment(row.get("text", ""), template)
        item = Labelled(row, verdict, judgment_status(verdict.slot, pair.label, row["order"]))
        labelled.append(item)
        groups[(row["id"], row["order"])][row["kind"]].append(item)

    out = []
    seen: set[tuple] = set()
    cap = cfg.max_rationale_chars

    def emit(kind, pair_id, order, chosen: Labelled, rejected: Labelled):
        pair = by_id[pair_id]
        answer_1, answer_2 = ordered_answers(pair.answer_a, pair.answer_b, order)
        chosen_text = clean_judgment(chosen.verdict, template, cap, cfg.rationale)
        rejected_text = (
            clip_text(rejected.row.get("text", ""), cap + 200)
            if rejected.status == UNKNOWN
            else clean_judgment(rejected.verdict, template, cap, cfg.rationale)
        )
        # The same texts twice would only weigh one example double: verdict-only, every
        # (positive, negative) pair of an example is the same pair, the hint pair too.
        if (pair_id, order, chosen_text, rejected_text) in seen:
            return
        seen.add((pair_id, order, chosen_text, rejected_text))
        out.append(
            {
                "id": pair_id,
                "order": order,
                "kind": kind,
                "prompt": build_messages(template, pair.question, answer_1, answer_2),
                "chosen": chosen_text,
                "rejected": rejected_text,
                "chosen_key": [chosen.row["kind"], chosen.row["sample"]],
                "rejected_key": [rejected.row["kind"], rejected.row["sample"]],
            }
        )

    for (pair_id, order), kinds in sorted(groups.items()):
        repeats = sorted(kinds.get("repeat", []), key=lambda x: x.row["sample"])
        pos = distinct([x for x in repeats if can_be_chosen(x, cfg)], template, cfg)
        neg = distinct([x for x in repeats if x.status == NEGATIVE], template, cfg)
        unk = [x for x in repeats if x.status == UNKNOWN]
        rng.shuffle(pos)
        rng.shuffle(neg)
        for chosen, rejected in list(zip(pos, neg))[: cfg.max_pairs]:
            emit("repeat", pair_id, order, chosen, rejected)
        # Clipping a long malformed judgment can leave a readable verdict behind;
        # only a rejected text that is still unreadable after clipping is used.
        unk = [x for x in unk if not read_judgment(clip_text(x.row.get("text", ""), cap + 200), template).ok]
        # A malformed text is no verdict-only judgment: the ablation trains on verdicts alone.
        if cfg.unknown_pair and cfg.rationale and pos and unk:
            emit("unknown", pair_id, order, pos[-1], unk[0])
        if cfg.hint_pair:
            hint_pos = [x for x in kinds.get("hint_true", []) if can_be_chosen(x, cfg)]
            hint_neg = [x for x in kinds.get("hint_reverse", []) if x.status == NEGATIVE]
            if hint_pos and hint_neg:
                emit("hint", pair_id, order, hint_pos[0], hint_neg[0])

    return FilterResult(out, judgment_stats(pairs, labelled, out), labelled)


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def judgment_stats(pairs, labelled: list[Labelled], dpo_pairs: list[dict]) -> dict:
    """What the report shows: pairs by kind, examples without a pair, unknown rate,
    and how often the untrained model already agrees with the labels."""
    labelled_pairs = [p for p in pairs if p.label in ("A", "B")]
    examples = {(x.row["id"], x.row["order"]) for x in labelled}
    with_pair = {(p["id"], p["order"]) for p in dpo_pairs}
    by_kind = Counter(x.row["kind"] for x in labelled)
    status_by_kind = {
        kind: dict(Counter(x.status for x in labelled if x.row["kind"] == kind)) for kind in sorted(by_kind)
    }
    repeats = [x for x in labelled if x.row["kind"] == "repeat"]
    parsed = [x for x in repeats if x.status != UNKNOWN]
    agree_by_order = {}
    for order in ("ab", "ba"):
        rows = [x for x in repeats if x.row["order"] == order]
        if rows:
            agree_by_order[order] = _rate(sum(x.status == POSITIVE for x in rows), len(rows))
    hint_follow = {}
    for kind in ("hint_true", "hint_reverse"):
        rows = [x for x in labelled if x.row["kind"] == kind]
        if rows:
            hint_follow[kind] = _rate(sum(x.verdict.slot == x.row.get("hint_slot") for x in rows), len(rows))
    return {
        "pairs_in_data": len(pairs),
        "ties_excluded": sum(p.label == "tie" for p in pairs),
        "labelled_pairs": len(labelled_pairs),
        "judgments": len(labelled),
        "judgments_by_kind": dict(sorted(by_kind.items())),
        "status_by_kind": status_by_kind,
        "unknown_rate": _rate(sum(x.status == UNKNOWN for x in labelled), len(labelled)),
        "examples": len(examples),
        "examples_without_pair": len(examples - with_pair),
        "dpo_pairs": len(dpo_pairs),
        "dpo_pairs_by_kind": {k: sum(p["kind"] == k for p in dpo_pairs) for k in PAIR_KINDS},
        "base_agreement": _rate(sum(x.status == POSITIVE for x in repeats), len(repeats)),
        "base_agreement_parsed": _rate(sum(x.status == POSITIVE for x in parsed), len(parsed)),
        "base_agreement_by_order": agree_by_order,
        "hint_follow_rate": hint_follow,
    }
