"""conj_lite.relevance: relevance pairs built from real preference data (the shipped
HH-RLHF single-turn file), and the split that keeps held-out questions unseen."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conj_lite.config import load_recipe
from conj_lite.data import PreferencePair, load_pairs
from conj_lite.errors import InputError
from conj_lite.pipeline import ConjRun
from conj_lite.relevance import pair_chars, relevance_pairs, relevance_split

REPO = Path(__file__).resolve().parents[1]
HH_SINGLE = REPO / "data" / "hh_harmless_single_turn.jsonl.gz"


@pytest.fixture(scope="module")
def hh():
    return load_pairs(HH_SINGLE).pairs


def replies(pairs) -> dict[str, set[str]]:
    """Every reply written for each question (a question can occur in several conversations)."""
    out: dict[str, set[str]] = {}
    for p in pairs:
        out.setdefault(p.question, set()).update((p.answer_a, p.answer_b))
    return out


def test_the_shipped_file_is_single_turn_hh(hh):
    assert len(hh) == 661
    assert not any("Human:" in p.question or "Assistant:" in p.question for p in hh)


def test_each_pair_is_a_reply_to_its_question_against_a_reply_to_another(hh):
    own = replies(hh)
    out = relevance_pairs(hh, seed=3)
    assert len(out) == len(hh) and len({p.id for p in out}) == len(out)
    for pair in out:
        right, wrong = (pair.answer_a, pair.answer_b) if pair.label == "A" else (pair.answer_b, pair.answer_a)
        assert right in own[pair.question]
        assert pair.subset == "relevance"
        # the wrong answer was written for some other question (a generic reply may repeat across questions)
        assert any(wrong in answers for question, answers in own.items() if question != pair.question)


def test_slots_are_balanced_and_the_build_is_seeded(hh):
    out = relevance_pairs(hh, seed=0)
    labels = Counter(p.label for p in out)
    assert abs(labels["A"] - labels["B"]) < 0.1 * len(out)
    assert out == relevance_pairs(hh, seed=0)
    assert out != relevance_pairs(hh, seed=1)


def test_several_pairs_per_question_take_other_wrong_answers(hh):
    out = relevance_pairs(hh[:50], seed=0, per_question=3)
    assert len(out) == 150
    by_question = Counter(p.question for p in out)
    assert set(by_question.values()) == {3}
    wrong = {p.id: p.answer_b if p.label == "A" else p.answer_a for p in out}
    distinct = sum(len({wrong[f"{p.id}~rel{k}"] for k in range(3)}) > 1 for p in hh[:50])
    assert distinct > 40


def test_held_out_questions_and_their_replies_never_reach_training(hh):
    train, held = relevance_split(hh, 100, seed=0, per_question=2, max_chars=600)
    assert len(held) == 100
    held_questions = {p.question for p in held}
    held_texts = {t for p in held for t in (p.answer_a, p.answer_b)}
    train_questions = {p.question for p in train}
    assert not held_questions & train_questions
    # every held-out pair is built from held-out sources only
    source_replies = {t for q, answers in replies(hh).items() if q in held_questions for t in answers}
    assert held_texts <= source_replies
    assert all(pair_chars(p) <= 600 for p in hh if p.question in train_questions | held_questions)


def test_a_question_asked_twice_is_used_once(hh):
    counts = Counter(p.question for p in hh)
    assert max(counts.values()) > 1  # HH asks some questions in several conversations
    train, held = relevance_split(hh, 100, seed=0)
    assert len(train) + len(held) == len(counts) - sum(
        1 for q in counts if all(not p.answer_a.strip() or not p.answer_b.strip() for p in hh if p.question == q))


def test_empty_replies_are_never_right_answers(hh):
    assert any(not p.answer_a.strip() or not p.answer_b.strip() for p in hh)  # the file has some
    train, held = relevance_split(hh, 50, seed=0)
    assert all(p.answer_a.strip() and p.answer_b.strip() for p in train + held)


def test_too_little_data_is_a_clear_error():
    one = [PreferencePair("x", "q", "a", "b", "A")]
    with pytest.raises(InputError, match="at least 2"):
        relevance_pairs(one)
    two = [one[0], PreferencePair("y", "another q", "c", "d", "B")]
    with pytest.raises(InputError, match="at most 5 characters"):
        relevance_split(two, 0, max_chars=5)
    with pytest.raises(InputError, match="only 1 distinct questions"):
        relevance_split(one * 3, 0)  # the same question three times
    with pytest.raises(InputError, match="pairs_per_question"):
        relevance_pairs(one * 2, per_question=0)


def test_a_run_on_the_relevance_task_holds_out_whole_questions(tmp_path):
    run = ConjRun.from_recipe("tiny-cpu", tmp_path, [f"data.path={HH_SINGLE}", "data.task=relevance",
                                                     "data.heldout=40", "data.max_chars=500"])
    pairs, held = run.data().pairs, run.heldout()
    assert len(held) == 40 and all(p.subset == "relevance" for p in pairs + held)
    assert not {p.question for p in pairs} & {p.question for p in held}


def test_the_task_name_is_checked():
    with pytest.raises(InputError, match="data.task"):
        load_recipe(None, ["data.task=relevancy"])
