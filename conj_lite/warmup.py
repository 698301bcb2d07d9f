"""RISE stage 1: the SFT warm-up set of correct judgments, in both answer orders.

RISE ("Improve LLM-as-a-Judge Ability as a General Ability") first fine-tunes the
judge on correct judgments, then runs preference optimisation on pairs sampled from
the warmed-up model. Here the correct judgments come from

  positives  the base model's own well-formed positive judgments (plain and
             true-hint samples, the hint itself left out of the prompt, as in Con-J's
             pairs), or
  a file     judgments the user brings: rows with question, answer_a, answer_b and a
             judgment text (judging answer_a as answer 1), or ready rows with a
             prompt and a completion (or chosen) text.

Position swapping: every judgment is also added with the answers in the other order,
its verdict flipped and the answer references in its rationale exchanged ("answer 1 is
wrong" becomes "answer 2 is wrong"; likewise "the first answer", "Response 1",
"Output (a)", "Assistant B", "第一个回答"), so the warm-up set holds as many verdicts
for answer 1 as for answer 2 and cannot teach a position preference.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

from .errors import InputError
from .filtering import POSITIVE, WELL_FORMED, Labelled, clean_judgment, read_judgment
from .jsonio import iter_jsonl_objects, write_jsonl
from .parsing import Verdict
from .prompts import JudgeTemplate, build_messages, ordered_answers

SFT_FILE = "sft.jsonl"
WARMUP_KINDS = ("repeat", "hint_true")  # a reversed-hint judgment is never right


def slot_word(template: JudgeTemplate) -> str:
    """The word that names an answer slot, read off the hint: "answer" in
    "answer {k} is better", "回答" in "回答{k}更好"."""
    before = template.hint.split("{k}", 1)[0].rstrip()
    match = re.search(r"(\w+)$", before)
    return match.group(1) if match else "answer"


# Words a rationale names an answer with, besides the template's own slot word.
SLOT_NOUNS = ("answer", "response", "output", "assistant", "completion", "reply", "candidate", "option")
ZH_SLOT_NOUNS = ("回答", "答案", "回复", "输出")
SWAPPED = {"1": "2", "2": "1", "A": "B", "B": "A", "a": "b", "b": "a", "一": "二", "二": "一"}


@lru_cache(maxsize=8)
def _slot_pattern(template: JudgeTemplate) -> re.Pattern:
    nouns = "|".join(re.escape(word) for word in (slot_word(template), *SLOT_NOUNS, *ZH_SLOT_NOUNS))
    return re.compile(
        # "Answer 1", "response_2", "Output (a)", "Assistant B", "回答1": a noun, then 1/2,
        # (a)/(b) or a capital A/B standing alone ("answer a question" is left alone)
        rf"(?P<noun>(?<![A-Za-z])(?i:{nouns}))(?P<sep>[ _]?)"
        r"(?:\((?P<paren>[12abAB])\)|(?P<num>[12])(?!\d)|(?P<letter>[AB])(?!\w))"
        # "the first answer", "the second one", "First response"
        rf"|(?<![A-Za-z])(?P<ord>(?i:first|second))(?P<osep>\s+)(?=(?i:{nouns}|one)\b)"
        # "第一个回答", "第二个答案"
        rf"|第(?P<zh>[一二])(?=个?(?:{'|'.join(ZH_SLOT_NOUNS)}))"
    )


def _swap_ordinal(word: str) -> str:
    other = "second" if word.lower() == "first" else "first"
    if word.isupper():
        return other.upper()
    return other.capitalize() if word[0].isupper() else other


def _swap_match(match: re.Match) -> str:
    if match.group("noun") is not None:
        if match.group("paren") is not None:
            return f"{match.group('noun')}{match.group('sep')}({SWAPPED[match.group('paren')]})"
        return f"{match.group('noun')}{match.group('sep')}{SWAPPED[match.group('num') or match.group('letter')]}"
    if match.group("ord") is not None:
        return _swap_ordinal(match.group("ord")) + match.group("osep")
    return "第" + SWAPPED[match.group("zh")]


def swap_slots(text: str, template: JudgeTemplate) -> str:
    """Exchange the answer references in `text`, both ways in one pass: "Answer 1" <->
    "Answer 2" (any case), "the first answer" <-> "the second answer", "Response 1",
    "Output (a)", "Assistant A" / "B", "第一个回答" <-> "第二个回答"."""
    return _slot_pattern(template).sub(_swap_match, text)


def other_order(order: str) -> str:
    return "ba" if order == "ab" else "ab"


def example(pair_id: str, order: str, question: str, answer_1: str, answer_2: str, completion: str, slot: int,
            source: str, template: JudgeTemplate) -> dict:
    return {
        "id": pair_id,
        "order": order,
        "source": source,
        "slot": slot,
        "prompt": build_messages(template, question, answer_1, answer_2),
        "completion": completion,
    }


def judged_examples(pair_id: str, question: str, answer_a: str, answer_b: str, order: str, verdict: Verdict,
                    template: JudgeTemplate, *, max_chars: int, rationale: bool, swap_positions: bool,
                    source: str) -> list[dict]:
    """The warm-up example of one correct judgment shown in `order`, and its swap."""
    answer_1, answer_2 = ordered_answers(answer_a, answer_b, order)
    out = [example(pair_id, order, question, answer_1, answer_2, clean_judgment(verdict, template, max_chars, rationale),
                   verdict.slot, source, template)]
    if swap_positions:
        swapped = Verdict(3 - verdict.slot, swap_slots(verdict.rationale or "", template), verdict.method)
        out.append(example(pair_id, other_order(order), question, answer_2, answer_1,
                           clean_judgment(swapped, template, max_chars, rationale), swapped.slot, "swapped", template))
    return out


def dedupe_and_cap(groups: list[list[dict]], max_examples: int | None, seed: int) -> list[dict]:
    """Flatten groups (a judgment and its swap), dropping repeated (prompt, completion)
    examples; with `max_examples`, keep that many groups chosen at random with `seed`."""
    if max_examples is not None and len(groups) > max_examples:
        groups = list(groups)
        random.Random(seed).shuffle(groups)
        groups = groups[:max_examples]
    seen, out = set(), []
    for group in groups:
        for ex in group:
            key = (json.dumps(ex["prompt"], ensure_ascii=False), ex["completion"])
            if key not in seen:
                seen.add(key)
                out.append(ex)
    return out


def warmup_from_judgments(pairs, labelled: list[Labelled], template: JudgeTemplate, *, max_chars: int = 2000,
                          rationale: bool = True, swap_positions: bool = True, max_examples: int | None = None,
                          seed: int = 0) -> list[dict]:
    """Warm-up examples from the base model's positive judgments (see the module doc)."""
    by_id = {p.id: p for p in pairs}
    groups = []
    for item in labelled:
        if item.status != POSITIVE or item.verdict.method not in WELL_FORMED or item.row["kind"] not in WARMUP_KINDS:
            continue
        pair = by_id[item.row["id"]]
        groups.append(judged_examples(pair.id, pair.question, pair.answer_a, pair.answer_b, item.row["order"],
                                      item.verdict, template, max_chars=max_chars, rationale=rationale,
                                      swap_positions=swap_positions, source=item.row["kind"]))
    return dedupe_and_cap(groups, max_examples, seed)


