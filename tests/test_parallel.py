"""Parallel judging in llama.cpp (GGUFBackend.generate_many / next_logits_many,
Judge.compare_many): several sequences in one batch give the judgments of one at a time."""

from __future__ import annotations

import pytest

from conj_lite.data import load_pairs
from conj_lite.judging import Judge, judge_pairs
from conj_lite.judging.backends import Segment, cells_needed, prefix_cells, prefix_levels, shared_prefix, waves
from conj_lite.prompts import ORDERS, ordered_answers


def test_shared_prefix_leaves_every_sequence_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2], [1, 2, 3]]) == 1
    assert shared_prefix([[7, 8]]) == 0
    assert shared_prefix([[1], [1]]) == 0
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5]], start=1) == 2  # what is known shared is not compared again


def covered(levels, n):
    """Each sequence's segments, in level order: (start, end) pairs."""
    out = [[] for _ in range(n)]
    for level in levels:
        for seg in level:
            for i in seg.members:
                out[i].append((seg.start, seg.end))
    return out


def test_the_prefix_tree_evaluates_each_shared_token_once_and_covers_every_sequence():
    system, question = [1, 2, 3], [4, 5]
    order_ab, order_ba = system + question + [6, 7, 8], system + question + [8, 7, 6]
    hint = [9, 9]
    # a Con-J example: per order, the plain prompt twice (its repeats) and two hinted prompts
    seqs = [order_ab, order_ab, order_ab + hint + [1], order_ab + hint + [2],
            order_ba, order_ba, order_ba + hint + [1], order_ba + hint + [2]]
    levels = prefix_levels(seqs)
    assert levels[0] == [Segment(tuple(range(8)), 0, 5)]  # instructions and question, once
    assert levels[1] == [Segment((0, 1, 2, 3), 5, 7), Segment((4, 5, 6, 7), 5, 7)]  # each order's answers
    for spans, ids in zip(covered(levels, len(seqs)), seqs):
        # a sequence's segments follow one another from 0 to its end: all its positions, once each
        assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] and spans[-1][1] == len(ids)
    for level in levels:
        for seg in level:  # the members of a segment hold the same tokens there
            assert len({tuple(seqs[i][seg.start:seg.end]) for i in seg.members}) == 1
            if len(seg.members) == 1:  # a sequence's last segment is its own, for its logits
                assert seg.end == len(seqs[seg.members[0]])
    # per order: its answers but their last token once (2); each repeat that last token (1 + 1); the
    # hinted prompts that token and the hint (3), then each its own last token (1 + 1)
    assert prefix_cells(seqs) == 5 + 2 * (2 + 1 + 1 + 3 + 1 + 1)
    # without the tree: instructions once, then each sequence's own tail (what prefill did before)
    assert prefix_cells(seqs) < 5 + sum(len(ids) - 5 for ids in seqs)


def test_the_prefix_tree_of_one_or_unrelated_sequences():
    assert prefix_levels([]) == []
    assert prefix_levels([[5, 6, 7]]) == [[Segment((0,), 0, 3)]]
    assert prefix_levels([[1, 2], [3, 4]]) == [[Segment((0,), 0, 2), Segment((1,), 0, 2)]]
    assert prefix_cells([[1], [1], [1]]) == 3  # identical one-token prompts: each its own logits
    assert prefix_cells([[1, 2], [1, 2, 3]]) == 1 + 1 + 2


def test_waves_pack_groups_by_sequences_and_cells():
    # each group: two orders that share 9 of their 10 tokens (11 cells), nothing shared across groups
    groups = [[[g] * 10, [g] * 9 + [99]] for g in range(5)]
    assert waves(groups, n_seq=4, cells=1000) == [[0, 1], [2, 3], [4]]
    assert waves(groups, n_seq=8, cells=45) == [[0, 1, 2, 3], [4]]
    assert waves(groups, n_seq=8, cells=43) == [[0, 1, 2], [3, 4]]
    assert waves(groups, n_seq=8, cells=45, extra=5) == [[0, 1], [2, 3], [4]]  # 21 cells a group
    assert waves(groups, n_seq=8, cells=5) == [[0], [1], [2], [3], [4]]  # a group too big goes alone
    assert waves([], n_seq=2, cells=10) == []


def test_waves_count_a_prefix_shared_across_groups_once():
    # the judge's case: instructions every prompt shares, then the pair's own text
    head = list(range(100, 150))
    groups = [[head + [g, 1], head + [g, 2]] for g in range(4)]
    one = cells_needed(groups[0])
    assert one == 50 + 1 + 2
    assert cells_needed([ids for group in groups for ids in group]) == 50 + 4 * 3
    assert waves(groups, n_seq=8, cells=62) == [[0, 1, 2, 3]]  # counted whole, 4 x 53 would not fit
    assert waves(groups, n_seq=8, cells=61) == [[0, 1, 2], [3]]


