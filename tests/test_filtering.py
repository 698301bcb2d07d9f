"""Stage S2 on hand-written judgments: labelling, DPO pair construction, statistics."""

import json
import random

import pytest

from conj_lite.config import FilterConfig
from conj_lite.data import PreferencePair
from conj_lite.filtering import (
    NEGATIVE,
    POSITIVE,
    UNKNOWN,
    build_pairs,
    judgment_stats,
    judgment_status,
    read_judgment,
)
from conj_lite.parsing import cap_rationale, parse_verdict
from conj_lite.prompts import JudgeTemplate, build_messages, hint_prefix, load_template, ordered_answers, true_slot

EN = load_template("en")

P1 = PreferencePair("p1", "What is the capital of Australia?", "Canberra is the capital.", "Sydney is the capital.", "A")
P2 = PreferencePair("p2", "Who wrote Pride and Prejudice?", "Charlotte Brontë.", "Jane Austen, in 1813.", "B")
P3 = PreferencePair("p3", "Pick a colour.", "Blue.", "Green.", "tie")
PAIRS = [P1, P2, P3]
BY_ID = {p.id: p for p in PAIRS}


def verdict_json(slot, why=None):
    why = why or f"Answer {slot} is accurate and directly answers the question."
    return json.dumps({"rationale": why, "better_answer": slot})


def fenced(slot):
    return f"Here is my judgment:\n```json\n{{\"rationale\": \"Answer {slot} is right.\", \"better_answer\": {slot}}}\n```"


# Real kinds of malformed output: cut off by max_new_tokens, no verdict at all,
# an impossible verdict, two conflicting verdicts.
TRUNCATED = '{"rationale": "Answer 1 is more accurate and more helpful than answer", "better_answer":'
NO_VERDICT = "Both answers talk about the question. It is hard to say."
BAD_SLOT = '{"rationale": "Both are fine.", "better_answer": 3}'
CONFLICT = '{"rationale": "one", "better_answer": 1} {"rationale": "two", "better_answer": 2}'


def row(pair_id, order, kind, sample, text):
    pair = BY_ID[pair_id]
    right = true_slot(pair.label, order)
    hint_slot = {"repeat": None, "hint_true": right, "hint_reverse": None if right is None else 3 - right}[kind]
    return {"id": pair_id, "order": order, "kind": kind, "sample": sample, "hint_slot": hint_slot, "text": text}


def repeats(pair_id, order, texts):
    return [row(pair_id, order, "repeat", i, t) for i, t in enumerate(texts)]


def only(kind, result):
    return [p for p in result.pairs if p["kind"] == kind]


# ---------------------------------------------------------------- labelling


@pytest.mark.parametrize(
    "slot, label, order, status",
    [
        (1, "A", "ab", POSITIVE),
        (2, "A", "ab", NEGATIVE),
        (1, "A", "ba", NEGATIVE),
        (2, "A", "ba", POSITIVE),
        (1, "B", "ab", NEGATIVE),
        (2, "B", "ab", POSITIVE),
        (1, "B", "ba", POSITIVE),
        (2, "B", "ba", NEGATIVE),
        (None, "A", "ab", UNKNOWN),
        (None, "B", "ba", UNKNOWN),
        (3, "A", "ab", UNKNOWN),
        (0, "B", "ba", UNKNOWN),
    ],
)
def test_judgment_status(slot, label, order, status):
    assert judgment_status(slot, label, order) == status


@pytest.mark.parametrize(
    "text, slot",
    [(verdict_json(2), 2), (fenced(1), 1), (TRUNCATED, None), (NO_VERDICT, None), (BAD_SLOT, None), (CONFLICT, None), ("", None)],
)
def test_read_judgment_on_messy_outputs(text, slot):
    assert read_judgment(text, EN).slot == slot


def test_read_judgment_uses_the_template_keys():
    custom = JudgeTemplate(name="c", user="{question}{answer_1}{answer_2}", hint="{k}", rationale_key="why", verdict_key="pick")
    text = '{"why": "Answer 2 cites the year.", "pick": 2}'
    verdict = read_judgment(text, custom)
    assert (verdict.slot, verdict.rationale) == (2, "Answer 2 cites the year.")
    zh = load_template("zh")
    verdict = read_judgment('{"原因": "回答2正确。", "更好的回答": 2}', zh)
    assert (verdict.slot, verdict.rationale) == (2, "回答2正确。")


# ---------------------------------------------------------------- repeat pairs


