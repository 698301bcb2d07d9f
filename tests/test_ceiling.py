"""benchmarks/ceiling.py: the supervised ceiling's training pairs per step and its HH split."""

import ceiling
import learning_curve
import pytest


def test_steps_walk_the_seeded_order_and_go_round_it_again():
    order = [3, 0, 4, 1, 2]
    steps = [ceiling.step_indices(order, step, 2) for step in range(1, 6)]
    assert steps == [[3, 0], [4, 1], [2, 3], [0, 4], [1, 2]]
    # every pair is visited once per pass over the data, whatever the step size
    assert sorted(i for s in steps[:5] for i in s) == sorted(order * 2)


def test_the_hh_ceiling_is_judged_on_the_learning_curves_held_out_pairs():
    if not ceiling.hh_split.__globals__["HH"].is_file():
        pytest.skip("../shared/data/hh-rlhf is not next to the repo")
    train, test = ceiling.task_pairs("hh", 100, 600, seed=0)
    curve_train, sets = learning_curve.task_data("hh", 100, 600, pool=len(train), seed=0)
    assert [p.id for p in test] == [p.id for p in sets["hh"]]
    assert not {p.id for p in train} & {p.id for p in test}
    assert {p.id for p in curve_train} == {p.id for p in train}
    assert all(len(p.question) + len(p.answer_a) + len(p.answer_b) <= 600 for p in train + test)
