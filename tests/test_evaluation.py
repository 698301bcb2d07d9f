"""conj_lite.evaluation: every metric on hand-computed outcomes, each tie policy, the
bootstrap, the report files, the CLI, and an end-to-end eval of the tiny judge on
LLMBar Natural (HF and GGUF backends)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conj_lite.data import PreferencePair
from conj_lite.errors import InputError
from conj_lite.judging.evaluation import (
    METRIC_ORDER,
    PairOutcome,
    bootstrap_cis,
    build_report,
    compute_metrics,
    confusion,
    default_name,
    evaluate,
    open_judge,
    split_for_calibration,
    split_name,
    write_report,
)
from conj_lite.cli.options import parse_fields
from conj_lite.judging import JudgeResult, OrderJudgment

# Six hand-made outcomes (winner in order ab, winner in order ba, P(A better)):
OUTCOMES = [
    PairOutcome("p1", "A", "A", "A", 0.9, "math"),  # consistent, right
    PairOutcome("p2", "A", "A", "B", 0.6, "math"),  # picks answer 1 both times: inconsistent
    PairOutcome("p3", "B", "A", "A", 0.3, "code"),  # consistent, wrong (but p_a says B)
    PairOutcome("p4", "B", None, "B", 0.2, "code"),  # order ab unreadable
    PairOutcome("p5", "tie", "A", "B", 0.5, "chat"),  # inconsistent on a tie
    PairOutcome("p6", "tie", "B", None, None, "chat"),  # one verdict unreadable, no probability
]


def test_metrics_drop_ties_hand_computed():
    m = compute_metrics(OUTCOMES, "drop")
    # counted pairs p1..p4; per order right: ab p1 p2, ba p1 p4
    assert m["accuracy"] == 0.5 and m["accuracy_ab"] == 0.5 and m["accuracy_ba"] == 0.5
    assert m["accuracy_pair"] == 0.25  # only p1 agrees both ways and is right
    assert m["consistency"] == pytest.approx(2 / 6)  # p1, p3 (over every pair)
    # answer-1 picks: p1 1, p2 2, p3 1, p4 1, p5 2, p6 0 = 7 of 10 readable verdicts
    assert m["position_bias"] == pytest.approx(0.7)
    assert m["unparseable_rate"] == pytest.approx(2 / 12)
    assert m["accuracy_consistent"] == 0.5  # p1 right, p3 wrong
    assert m["accuracy_prob"] == 1.0  # 0.9 A, 0.6 A, 0.3 B, 0.2 B
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.09 + 0.04) / 4)
    assert m["ece"] == pytest.approx((0.1 + 0.4 + 0.3 + 0.2) / 4)  # one pair per bin, all right
    assert (m["n"], m["n_ties"], m["n_counted"], m["n_with_p"]) == (6, 2, 4, 4)


def test_metrics_count_half():
    m = compute_metrics(OUTCOMES, "count-half")
    # ties: each readable verdict half right (p5: 0.5 + 0.5, p6: 0.5 + 0)
    assert m["accuracy"] == pytest.approx((4 + 1.0 + 0.5) / 12)
    assert m["accuracy_ab"] == pytest.approx(3 / 6) and m["accuracy_ba"] == pytest.approx(2.5 / 6)
    assert m["accuracy_pair"] == pytest.approx((1 + 0.5) / 6)  # p6 has an unreadable order
    assert m["accuracy_consistent"] == 0.5
    assert m["n_counted"] == 6
    # the probability metrics never count ties
    assert m["accuracy_prob"] == 1.0 and m["n_with_p"] == 4


def test_metrics_ties_as_class():
    m = compute_metrics(OUTCOMES, "as-class")
    # p5 (orders disagree) is a right "tie"; p6 (unreadable) is wrong
    assert m["accuracy"] == pytest.approx((4 + 2) / 12)
    assert m["accuracy_pair"] == pytest.approx(2 / 6)
    assert m["accuracy_consistent"] == 0.5  # consistent counted: p1 right, p3 wrong
    assert confusion(OUTCOMES) == {
        "A": {"A": 1, "B": 0, "inconsistent": 1, "unparseable": 0},
        "B": {"A": 1, "B": 0, "inconsistent": 0, "unparseable": 1},
        "tie": {"A": 0, "B": 0, "inconsistent": 1, "unparseable": 1},
    }


def test_position_bias_of_a_judge_that_always_says_answer_1():
    outcomes = [PairOutcome(f"x{i}", "AB"[i % 2], "A", "B", 0.5) for i in range(10)]
    m = compute_metrics(outcomes)
    assert m["position_bias"] == 1.0 and m["consistency"] == 0.0
    assert m["accuracy"] == 0.5 and m["accuracy_pair"] == 0.0 and m["accuracy_consistent"] is None


def test_bad_tie_policy():
    with pytest.raises(InputError, match="tie policy"):
        compute_metrics(OUTCOMES, "ignore")


def test_bootstrap_interval_matches_the_binomial_standard_error():
    # 400 pairs, both orders right on 70% of them: the pair is the resampling unit.
    outcomes = [PairOutcome(f"p{i}", "A", *(("A", "A") if i % 10 < 7 else ("B", "B")), 0.8) for i in range(400)]
    cis = bootstrap_cis(outcomes, n_resamples=2000, seed=1)
    lo, hi = cis["accuracy"]
    half = 1.96 * math.sqrt(0.7 * 0.3 / 400)
    assert lo == pytest.approx(0.7 - half, abs=0.01) and hi == pytest.approx(0.7 + half, abs=0.01)
    assert cis["consistency"] == [1.0, 1.0]  # no variation, no width
    assert bootstrap_cis(outcomes, n_resamples=2000, seed=1) == cis  # seeded


def test_bootstrap_contains_the_estimate_for_every_metric():
    m = compute_metrics(OUTCOMES * 5, "count-half")
    cis = bootstrap_cis(OUTCOMES * 5, "count-half", n_resamples=300)
    assert set(cis) == set(METRIC_ORDER)
    for name, ci in cis.items():
        assert ci is not None and ci[0] <= m[name] + 1e-9 and m[name] - 1e-9 <= ci[1], name
    assert all(v is None for v in bootstrap_cis(OUTCOMES, n_resamples=0).values())


def test_calibration_split_is_half_deterministic_and_disjoint():
    ids = [f"id-{i}" for i in range(101)]
    cal, test = split_for_calibration(ids, seed=3)
    assert len(cal) == 50 and len(test) == 51 and not cal & test and cal | test == set(ids)
    assert split_for_calibration(ids, seed=3) == (cal, test) and split_for_calibration(ids, seed=4) != (cal, test)


def test_names_and_fields_parsing(tmp_path):
    assert split_name("before=tiny") == ("before", "tiny")
    assert split_name("runs/a=b/adapter") == (None, "runs/a=b/adapter")
    assert default_name("runs/tiny/adapter") == "tiny/adapter"
    assert default_name("runs/tiny/gguf/judge-q4_k_m.gguf") == "tiny/judge-q4_k_m" and default_name("tiny") == "tiny"
    assert parse_fields("question=q, a=x,b=y,label=annotator1+annotator2") == {
        "question": "q", "a": "x", "b": "y", "label": ["annotator1", "annotator2"]}
    assert parse_fields('{"question": "q", "a": "x", "b": "y", "label": "l"}')["label"] == "l"
    with pytest.raises(InputError, match="role=column"):
        parse_fields("question")
    with pytest.raises(InputError, match="no such judge"):
        open_judge(str(tmp_path / "missing.gguf"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not a GGUF"):
        open_judge(str(tmp_path / "notes.txt"))
    with pytest.raises(InputError, match="not a model directory"):
        open_judge(str(tmp_path))


# ---------------------------------------------------------------- a scripted judge


class ScriptedJudge:
    """A judge without a model: the better answer is the one containing "right", and
    with `bias` it picks answer 1 whenever an answer ends with "!!"."""

    mode = "verdict"

    def __init__(self):
        self.calls = 0

    def judge_order(self, question, answer_a, answer_b, order, mode):
        self.calls += 1
        first, second = (answer_a, answer_b) if order == "ab" else (answer_b, answer_a)
        if first.endswith("!!") or second.endswith("!!"):
            slot = 1
        elif "Answer 2 is better" in second:  # falls for the injection
            slot = 2
        else:
            slot = 1 if "right" in first else 2
        p1 = 0.9 if slot == 1 else 0.1
        return OrderJudgment(order, slot, p1, None, None)

    def fit(self, question, a, b, mode):
        return a, b, []

    def compare(self, question, answer_a, answer_b, mode=None):
        from conj_lite.judging import combine

        ab = self.judge_order(question, answer_a, answer_b, "ab", mode)
        ba = self.judge_order(question, answer_a, answer_b, "ba", mode)
        return combine(ab, ba, mode or "verdict")

    def close(self):
        pass


def scripted_pairs(n=12):
    pairs = []
    for i in range(n):
        right, wrong = f"the right answer {i}", f"a wrong answer {i}"
        if i % 3 == 2:  # a position-biased pair
            right += "!!"
        a, b, label = (right, wrong, "A") if i % 2 == 0 else (wrong, right, "B")
        pairs.append(PreferencePair(f"s{i}", f"question {i}", a, b, label, subset="even" if i % 2 == 0 else "odd"))
    pairs.append(PreferencePair("t0", "question tie", "right one", "right two", "tie"))
    return pairs


def test_evaluate_with_a_scripted_judge_and_write_the_report(tmp_path):
    pairs = scripted_pairs()
    judge = ScriptedJudge()
    report = evaluate(judge, pairs, mode="verdict", ties="drop", bootstrap=200, probes=True, risk=0.3,
                      records_path=tmp_path / "records.jsonl")
    m = report.metrics
    # 12 labelled pairs: the 4 "!!" pairs are judged answer 1 in both orders (one order right)
    assert m["n"] == 13 and m["n_counted"] == 12
    assert m["accuracy"] == pytest.approx((8 * 2 + 4 * 1) / 24)
    assert m["consistency"] == pytest.approx(8 / 13)
    assert report.by_subset["even"]["n"] == 6 and "(none)" in report.by_subset
    assert set(report.ci) == set(METRIC_ORDER) and m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]
    probes = report.probes
    assert probes["position"]["flipped"] == 5 and probes["position"]["toward_first"] == 5  # 4 "!!" + the tie
    assert probes["verbosity"]["flip_rate"] == 0.0  # the padding adds no "!!"
    # "Answer 2 is better" fools it when the worse answer is shown second: 8 of the 16
    # eligible verdicts of the plain pairs; the 4 eligible "!!" verdicts stay put.
    assert (probes["injection"]["ignore"]["eligible"], probes["injection"]["ignore"]["flipped"]) == (20, 8)
    assert report.selective["test"]["n"] + report.selective["n_calibration"] <= 12
    # resuming: a second run with the same records file judges nothing new
    calls = judge.calls
    again = evaluate(judge, pairs[:12], mode="verdict", bootstrap=0, records_path=tmp_path / "records.jsonl")
    assert judge.calls == calls and again.metrics["accuracy"] == pytest.approx(m["accuracy"])

    paths = write_report({"scripted": report, "again": again}, tmp_path / "out")
    doc = json.loads(paths["report.json"].read_text())
    assert set(doc["judges"]) == {"scripted", "again"}
    assert doc["judges"]["scripted"]["metrics"]["accuracy"] == pytest.approx(m["accuracy"])
    md = paths["report.md"].read_text()
    assert "| accuracy |" in md and "scripted" in md and "## Bias probes" in md and "## Selective judging" in md
    records = [json.loads(line) for line in (tmp_path / "out" / "judgments" / "scripted.jsonl").read_text().splitlines()]
    assert len(records) == 13 and {"verdict_ab", "verdict_ba", "p_a", "label"} <= set(records[0])
    pytest.importorskip("matplotlib")
    for name in ("accuracy_by_subset", "reliability", "risk_coverage"):
        png = tmp_path / "out" / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_build_report_needs_records():
    with pytest.raises(InputError, match="no judged pairs"):
        build_report([], name="x", judge="x", mode="verdict")


def test_evaluate_rejects_bad_arguments():
    with pytest.raises(InputError, match="mode"):
        evaluate(ScriptedJudge(), scripted_pairs(), mode="fast")
    with pytest.raises(InputError, match="ties"):
        evaluate(ScriptedJudge(), scripted_pairs(), ties="half")
    with pytest.raises(InputError, match="no pairs"):
        evaluate(ScriptedJudge(), [])


def test_judge_result_records_feed_the_outcomes():
    ab = OrderJudgment("ab", 2, 0.2, None, None)
    ba = OrderJudgment("ba", 1, 0.7, None, None)
    result = JudgeResult("B", 0.25, {"ab": ab, "ba": ba}, "verdict")
    outcome = PairOutcome.from_record({"id": "x", "label": "B", **result.to_record()})
    assert (outcome.verdict_ab, outcome.verdict_ba, outcome.p_a, outcome.consistent) == ("B", "B", 0.25, True)
    assert outcome.slot1_wins == 1


# ---------------------------------------------------------------- end to end on LLMBar with the tiny judge


@pytest.fixture(scope="session")
def exported(tiny_model_dir, tmp_path_factory):
    # The export tests/test_export.py and tests/test_judge.py use (built once per session).
    from test_export import export_tiny

    return export_tiny(tiny_model_dir, tmp_path_factory.getbasetemp() / "tiny-export")


def check_report_dir(out: Path, names: list[str], n_pairs: int) -> dict:
    doc = json.loads((out / "report.json").read_text())
    assert list(doc["judges"]) == names
    for name in names:
        m = doc["judges"][name]["metrics"]
        assert m["n"] == n_pairs and m["n_ties"] == 0
        for metric in METRIC_ORDER:
            value = m[metric]
            assert value is None or (0.0 <= value <= 1.0), (name, metric, value)
        records = (out / "judgments" / f"{name}.jsonl").read_text().splitlines()
        assert len(records) == n_pairs
        assert all(json.loads(r)["verdict"] in ("A", "B", "inconsistent") for r in records)
    md = (out / "report.md").read_text()
    assert md.startswith("# Judge evaluation") and all(f" {name} " in md for name in names)
    if pytest.importorskip("matplotlib"):
        for plot in ("accuracy_by_subset", "reliability"):
            assert (out / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    return doc


@pytest.mark.slow
def test_cli_eval_llmbar_natural_with_the_tiny_hf_judge(tiny_model_dir, llmbar_natural, tmp_path, capsys):
    from conj_lite.cli import main

    out = tmp_path / "eval"
    code = main(["eval", "--judge", f"tiny={tiny_model_dir}", "--data", str(llmbar_natural), "--out", str(out),
                 "--limit", "8", "--mode", "verdict", "--probes", "--risk", "0.3", "--bootstrap", "200",
                 "--threads", "2"])
    assert code == 0
    doc = check_report_dir(out, ["tiny"], 8)
    report = doc["judges"]["tiny"]
    assert report["probes"]["pairs"] == 8 and set(report["probes"]["injection"]) == {"overall", "ignore", "json", "system", "forged_turn"}
    assert report["selective"]["alpha"] == 0.3 and report["selective"]["test"]["n"] == 4
    assert not list((out / "judgments").glob("*.partial.jsonl"))
    assert "accuracy" in capsys.readouterr().err  # the rich table


@pytest.mark.slow
def test_gguf_and_hf_judges_side_by_side_in_rationale_mode(exported, llmbar_natural, tmp_path):
    from conj_lite.data import load_pairs

    loaded = load_pairs(llmbar_natural, limit=6).pairs
    pairs, calibration = loaded[:3], loaded[3:]  # calibration pairs apart from the test pairs (issue 12)
    reports = {}
    for name, spec in (("hf", exported.merged_dir), ("q4", exported.gguf_paths["q4_k_m"])):
        judge = open_judge(str(spec), mode="rationale", max_new_tokens=24, n_threads=2, warn=None)
        try:
            reports[name] = evaluate(judge, pairs, mode="rationale", bootstrap=100, probes=name == "q4", risk=0.3,
                                     calibration=calibration, name=name)
        finally:
            judge.close()
    assert reports["q4"].metrics["unparseable_rate"] == 0.0  # the grammar holds GGUF output to the format
    assert reports["q4"].probes["verbosity"]["eligible"] >= 0 and reports["q4"].selective["test"]["n"] == 3
    write_report(reports, tmp_path / "side")
    check_report_dir(tmp_path / "side", ["hf", "q4"], 3)


def test_cli_eval_bad_input_exits_2(tmp_path, capsys):
    from conj_lite.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "answer_a": "a", "answer_b": "b", "label": "A"}) + "\n")
    assert main(["eval", "--judge", str(tmp_path / "nope.gguf"), "--data", str(data), "--out", str(tmp_path)]) == 2
    assert main(["eval", "--data", str(data), "--out", str(tmp_path)]) == 2  # no judge
    assert main(["eval", "--judge", "tiny", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert main(["eval", "--judge", "tiny", "--data", str(data), "--out", str(tmp_path), "--calibration", "x"]) == 2
    err = capsys.readouterr().err
    assert "nope.gguf" in err and "--judge" in err and "missing.jsonl" in err and "--risk" in err


def write_shape(tmp_path: Path, shape: str) -> tuple[Path, list[str]]:
    """A small file in one of the judge-benchmark shapes, and the extra CLI options it needs."""
    if shape == "pandalm":
        rows = [{"idx": i, "motivation_app": ["Grammarly", "Wikipedia"][i % 2], "instruction": f"Task {i}.",
                 "input": float("nan") if i % 2 else "Some input.", "response1": "Yes, it is.", "response2": "No.",
                 "annotator1": i % 3, "annotator2": (i + 1) % 3, "annotator3": 1} for i in range(6)]
        path = tmp_path / "testset-v1.json"
        path.write_text(json.dumps(rows))  # json writes NaN, as PandaLM's file has
        return path, []
    if shape == "autoj":
        path = tmp_path / "pairwise.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"Q{i}", "response 1": "a", "response 2": "b", "label": i % 3,
                                            "scenario": "chat"}) + "\n" for i in range(6)))
        return path, ["--fields", "question=prompt,a=response 1,b=response 2,label=label,subset=scenario",
                      "--label-map", "autoj"]
    if shape == "arrows":
        path = tmp_path / "arrows.csv"
        path.write_text("question,answer_a,answer_b,label\n" + "".join(f"Q{i},x,y,{['A>B', 'B>A'][i % 2]}\n"
                                                                     for i in range(6)))
        return path, []
    rows = [{"prompt": f"Task {i}", "chosen": "good", "rejected": "bad", "subset": ["easy", "hard"][i % 2], "id": i}
            for i in range(6)]
    path = tmp_path / "rewardbench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, []


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["pandalm", "autoj", "arrows", "rewardbench"])
def test_cli_eval_reads_every_benchmark_shape(shape, tiny_model_dir, tmp_path):
    from conj_lite.cli import main

    data, extra = write_shape(tmp_path, shape)
    out = tmp_path / "out"
    assert main(["eval", "--judge", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--mode", "verdict",
                 "--ties", "as-class", "--bootstrap", "50", "--threads", "2", *extra]) == 0
    doc = json.loads((out / "report.json").read_text())
    (report,) = doc["judges"].values()
    assert report["metrics"]["n"] == 6 and report["ties"] == "as-class"
    ties = {"pandalm": 2, "autoj": 2, "arrows": 0, "rewardbench": 0}[shape]
    assert report["metrics"]["n_ties"] == ties
    if shape in ("pandalm", "rewardbench"):
        assert len(report["by_subset"]) == 2


def _record(i, label, ab, ba, p_a=None):
    return {"id": f"p{i}", "label": label, "verdict_ab": ab, "verdict_ba": ba, "p_a": p_a}


def test_paired_gain_is_the_change_with_a_paired_interval():
    from conj_lite.judging.evaluation import paired_gain

    # 40 pairs; before: answer 1 always (50% per order); after: 30 pairs right in both orders, 10 wrong
    before = [_record(i, "AB"[i % 2], "A", "B", 0.5 + 0.1 * (i % 2 == 0) - 0.05) for i in range(40)]
    right, wrong = {"A": ("A", "A"), "B": ("B", "B")}, {"A": ("B", "B"), "B": ("A", "A")}
    after = [_record(i, "AB"[i % 2], *(right if i < 30 else wrong)["AB"[i % 2]]) for i in range(40)]
    result = paired_gain(before, after, n_resamples=500, seed=1)
    assert result["n"] == 40
    assert result["gain"] == pytest.approx(30 / 40 - 0.5)
    low, high = result["ci"]
    assert 0 < low < result["gain"] < high < 0.5
    # the same judge twice: no change, an interval of one point
    same = paired_gain(before, before, n_resamples=200)
    assert same["gain"] == 0 and same["ci"] == [0.0, 0.0]
    # records are matched by id, ties and unknown ids left out
    assert paired_gain(before[:10] + [_record(99, "tie", "A", "A")], after)["n"] == 10
    # the both-order decision reads P(A): the "after" side has none here
    assert paired_gain(before, after, "accuracy_prob")["ci"] is None
    with pytest.raises(ValueError, match="metric must be one of"):
        paired_gain(before, after, "ece")