def test_repeat_pairs_capped_at_k():
    # p1 in order ab: the true slot is 1. Five positives, four negatives.
    texts = [
        verdict_json(1, "a"), verdict_json(2, "b"), fenced(1), verdict_json(2, "c"), verdict_json(1, "d"),
        fenced(2), verdict_json(1, "e"), verdict_json(2, "f"), verdict_json(1, "g"),
    ]
    rows = repeats("p1", "ab", texts)
    for k, expected in [(3, 3), (1, 1), (10, 4), (0, 0)]:
        result = build_pairs(PAIRS, rows, EN, FilterConfig(max_pairs=k))
        pairs = only("repeat", result)
        assert len(pairs) == expected, k
        chosen = [tuple(p["chosen_key"]) for p in pairs]
        rejected = [tuple(p["rejected_key"]) for p in pairs]
        assert len(set(chosen)) == len(chosen) and len(set(rejected)) == len(rejected)  # no sample reused
        positives = {i for i, t in enumerate(texts) if parse_verdict(t).slot == 1}
        assert {s for _, s in chosen} <= positives
        assert {s for _, s in rejected}.isdisjoint(positives)
        assert all(kind == "repeat" for kind, _ in chosen + rejected)


def test_no_repeat_pair_without_both_positive_and_negative():
    rows = repeats("p1", "ab", [verdict_json(1)] * 4) + repeats("p2", "ab", [verdict_json(1)] * 4)
    result = build_pairs(PAIRS, rows, EN, FilterConfig())
    assert result.pairs == []
    assert result.stats["examples_without_pair"] == 2


# ---------------------------------------------------------------- unknown pair


def test_one_unknown_pair_when_positive_and_unknown_exist():
    rows = repeats("p1", "ab", [verdict_json(1), TRUNCATED, NO_VERDICT, verdict_json(1), BAD_SLOT])
    result = build_pairs(PAIRS, rows, EN, FilterConfig())
    unknown = only("unknown", result)
    assert len(unknown) == 1
    pair = unknown[0]
    assert pair["chosen_key"][1] in (0, 3)
    raw = rows[pair["rejected_key"][1]]["text"]
    assert raw in (TRUNCATED, NO_VERDICT, BAD_SLOT)
    assert pair["rejected"] == raw  # a malformed judgment is kept as written
    assert parse_verdict(pair["rejected"]).slot is None
    assert only("repeat", result) == []  # no negatives


def test_no_unknown_pair_without_a_positive_or_when_disabled():
    rows = repeats("p1", "ab", [verdict_json(2), TRUNCATED])
    assert only("unknown", build_pairs(PAIRS, rows, EN, FilterConfig())) == []
    rows = repeats("p1", "ab", [verdict_json(1), TRUNCATED])
    assert len(only("unknown", build_pairs(PAIRS, rows, EN, FilterConfig()))) == 1
    assert only("unknown", build_pairs(PAIRS, rows, EN, FilterConfig(unknown_pair=False))) == []


def test_malformed_rejected_text_is_clipped_raw():
    long_raw = "The first answer says Canberra " * 200  # ~6000 chars, no verdict
    rows = repeats("p1", "ab", [verdict_json(1), long_raw])
    pair = only("unknown", build_pairs(PAIRS, rows, EN, FilterConfig(max_rationale_chars=100)))[0]
    assert long_raw.startswith(pair["rejected"])
    assert 100 <= len(pair["rejected"]) <= 500
    assert parse_verdict(pair["rejected"]).slot is None


def test_clipped_unknown_rejected_never_parses_to_the_true_slot():
    changed_mind = (
        '{"rationale": "Answer 1 names the capital.", "better_answer": 1}\n'
        "Wait, on reflection:\n" + json.dumps({"rationale": "y " * 200, "better_answer": 2})
    )
    assert parse_verdict(changed_mind).slot is None  # two verdicts: unknown
    rows = repeats("p1", "ab", [verdict_json(1), changed_mind])
    unknown_pairs = only("unknown", build_pairs(PAIRS, rows, EN, FilterConfig(max_rationale_chars=50)))
    # clipping would leave "better_answer": 1 readable, so that text is not used as a rejected judgment
    assert unknown_pairs == []
    assert all(parse_verdict(p["rejected"]).slot != true_slot("A", "ab") for p in unknown_pairs)


# ---------------------------------------------------------------- hint pair


def hint_rows(pair_id, order, true_text, reverse_text):
    return [row(pair_id, order, "hint_true", 0, true_text), row(pair_id, order, "hint_reverse", 0, reverse_text)]