@pytest.fixture(scope="session")
def exported(tiny_model_dir, tmp_path_factory):
    from test_export import export_tiny

    return export_tiny(tiny_model_dir, tmp_path_factory.getbasetemp() / "tiny-export")


@pytest.fixture(scope="module")
def pairs(sample_data):
    return load_pairs(sample_data).pairs[:5]


def texts(result):
    record = result.to_record()
    return record["rationale_ab"], record["rationale_ba"]


def same(one, other, p_tol=5e-3):
    a, b = one.to_record(), other.to_record()
    for key in ("verdict", "verdict_ab", "verdict_ba", "rationale_ab", "rationale_ba", "tokens_ab", "tokens_ba",
                "finished_ab", "finished_ba", "mode"):
        assert a[key] == b[key], (key, a[key], b[key])
    assert [o.method for o in one.orders.values()] == [o.method for o in other.orders.values()]
    assert a["p_a"] == pytest.approx(b["p_a"], abs=p_tol)
    assert a["p1_ab"] == pytest.approx(b["p1_ab"], abs=p_tol) and a["p1_ba"] == pytest.approx(b["p1_ba"], abs=p_tol)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_parallel_judgments_are_the_one_at_a_time_judgments(exported, pairs, qtype):
    # n_parallel=2: five pairs make three waves, the last one half full.
    judge = Judge.from_gguf(exported.gguf_paths[qtype], n_threads=2, max_new_tokens=40, warn=None, n_parallel=2)
    judge.backend.parallel_verdict = True  # verdict mode too, not only rationale mode
    try:
        assert judge.parallel
        items = [(p.question, p.answer_a, p.answer_b) for p in pairs]
        parted = 0
        for mode in ("verdict", "rationale"):
            together = judge.compare_many(items, mode=mode)
            alone = [judge.compare(*item, mode=mode) for item in items]
            assert len(together) == len(alone) == len(items)
            for one, other in zip(together, alone):
                if mode == "rationale" and qtype != "q8_0" and texts(one) != texts(other):
                    # Batched and one-at-a-time decoding round differently in llama.cpp's
                    # k-quant kernels; on the random tiny model's near-flat logits a
                    # near-tie token can part a greedy text (docs: parallel judging).
                    parted += 1
                    continue
                same(one, other)
        assert parted <= 1, f"{parted} of {len(items)} rationale judgments differ from one at a time"
        # The two orders share a long prompt prefix, evaluated once.
        prompts = [judge.backend.tokenize(judge.prompt(items[0][0], *ordered_answers(*items[0][1:], o)))
                   for o in ORDERS]
        assert shared_prefix(prompts) > 20
    finally:
        judge.close()


@pytest.mark.slow
def test_a_judgment_cut_off_in_a_parallel_batch_is_closed_like_alone(exported, pairs):
    judge = Judge.from_gguf(exported.gguf_paths["q8_0"], n_threads=2, max_new_tokens=6, warn=None)
    try:
        items = [(p.question, p.answer_a, p.answer_b) for p in pairs[:3]]
        together = judge.compare_many(items, mode="rationale")
        # closed in the parallel sequences that hold their prompts: the main context never ran
        assert judge.backend.llm.n_tokens == 0
        for result, item in zip(together, items):
            same(result, judge.compare(*item, mode="rationale"))
            assert all(o.slot in (1, 2) for o in result.orders.values())
    finally:
        judge.close()


@pytest.mark.slow
def test_the_batch_loop_uses_parallel_judging(exported, pairs, tmp_path):
    judge = Judge.from_gguf(exported.gguf_paths["q8_0"], n_threads=2, warn=None, parallel_verdict=True)
    try:
        calls = []
        many = judge.backend.next_logits_many
        judge.backend.next_logits_many = lambda groups: calls.append(len(groups)) or many(groups)
        records = judge_pairs(judge, pairs, "verdict", records_path=tmp_path / "out.jsonl")
        assert calls and max(calls) > 1, "several pairs went through one parallel prefill"
        judge.backend.n_parallel = 1  # one pair at a time
        assert not judge.parallel
        calls.clear()
        alone = judge_pairs(judge, pairs, "verdict")
        assert [r["verdict"] for r in records] == [r["verdict"] for r in alone]
        assert [r["p_a"] for r in records] == pytest.approx([r["p_a"] for r in alone], abs=5e-3)
    finally:
        judge.close()
