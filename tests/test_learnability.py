"""The learnability check: one Con-J round teaches the tiny judge the synthetic task.

The slow test runs the real pipeline (ConjRun: sample -> filter -> train) and
`evaluate` before and after (a few minutes on two CPU cores). Its thresholds
(synthetic.GAIN_MIN, synthetic.AFTER_MIN) sit between what Con-J reaches and what the
two ablations reach (chosen/rejected swapped, hint lost): see the "Learnability"
section of docs/benchmarks.md, written by benchmarks/learnability.py."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conj_lite import synthetic
from conj_lite.config import SamplingConfig
from conj_lite.prompts import true_slot
from conj_lite.sampling import plan_requests
from conj_lite.synthetic import (
    AFTER_MIN,
    GAIN_MIN,
    BaseJudgeSpec,
    hint_lost,
    learnability_check,
    right_and_wrong,
    split_pairs,
    swap_pairs_file,
    synthetic_pairs,
    warmup_examples,
)


def test_pairs_are_deterministic_balanced_and_decidable():
    pairs = synthetic_pairs(60, seed=3)
    assert pairs == synthetic_pairs(60, seed=3) and pairs != synthetic_pairs(60, seed=4)
    assert Counter(p.label for p in pairs) == {"A": 30, "B": 30}
    assert Counter(p.subset for p in pairs) == {"count": 20, "color": 20, "city": 20}
    for pair in pairs:
        question, right, wrong = right_and_wrong(pair)
        fact = question.removesuffix(" Is that true?")
        assert right.startswith("Yes, ") and wrong.startswith("No, ")
        assert right.removeprefix("Yes, ").lower() == fact.lower()  # the right answer restates the fact
    value = synthetic_pairs(10, wrong="value")
    for p in value:  # only the value differs
        a, b = p.answer_a.split(), p.answer_b.split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1


def test_held_out_questions_never_occur_in_training():
    train, test = split_pairs(160, 60)
    assert not {p.question for p in train} & {p.question for p in test}
    assert len({p.id for p in train + test}) == 220
    with pytest.raises(ValueError):
        synthetic_pairs(5, families=("weather",))


def test_warmup_teaches_hints_and_a_first_answer_bias():
    from conj_lite.prompts import hint_prefix

    template = synthetic.template()
    examples = warmup_examples(BaseJudgeSpec(items=40, steps=10, batch_size=8), template)
    plain = [json.loads(target)["better_answer"] for _, prefix, target in examples if not prefix]
    assert plain and set(plain) == {1}
    hinted = [(prefix, json.loads(target)["better_answer"]) for _, prefix, target in examples if prefix]
    assert hinted and all(prefix == hint_prefix(template, k) for prefix, k in hinted)
    assert {k for _, k in hinted} == {1, 2}


def test_hint_lost_removes_the_hint_from_sampling_only_inside():
    pairs = synthetic_pairs(2)
    cfg = SamplingConfig(n_repeats=1, hint_samples=1)
    template = synthetic.template()
    with hint_lost():
        assert all(r.prefix == "" for r in plan_requests(pairs, template, cfg))
    hinted = [r for r in plan_requests(pairs, template, cfg) if r.kind != "repeat"]
    assert hinted and all(r.prefix.startswith("(Hint: answer") for r in hinted)
    for r in hinted:
        pair = next(p for p in pairs if p.id == r.pair_id)
        right = true_slot(pair.label, r.order)
        assert r.hint_slot == (right if r.kind == "hint_true" else 3 - right)


def test_swap_pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}) + "\n")
    assert swap_pairs_file(path) == 1
    assert json.loads(path.read_text()) == {"prompt": "p", "chosen": "bad", "rejected": "good"}


@pytest.mark.slow
def test_one_conj_round_teaches_the_synthetic_task(tmp_path, tiny_model_dir):
    result = learnability_check(tmp_path, variant="conj", bootstrap=200)
    before, after = result["before"], result["after"]
    # The base judge is at chance: it picks answer 1 whatever the answers say.
    assert before["accuracy"] == pytest.approx(0.5, abs=0.05) and before["position_bias"] > 0.9
    # Its repeated samples agree, so the contrastive pairs come from the hints.
    stats = result["stats"]
    assert stats["hint_follow_rate"]["hint_true"] > 0.9 and stats["hint_follow_rate"]["hint_reverse"] > 0.9
    assert stats["dpo_pairs_by_kind"]["hint"] > 0.8 * stats["dpo_pairs"]
    # One round later it judges the held-out pairs by their content.
    assert result["gain"] >= GAIN_MIN, result["after"]
    assert after["accuracy"] >= AFTER_MIN and after["consistency"] > before["consistency"]
    assert (tmp_path / "learnability.json").is_file() and (tmp_path / "run" / "adapter").is_dir()