def test_hint_pair_when_true_hint_positive_and_reversed_negative():
    # p2 (label B) in order ba: the true slot is 1, the reversed hint says 2.
    rows = hint_rows("p2", "ba", verdict_json(1, "Answer 1 is Jane Austen."), verdict_json(2, "Answer 2 is Brontë."))
    result = build_pairs(PAIRS, rows, EN, FilterConfig())
    (pair,) = result.pairs
    assert pair["kind"] == "hint"
    assert (pair["id"], pair["order"]) == ("p2", "ba")
    assert pair["chosen_key"] == ["hint_true", 0] and pair["rejected_key"] == ["hint_reverse", 0]
    assert json.loads(pair["chosen"]) == {"rationale": "Answer 1 is Jane Austen.", "better_answer": 1}
    assert json.loads(pair["rejected"]) == {"rationale": "Answer 2 is Brontë.", "better_answer": 2}


@pytest.mark.parametrize(
    "true_text, reverse_text",
    [
        (verdict_json(2), verdict_json(2)),  # the true hint was not followed
        (verdict_json(1), verdict_json(1)),  # the reversed hint was resisted
        (TRUNCATED, verdict_json(2)),
        (verdict_json(1), TRUNCATED),
    ],
)
def test_no_hint_pair_otherwise(true_text, reverse_text):
    rows = hint_rows("p2", "ba", true_text, reverse_text)
    assert build_pairs(PAIRS, rows, EN, FilterConfig()).pairs == []


def test_hint_pair_can_be_disabled():
    rows = hint_rows("p2", "ba", verdict_json(1), verdict_json(2))
    assert build_pairs(PAIRS, rows, EN, FilterConfig(hint_pair=False)).pairs == []


# ---------------------------------------------------------------- invariants over a mixed run


def mixed_rows(seed=0):
    """A realistic mix: both pairs, both orders, repeats and hints, messy outputs."""
    rng = random.Random(seed)
    outputs = [verdict_json(1), verdict_json(2), fenced(1), fenced(2), TRUNCATED, NO_VERDICT, BAD_SLOT, CONFLICT]
    rows = []
    for pair in PAIRS:
        for order in ("ab", "ba"):
            rows += repeats(pair.id, order, [rng.choice(outputs) for _ in range(8)])
            right = true_slot(pair.label, order) or 1
            rows += hint_rows(pair.id, order, verdict_json(right), verdict_json(3 - right))
    return rows


def test_every_pair_has_the_plain_prompt_in_its_order_and_right_verdicts():
    rows = mixed_rows()
    result = build_pairs(PAIRS, rows, EN, FilterConfig())
    assert {p["kind"] for p in result.pairs} == {"repeat", "unknown", "hint"}
    hints = {hint_prefix(EN, 1).strip(), hint_prefix(EN, 2).strip(), "Hint"}
    for pair in result.pairs:
        source = BY_ID[pair["id"]]
        answer_1, answer_2 = ordered_answers(source.answer_a, source.answer_b, pair["order"])
        assert pair["prompt"] == build_messages(EN, source.question, answer_1, answer_2)
        for message in pair["prompt"]:
            assert not any(h in message["content"] for h in hints)
        right = true_slot(source.label, pair["order"])
        assert parse_verdict(pair["chosen"]).slot == right
        assert parse_verdict(pair["rejected"]).slot != right
        if pair["kind"] == "unknown":
            assert parse_verdict(pair["rejected"]).slot is None
        else:
            assert parse_verdict(pair["rejected"]).slot == 3 - right


def test_order_is_taken_into_account():
    # p2 has label B. In order "ba" answer_b is shown first, so verdict 1 is right.
    rows = repeats("p2", "ba", [verdict_json(1), verdict_json(2)]) + repeats("p2", "ab", [verdict_json(1), verdict_json(2)])
    result = build_pairs(PAIRS, rows, EN, FilterConfig())
    by_order = {p["order"]: p for p in result.pairs}
    assert set(by_order) == {"ab", "ba"}
    assert by_order["ba"]["chosen_key"] == ["repeat", 0] and by_order["ba"]["rejected_key"] == ["repeat", 1]
    assert by_order["ab"]["chosen_key"] == ["repeat", 1] and by_order["ab"]["rejected_key"] == ["repeat", 0]
    shown = by_order["ba"]["prompt"][-1]["content"]
    assert shown.index("Jane Austen") < shown.index("Brontë")
    status = {(x.row["order"], x.row["sample"]): x.status for x in result.labelled}
    assert status == {("ba", 0): POSITIVE, ("ba", 1): NEGATIVE, ("ab", 0): NEGATIVE, ("ab", 1): POSITIVE}


