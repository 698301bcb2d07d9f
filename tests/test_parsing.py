"""parse_verdict on what small judge models really write, plus round-trip, length and
never-raise properties (seeded loops; hypothesis is not a dependency)."""

from __future__ import annotations

import json
import random
import string
import time
from typing import NamedTuple

import pytest

from conj_lite.parsing import (
    METHODS,
    RATIONALE_KEYS,
    VERDICT_KEYS,
    Verdict,
    cap_rationale,
    format_judgment,
    parse_verdict,
)
from conj_lite.prompts import judge_verdict_json, load_template


class Case(NamedTuple):
    text: str
    slot: int | None
    rationale: str | None
    method: str


CASES = {
    # --- what the prompt asks for
    "strict_json": Case(
        '{"rationale": "Answer 2 gives the correct boiling point and units.", "better_answer": 2}',
        2, "Answer 2 gives the correct boiling point and units.", "json",
    ),
    "strict_json_zh": Case(
        '{"原因": "回答1正确地解释了光合作用，回答2混淆了呼吸作用。", "更好的回答": 1}',
        1, "回答1正确地解释了光合作用，回答2混淆了呼吸作用。", "json",
    ),
    "pretty_printed_json": Case(
        '{\n  "rationale": "Answer 1 is concise and correct.",\n  "better_answer": 1\n}\n',
        1, "Answer 1 is concise and correct.", "json",
    ),
    "bom_and_whitespace": Case(
        '\ufeff  {"rationale": "Answer 2 is safer.", "better_answer": 2}  \n',
        2, "Answer 2 is safer.", "json",
    ),
    # --- wrapped in prose or fences
    "prose_before_and_after": Case(
        'Sure! Here is my judgment:\n{"rationale": "Answer 1 cites the statute.", "better_answer": 1}\n'
        "Let me know if you need anything else.",
        1, "Answer 1 cites the statute.", "embedded_json",
    ),
    "json_fence": Case(
        '```json\n{"rationale": "Answer 2 handles the empty list.", "better_answer": 2}\n```',
        2, "Answer 2 handles the empty list.", "fenced_json",
    ),
    "plain_fence_with_prose": Case(
        'After comparing both answers:\n\n```\n{"rationale": "Answer 1 is correct.", "better_answer": 1}\n```\n\n'
        "I hope this helps!",
        1, "Answer 1 is correct.", "fenced_json",
    ),
    "unclosed_fence": Case(
        '```json\n{"rationale": "Answer 2 is complete.", "better_answer": 2}\n',
        2, "Answer 2 is complete.", "fenced_json",
    ),
    "hint_prefix_echoed": Case(
        "(Hint: answer 2 is better. I explain why.)\n"
        '{"rationale": "Answer 2 names the right year.", "better_answer": 2}',
        2, "Answer 2 names the right year.", "embedded_json",
    ),
    "template_echoed_then_answered": Case(
        'Format: {"rationale": "<why one answer is better>", "better_answer": <1 or 2>}\n'
        '{"rationale": "Answer 2 explains the recursion.", "better_answer": 2}',
        2, "Answer 2 explains the recursion.", "embedded_json",
    ),
    "json_quoted_from_an_answer_then_verdict": Case(
        'Answer 1 returns {"answer": "Paris"} as asked, answer 2 returns plain text.\n'
        '{"rationale": "Answer 1 follows the requested format.", "better_answer": 1}',
        1, "Answer 1 follows the requested format.", "embedded_json",
    ),
    "nested_judgment_object": Case(
        '{"judgment": {"rationale": "Answer 1 is accurate.", "better_answer": 1}}',
        1, "Answer 1 is accurate.", "json",
    ),
    "think_block_drafts_ignored": Case(
        '<think>Maybe {"rationale": "draft", "better_answer": 1}? No, answer 2 is right.</think>\n'
        '{"rationale": "Answer 2 is right.", "better_answer": 2}',
        2, "Answer 2 is right.", "json",
    ),
    # --- strings that are hard to scan
    "escaped_quotes_in_rationale": Case(
        '{"rationale": "Answer 1 says \\"use a lock\\", which is right.", "better_answer": 1}',
        1, 'Answer 1 says "use a lock", which is right.', "json",
    ),
    "escaped_newlines_in_rationale": Case(
        '{"rationale": "First, answer 2 is correct.\\nSecond, it is shorter.", "better_answer": 2}',
        2, "First, answer 2 is correct.\nSecond, it is shorter.", "json",
    ),
    "raw_newline_in_rationale": Case(
        '{"rationale": "Line one.\nLine two.", "better_answer": 1}',
        1, "Line one.\nLine two.", "json",
    ),
    "braces_in_rationale_in_prose": Case(
        'My judgment: {"rationale": "Answer 2 writes {key: value} right; answer 1 drops the }.", '
        '"better_answer": 2} Done.',
        2, "Answer 2 writes {key: value} right; answer 1 drops the }.", "embedded_json",
    ),
    "unescaped_inner_quotes": Case(
        '{"rationale": "Answer 1 calls it "O(n)", which is wrong.", "better_answer": 2}',
        2, 'Answer 1 calls it "O(n)", which is wrong.', "key_value",
    ),
    # --- broken JSON
    "trailing_comma": Case(
        '{"rationale": "Answer 2 is safer.", "better_answer": 2,}',
        2, "Answer 2 is safer.", "embedded_json",
    ),
    "python_dict_single_quotes": Case(
        "{'rationale': 'Answer 1 is right, it\\'s shorter.', 'better_answer': 1}",
        1, "Answer 1 is right, it's shorter.", "embedded_json",
    ),
    "single_quotes_with_json_true": Case(
        "{'rationale': 'Answer 2 is complete.', 'better_answer': 2, 'confident': true}",
        2, "Answer 2 is complete.", "key_value",
    ),
    "full_width_digit_bare": Case(
        '{"原因": "回答2更准确，也更完整。", "更好的回答": ２}',
        2, "回答2更准确，也更完整。", "key_value",
    ),
    "full_width_braces": Case(
        '｛"rationale": "Answer 1 is right.", "better_answer": 1｝',
        1, "Answer 1 is right.", "key_value",
    ),
    "chinese_punctuation_keys": Case(
        "{“原因”：“回答1更简洁，没有错误。”，“更好的回答”：1}",
        1, "回答1更简洁，没有错误。", "key_value",
    ),
    # --- cut off at max_new_tokens
    "truncated_before_closing_brace": Case(
        '{"rationale": "Answer 1 is concise.", "better_answer": 1',
        1, "Answer 1 is concise.", "key_value",
    ),
    "truncated_inside_rationale_after_verdict": Case(
        '{"better_answer": 2, "rationale": "Answer 2 handles the empty list, while Answer 1',
        2, "Answer 2 handles the empty list, while Answer 1", "key_value",
    ),
    "truncated_zh": Case(
        '```json\n{"更好的回答": 1, "原因": "回答1给出了正确的公式，\\n并且',
        1, "回答1给出了正确的公式，\n并且", "key_value",
    ),
    "truncated_before_verdict": Case(
        '{"rationale": "Answer 2 is more detailed and', None, None, "none",
    ),
    "truncated_key_inside_rationale_is_not_the_verdict": Case(
        '{"rationale": "The better answer: 1 would hold if it had units, but it', None, None, "none",
    ),
    # --- key and value variants
    "key_variants_spaces_case": Case(
        '{"Reason": "Answer 1 is right.", "Better Answer": "Answer 1"}', 1, "Answer 1 is right.", "json",
    ),
    "winner_letter": Case('{"reasoning": "B is more polite.", "winner": "B"}', 2, "B is more polite.", "json"),
    "verdict_marker_value": Case(
        '{"explanation": "A covers both cases.", "verdict": "[[A]]"}', 1, "A covers both cases.", "json",
    ),
    "preferred_float": Case('{"justification": "Fewer errors.", "preferred": 2.0}', 2, "Fewer errors.", "json"),
    "hyphenated_key": Case('{"rationale": "Shorter.", "better-answer": "answer 1"}', 1, "Shorter.", "json"),
    "zh_variant_keys": Case('{"理由": "回答2更全面。", "更好的答案": "回答2"}', 2, "回答2更全面。", "json"),
    "zh_ordinal_value": Case(
        '{"分析": "第一个回答有误。", "更优回答": "第二个回答"}', 2, "第一个回答有误。", "json",
    ),
    "full_width_string_value": Case('{"rationale": "Correct units.", "better_answer": "２"}', 2, "Correct units.", "json"),
    "list_of_reasons": Case(
        '{"rationale": ["Answer 2 is correct.", "It is shorter."], "better_answer": 2}',
        2, "Answer 2 is correct.\nIt is shorter.", "json",
    ),
    "verdict_key_wins_over_generic_answer": Case(
        '{"answer": "Paris", "rationale": "Answer 1 names Paris.", "better_answer": 1}', 1, "Answer 1 names Paris.", "json",
    ),
    # --- loose text
    "loose_markdown_lines": Case(
        "**Better answer:** Answer 2\n**Reason:** Answer 2 includes the units.",
        2, "Answer 2 includes the units.", "key_value",
    ),
    "loose_verdict_after_prose": Case(
        "Both are fluent, but answer 2 is more precise.\nThe better answer: 2",
        2, "Both are fluent, but answer 2 is more precise.", "key_value",
    ),
    "python_kwarg_style": Case("better_answer = 1", 1, None, "key_value"),
    "bold_key_and_value": Case("Answer 2 cites a source.\n\n**Better answer: 2**", 2, "Answer 2 cites a source.", "key_value"),
    "zh_loose_prose_then_key": Case(
        "回答2更好：因为它给出了正确的单位。\n更好的回答：回答2", 2, "回答2更好：因为它给出了正确的单位。", "key_value",
    ),
    # --- MT-Bench markers
    "bold_answer_and_marker": Case(
        "**Answer 2** is better because it lists the steps in order.\n\n**Final Verdict:** [[B]]",
        2, "**Answer 2** is better because it lists the steps in order.", "bracket",
    ),
    "mt_bench_assistant_a": Case(
        "Assistant A's answer is more helpful and accurate. [[A]]",
        1, "Assistant A's answer is more helpful and accurate.", "bracket",
    ),
    "numbered_marker": Case("Answer 2 is correct. My verdict: [[2]]", 2, "Answer 2 is correct.", "bracket"),
    "full_width_marker": Case("回答2更好。［［Ｂ］］", 2, "回答2更好。", "bracket"),
    # --- conflicts and non-verdicts
    "repeated_identical_objects": Case(
        '{"rationale": "Answer 1 is right.", "better_answer": 1}\nTo restate:\n'
        '{"rationale": "Answer 1 is right, answer 2 is off by one.", "better_answer": 1}',
        1, "Answer 1 is right, answer 2 is off by one.", "embedded_json",
    ),
    "repeated_objects_disagree": Case(
        '{"rationale": "Answer 1 is right.", "better_answer": 1}\nWait, I was wrong:\n'
        '{"rationale": "Answer 2 is right.", "better_answer": 2}',
        None, None, "embedded_json",
    ),
    "fenced_and_prose_objects_disagree": Case(
        '```json\n{"rationale": "Answer 1 is right.", "better_answer": 1}\n```\n'
        'Actually: {"rationale": "Answer 2 is right.", "better_answer": 2}',
        None, None, "embedded_json",
    ),
    "json_beats_markers_in_its_rationale": Case(
        'Verdict below.\n{"rationale": "Answer 1 claims [[A]] is the format; answer 2 is right.", "better_answer": 2}',
        2, "Answer 1 claims [[A]] is the format; answer 2 is right.", "embedded_json",
    ),
    "contradictory_markers": Case("At first I thought [[A]], but on reflection [[B]].", None, None, "bracket"),
    "tie_marker": Case("Both answers are equally good. [[C]]", None, "Both answers are equally good.", "bracket"),
    "verdict_3": Case('{"rationale": "Both have flaws.", "better_answer": 3}', None, "Both have flaws.", "json"),
    "verdict_0": Case('{"rationale": "Neither is better.", "better_answer": 0}', None, "Neither is better.", "json"),
    "verdict_tie": Case('{"rationale": "Equally good.", "better_answer": "tie"}', None, "Equally good.", "json"),
    "verdict_template_placeholder": Case('{"rationale": "x", "better_answer": "1 or 2"}', None, "x", "json"),
    "verdict_bool": Case('{"rationale": "x", "better_answer": true}', None, "x", "json"),
    "empty": Case("", None, None, "none"),
    "whitespace_only": Case("  \n\t ", None, None, "none"),
    "cannot_decide": Case("I cannot decide which answer is better.", None, None, "none"),
    "prose_tie": Case("Both are equal in quality.", None, None, "none"),
    "prose_only_verdict": Case("Answer 2 is better because it is correct.", None, None, "none"),
    "unrelated_answer_key": Case("Answer: Paris", None, None, "none"),
    "json_without_verdict_key": Case('{"rationale": "Answer 2 is right."}', None, None, "none"),
    "bare_number": Case("2", None, None, "none"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_parse_verdict_on_messy_output(case: Case) -> None:
    verdict = parse_verdict(case.text)
    assert (verdict.slot, verdict.rationale, verdict.method) == (case.slot, case.rationale, case.method)
    assert verdict.ok == (case.slot is not None)


def test_enough_realistic_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    ("value", "slot"),
    [
        (1, 1), (2, 2), ("1", 1), ("2", 2), ("Answer 1", 1), ("answer 2", 2), ("Answer_2", 2),
        ("回答1", 1), ("回答2", 2), ("A", 1), ("b", 2), ("[[A]]", 1), ("[[B]]", 2), ("１", 1), ("２", 2),
        (1.0, 1), (2.0, 2), ("2.0", 2), ("**Answer 2**", 2), ("Assistant B", 2),
        (3, None), (0, None), (-1, None), ("-1", None), (1.5, None), ("12", None), ("both", None),
        ("", None), (None, None), (False, None), ([2], None), ("2 is better", None),
    ],
)
def test_verdict_values(value: object, slot: int | None) -> None:
    text = json.dumps({"rationale": "r", "better_answer": value}, ensure_ascii=False)
    assert parse_verdict(text).slot == slot


def test_custom_keys() -> None:
    verdict = parse_verdict('{"why": "shorter", "pick": 2}', rationale_keys=("why",), verdict_keys="pick")
    assert (verdict.slot, verdict.rationale) == (2, "shorter")
    assert parse_verdict('{"why": "shorter", "pick": 2}').slot is None


def test_rejects_non_strings() -> None:
    with pytest.raises(TypeError):
        parse_verdict(None)  # type: ignore[arg-type]


def test_verdict_ok() -> None:
    assert Verdict(1, None, "json").ok and Verdict(2, "r", "bracket").ok
    assert not Verdict(None, "r", "json").ok


# ---------------------------------------------------------------- format_judgment


@pytest.mark.parametrize("name", ["en", "en-brief", "zh"])
def test_format_judgment_matches_the_template(name: str) -> None:
    template = load_template(name)
    rationale = "回答2更准确 — \"quoted\" {braces}"
    text = format_judgment(rationale, 2, rationale_key=template.rationale_key, verdict_key=template.verdict_key)
    assert text == judge_verdict_json(template, rationale, 2)
    assert "\n" not in text and rationale.split()[0] in text  # one line, non-ASCII kept
    assert parse_verdict(text) == Verdict(2, rationale, "json")


@pytest.mark.parametrize("slot", [0, 3, True, 1.0, "2", None])
def test_format_judgment_rejects_bad_slots(slot: object) -> None:
    with pytest.raises(ValueError):
        format_judgment("r", slot)  # type: ignore[arg-type]


def _random_rationale(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + " .,;:!?'\"{}[]\\/\n\t`*#" + "回答更好原因，。：“”é—🙂２Ｂ"
    pieces = [rng.choice(alphabet) for _ in range(rng.randint(1, 80))]
    pieces += rng.sample(['"better_answer": 1', "[[A]]", "{'x': 2}", "```", "\\n", "answer: 2", "}"], 2)
    rng.shuffle(pieces)
    return "".join(pieces)


def test_format_then_parse_round_trips() -> None:
    rng = random.Random(20240611)
    for _ in range(500):
        rationale, slot = _random_rationale(rng), rng.choice((1, 2))
        keys = rng.choice((("rationale", "better_answer"), ("原因", "更好的回答"), ("reason", "winner")))
        text = format_judgment(rationale, slot, rationale_key=keys[0], verdict_key=keys[1])
        expected = rationale.strip() or None
        assert parse_verdict(text) == Verdict(slot, expected, "json"), text
        wrapped = parse_verdict(f"Here is my judgment:\n```json\n{text}\n```\nThanks!")
        assert (wrapped.slot, wrapped.rationale) == (slot, expected), text


# ---------------------------------------------------------------- cap_rationale


def test_cap_rationale_keeps_short_text() -> None:
    assert cap_rationale("Short.", 100) == "Short."
    assert cap_rationale("", 0) == ""


def test_cap_rationale_cuts_at_a_sentence() -> None:
    text = "Answer 2 is correct. It also explains why. Answer 1 forgets the units entirely."
    assert cap_rationale(text, 50) == "Answer 2 is correct. It also explains why."


def test_cap_rationale_cuts_at_a_word_when_no_sentence_fits() -> None:
    text = "Answer 2 is correct because it keeps the units consistent throughout the derivation"
    capped = cap_rationale(text, 40)
    assert capped == "Answer 2 is correct because it keeps the"
    assert not cap_rationale("Pi is 3.14159 and answer 2 uses it well", 15).endswith("3.")


def test_cap_rationale_hard_cuts_unbroken_text() -> None:
    assert cap_rationale("回答2更准确" * 20, 7) == "回答2更准确回"
    assert cap_rationale("回答2更准确。回答1有误。" * 5, 16) == "回答2更准确。回答1有误。"


def test_cap_rationale_rejects_negative() -> None:
    with pytest.raises(ValueError):
        cap_rationale("text", -1)


def test_cap_rationale_length_bound() -> None:
    rng = random.Random(7)
    for _ in range(1000):
        text = _random_rationale(rng) * rng.randint(1, 4)
        limit = rng.randint(0, 200)
        capped = cap_rationale(text, limit)
        assert len(capped) <= limit
        assert text.startswith(capped)
        if len(text) <= limit:
            assert capped == text


# ---------------------------------------------------------------- never raise

_FRAGMENTS = [
    "{", "}", "[", "]", '"', "'", "\\", ":", "：", ",", "，", "```", "```json\n", "\n", " ", "[[", "]]",
    '"better_answer"', "'rationale'", "更好的回答", "原因", "verdict", "answer", "1", "2", "２", "Ｂ", "A", "B",
    "tie", "true", "null", "1.0", "<think>", "</think>", "\ufeff", "“", "”", "=", "**", "回答", "\x00", "é",
]


def _garbage(rng: random.Random) -> str:
    if rng.random() < 0.5:
        alphabet = string.printable + "回答更好原因：，“”「」｛｝［］２Ｂé\u200b\ufeff🙂\x00\ud7ff"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
    return "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(0, 80)))


def test_never_raises_on_garbage() -> None:
    rng = random.Random(12345)
    for _ in range(3000):
        text = _garbage(rng)
        verdict = parse_verdict(text)
        assert verdict.slot in (1, 2, None), text
        assert verdict.method in METHODS, text
        assert verdict.rationale is None or isinstance(verdict.rationale, str)


@pytest.mark.parametrize(
    "text",
    [
        "{" * 5000,
        "}" * 5000,
        "{" * 3000 + "}" * 3000,
        '{"a":' * 2000,
        "[" * 5000 + "]" * 5000,
        '"' * 5000,
        "[[" * 3000,
        '"better_answer": "' * 1500,
        '"rationale": "x", ' * 1500,
        "answer: " * 3000,
        '{"a": b, ' * 2500,
        "```json\n{" * 2000,
    ],
)
def test_degenerate_output_is_cheap(text: str) -> None:
    # Looping tiny models emit such text; quadratic scanning would stall a sampling run.
    started = time.perf_counter()
    assert parse_verdict(text).slot is None
    assert time.perf_counter() - started < 2.0


def test_default_keys_are_exported() -> None:
    assert "better_answer" in VERDICT_KEYS and "更好的回答" in VERDICT_KEYS
    assert "rationale" in RATIONALE_KEYS and "原因" in RATIONALE_KEYS