def read_warmup_file(path: str | Path, template: JudgeTemplate, *, max_chars: int = 2000, rationale: bool = True,
                     swap_positions: bool = True, max_examples: int | None = None, seed: int = 0) -> list[dict]:
    """Warm-up examples from a user's JSONL of judgments (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: warm-up judgments file not found (warmup.source)")
    groups = [file_row_examples(row, where, template, max_chars=max_chars, rationale=rationale,
                                swap_positions=swap_positions)
              for where, row in iter_jsonl_objects(path)]
    if not groups:
        raise InputError(f"{path}: no warm-up judgments in the file")
    return dedupe_and_cap(groups, max_examples, seed)


def file_row_examples(row: dict, where: str, template: JudgeTemplate, *, max_chars: int, rationale: bool,
                      swap_positions: bool) -> list[dict]:
    if "judgment" in row:
        missing = [k for k in ("question", "answer_a", "answer_b") if not isinstance(row.get(k), str)]
        if missing:
            raise InputError(f"{where}: a judgment row needs text fields question, answer_a, answer_b; missing {missing}")
        verdict = read_judgment(str(row["judgment"]), template)
        if not verdict.ok:
            raise InputError(f"{where}: no verdict (1 or 2) can be read from the judgment {str(row['judgment'])[:80]!r}")
        pair_id = str(row.get("id", where))
        return judged_examples(pair_id, row["question"], row["answer_a"], row["answer_b"], "ab", verdict, template,
                               max_chars=max_chars, rationale=rationale, swap_positions=swap_positions,
                               source="file judgment")
    completion = row.get("completion", row.get("chosen"))
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        completion = completion[-1].get("content")  # a list of chat turns, as in a TRL dataset
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(completion, str) or not isinstance(prompt, list) or not prompt:
        raise InputError(f"{where}: expected question/answer_a/answer_b/judgment, or prompt and completion (or chosen)")
    verdict = read_judgment(completion, template)
    return [{"id": str(row.get("id", where)), "order": None, "source": "file", "slot": verdict.slot,
             "prompt": prompt, "completion": completion}]


def sft_from_pairs(dpo_pairs: list[dict]) -> list[dict]:
    """The no-DPO ablation's data: every DPO pair's prompt and chosen judgment (the
    same targets as Con-J's SFT term, without the DPO term)."""
    return [{"id": p["id"], "order": p["order"], "source": p["kind"], "prompt": p["prompt"],
             "completion": p["chosen"]} for p in dpo_pairs]


def write_sft_file(examples: list[dict], path: str | Path) -> Path:
    return write_jsonl(path, examples)


def warmup_stats(examples: list[dict]) -> dict:
    slots = Counter(ex.get("slot") for ex in examples)
    return {"examples": len(examples), "verdict_1": slots[1], "verdict_2": slots[2],
            "by_source": dict(sorted(Counter(ex["source"] for ex in examples).items()))}