def test_ties_and_unknown_ids_are_ignored():
    rows = repeats("p3", "ab", [verdict_json(1), verdict_json(2), TRUNCATED])
    rows += hint_rows("p3", "ab", verdict_json(1), verdict_json(2))
    rows.append({"id": "ghost", "order": "ab", "kind": "repeat", "sample": 0, "hint_slot": None, "text": verdict_json(1)})
    result = build_pairs(PAIRS, rows, EN, FilterConfig())
    assert result.pairs == [] and result.labelled == []
    assert result.stats["judgments"] == 0
    assert result.stats["ties_excluded"] == 1
    assert result.stats["labelled_pairs"] == 2


def test_rationale_capped():
    long_why = ("Canberra was chosen as a compromise between Sydney and Melbourne. " * 20).strip()
    rows = repeats("p1", "ab", [verdict_json(1, long_why), verdict_json(2, long_why)])
    (pair,) = build_pairs(PAIRS, rows, EN, FilterConfig(max_rationale_chars=150)).pairs
    for side, slot in (("chosen", 1), ("rejected", 2)):
        value = json.loads(pair[side])
        assert value["better_answer"] == slot
        assert len(value["rationale"]) <= 150
        assert value["rationale"] == cap_rationale(long_why, 150)
        assert long_why.startswith(value["rationale"])
        assert value["rationale"].endswith("Melbourne.")  # cut at a sentence end


def test_short_rationale_kept_whole_and_in_template_keys():
    zh = load_template("zh")
    texts = ['{"原因": "回答1正确。", "更好的回答": 1}', '```json\n{"原因": "回答2更详细。", "更好的回答": 2}\n```']
    rows = repeats("p1", "ab", texts)
    (pair,) = build_pairs(PAIRS, rows, zh, FilterConfig()).pairs
    assert json.loads(pair["chosen"]) == {"原因": "回答1正确。", "更好的回答": 1}
    assert json.loads(pair["rejected"]) == {"原因": "回答2更详细。", "更好的回答": 2}
    assert pair["prompt"] == build_messages(zh, P1.question, P1.answer_a, P1.answer_b)


def test_same_seed_same_pairs_and_seed_matters():
    rows = mixed_rows(seed=3)
    first = build_pairs(PAIRS, rows, EN, FilterConfig(seed=7))
    second = build_pairs(PAIRS, rows, EN, FilterConfig(seed=7))
    assert first.pairs == second.pairs and first.stats == second.stats
    picks = {
        json.dumps([(p["chosen_key"], p["rejected_key"]) for p in build_pairs(PAIRS, rows, EN, FilterConfig(seed=s)).pairs])
        for s in range(10)
    }
    assert len(picks) > 1  # the seed chooses among the candidates


# ---------------------------------------------------------------- statistics


def test_judgment_stats_by_hand():
    rows = (
        # p1 (A), order ab, true slot 1: pos, neg, unknown, pos; true hint followed, reversed hint followed
        repeats("p1", "ab", [verdict_json(1), verdict_json(2), TRUNCATED, fenced(1)])
        + hint_rows("p1", "ab", verdict_json(1, "As hinted, 1."), verdict_json(2, "As hinted, 2."))
        # p1, order ba, true slot 2: two positives; true hint (2) not followed, reversed (1) followed
        + repeats("p1", "ba", [verdict_json(2), verdict_json(2)])
        + hint_rows("p1", "ba", verdict_json(1), verdict_json(1))
        # p2 (B), order ab: nothing readable
        + repeats("p2", "ab", [NO_VERDICT, BAD_SLOT])
        # the tie is excluded
        + repeats("p3", "ab", [verdict_json(1)])
    )
    result = build_pairs(PAIRS, rows, EN, FilterConfig())
    stats = result.stats
    assert stats["pairs_in_data"] == 3
    assert stats["ties_excluded"] == 1
    assert stats["labelled_pairs"] == 2
    assert stats["judgments"] == 12
    assert stats["judgments_by_kind"] == {"hint_reverse": 2, "hint_true": 2, "repeat": 8}
    assert stats["status_by_kind"] == {
        "hint_reverse": {NEGATIVE: 2},
        "hint_true": {POSITIVE: 1, NEGATIVE: 1},
        "repeat": {POSITIVE: 4, NEGATIVE: 1, UNKNOWN: 3},
    }
    assert stats["unknown_rate"] == 0.25  # 3 of 12
    assert stats["base_agreement"] == 0.5  # 4 of 8 repeats
    assert stats["base_agreement_parsed"] == 0.8  # 4 of the 5 readable repeats
    assert stats["base_agreement_by_order"] == {"ab": round(2 / 6, 4), "ba": 1.0}
    assert stats["hint_follow_rate"] == {"hint_true": 0.5, "hint_reverse": 1.0}
    assert stats["examples"] == 3  # (p1, ab), (p1, ba), (p2, ab)
    assert stats["dpo_pairs"] == 3
    assert stats["dpo_pairs_by_kind"] == {"repeat": 1, "unknown": 1, "hint": 1}
    assert stats["examples_without_pair"] == 2  # (p1, ba) and (p2, ab)
    assert {(p["id"], p["order"]) for p in result.pairs} == {("p1", "ab")}
    # judgment_stats on its own gives the same numbers
    assert judgment_stats(PAIRS, result.labelled, result.pairs) == stats
    json.dumps(stats)  # the stats file is JSON


def test_judgment_stats_empty():
    stats = judgment_stats(PAIRS, [], [])
    assert stats["judgments"] == 0 and stats["dpo_pairs"] == 0
    assert stats["unknown_rate"] is None and stats["base_agreement"] is None
    assert stats["hint_follow_rate"] == {} and stats["examples_without_pair"] == 0
    assert stats["dpo_pairs_by_kind"] == {"repeat": 0, "unknown": 0, "hint": 0}


def test_a_verdict_recovered_from_broken_text_is_never_a_chosen_target():
    # Real output of a half-trained judge after a hint: the verdict reads, the "rationale" is debris.
    broken = '{"rationale":ider is correct.", "Answer 2 is wrong.", "better_answer": 1}'
    assert read_judgment(broken, EN).slot == 1 and read_judgment(broken, EN).method not in ("json", "embedded_json")
    rows = repeats("p1", "ab", [broken, verdict_json(2)]) + [
        row("p1", "ab", "hint_true", 0, broken),
        row("p1", "ab", "hint_reverse", 0, verdict_json(2, "As hinted, answer 2.")),
    ]
    strict = build_pairs(PAIRS, rows, EN, FilterConfig())
    assert strict.pairs == []  # both positives are broken: no demonstration to learn from
    assert strict.stats["base_agreement"] == 0.5  # but they still count as agreeing with the label
    loose = build_pairs(PAIRS, rows, EN, FilterConfig(well_formed_chosen=False))
    assert {p["kind"] for p in loose.pairs} == {"repeat", "hint"}
    # a fenced or embedded JSON object is well formed
    ok = build_pairs(PAIRS, repeats("p1", "ab", [fenced(1), verdict_json(2)]), EN, FilterConfig())
    assert len(ok.pairs) == 1


# ---------------------------------------------------------------- one pair per distinct texts


def test_verdict_only_gives_one_pair_per_example_not_one_per_sample():
    # p1 in order ab: two right and two wrong repeats and a hint couple. With rationales
    # these are three different pairs; verdict-only they are the same texts three times.
    rows = (repeats("p1", "ab", [verdict_json(1, "It is Canberra."), verdict_json(2, "Sydney is bigger."),
                                 verdict_json(1, "Canberra, yes."), verdict_json(2, "Sydney.")])
            + hint_rows("p1", "ab", verdict_json(1, "Canberra is right."), verdict_json(2, "Sydney is right.")))
    with_rationale = build_pairs(PAIRS, rows, EN, FilterConfig(max_pairs=2))
    assert [p["kind"] for p in with_rationale.pairs] == ["repeat", "repeat", "hint"]
    verdict_only = build_pairs(PAIRS, rows, EN, FilterConfig(max_pairs=2, rationale=False))
    (pair,) = verdict_only.pairs
    assert (pair["chosen"], pair["rejected"]) == ('{"better_answer": 1}', '{"better_answer": 2}')
    assert verdict_only.stats["dpo_pairs"] == 1 and verdict_only.stats["examples_without_pair"] == 0


def test_repeats_that_read_the_same_give_one_pair():
    same = [verdict_json(1, "Canberra."), verdict_json(1, "Canberra."), verdict_json(2, "Sydney."),
            verdict_json(2, "Sydney.")]
    result = build_pairs(PAIRS, repeats("p1", "ab", same), EN, FilterConfig(max_pairs=3))
    assert len(result.pairs) == 1


def test_the_same_texts_in_the_two_orders_are_two_pairs():
    rows = hint_rows("p1", "ab", verdict_json(1, "A."), verdict_json(2, "B.")) + hint_rows(
        "p1", "ba", verdict_json(2, "A."), verdict_json(1, "B."))
    result = build_pairs(PAIRS, rows, EN, FilterConfig(rationale=False))
    assert sorted(p["order"] for p in result.pairs) == ["ab", "ba"]
