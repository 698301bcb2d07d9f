"""conj_lite.calibration: ECE and reliability bins on hand-computed cases, the exact
binomial tail, and the selective-judging guarantee checked on simulated judges."""

from __future__ import annotations

import math
import random

import pytest

from conj_lite.judging.calibration import (
    DEFAULT_GRID,
    accepted_stats,
    bin_index,
    binomial_cdf,
    confidence,
    expected_calibration_error,
    predicted_label,
    reliability,
    risk_coverage_curve,
    risk_threshold,
    scored,
    selective_result,
)
from conj_lite.judging.evaluation import PairOutcome, compute_metrics


def test_confidence_and_prediction():
    assert confidence(0.8) == 0.8 and confidence(0.25) == 0.75 and confidence(0.5) == 0.5
    assert predicted_label(0.5) == "A" and predicted_label(0.49) == "B"
    confs, correct = scored([0.9, 0.2, None, 0.6, float("nan")], ["A", "A", "B", "tie", "B"])
    assert confs == [0.9, 0.8] and correct == [True, False]  # None, NaN and ties are left out


def test_bins_cover_half_to_one_and_edges_go_up():
    assert [bin_index(c) for c in (0.5, 0.549, 0.55, 0.6, 0.7, 0.95, 0.999, 1.0)] == [0, 0, 1, 2, 4, 9, 9, 9]
    assert [bin_index(c, 5) for c in (0.5, 0.6, 0.61, 1.0)] == [0, 1, 1, 4]


def test_ece_hand_computed():
    # bins of width 0.05: 0.70 and 0.72 share bin [0.70, 0.75): mean confidence 0.71,
    # accuracy 1/2 -> gap 0.21 with weight 2/3; 0.95 alone: gap 0.05 with weight 1/3.
    confs, correct = [0.70, 0.72, 0.95], [True, False, True]
    assert expected_calibration_error(confs, correct) == pytest.approx(2 / 3 * 0.21 + 1 / 3 * 0.05)
    bins = reliability(confs, correct)
    assert len(bins) == 10 and sum(b.n for b in bins) == 3
    assert (bins[4].lo, bins[4].hi, bins[4].n) == (0.7, 0.75, 2)
    assert bins[4].confidence == pytest.approx(0.71) and bins[4].accuracy == 0.5
    assert bins[0].n == 0 and bins[0].accuracy is None
    # one item per bin: the mean gap
    assert expected_calibration_error([0.55, 0.6, 0.95, 0.9], [True, False, True, True]) == pytest.approx(
        (0.45 + 0.6 + 0.05 + 0.1) / 4)
    assert expected_calibration_error([], []) is None
    # perfectly calibrated in every bin: zero
    assert expected_calibration_error([0.75] * 4, [True, True, True, False]) == pytest.approx(0.0)


def brier_score(p_as, labels):
    """The brier metric of conj_lite.judging.evaluation on pairs with these P(A) and labels."""
    outcomes = [PairOutcome(f"p{i}", label, None, None, p_a) for i, (p_a, label) in enumerate(zip(p_as, labels))]
    return compute_metrics(outcomes)["brier"]


def test_brier_score():
    assert brier_score([0.9, 0.6, 0.3, 0.2, 0.5], ["A", "A", "B", "B", "tie"]) == pytest.approx(0.075)
    assert brier_score([None], ["A"]) is None


def test_binomial_cdf_matches_the_direct_sum():
    for n in (0, 1, 5, 17, 40):
        for p in (0.05, 0.1, 0.5, 0.9):
            for k in range(-1, n + 2):
                direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, min(k, n) + 1))
                assert binomial_cdf(k, n, p) == pytest.approx(direct, abs=1e-12)
    assert 0.0 < binomial_cdf(50, 10_000, 0.01) < 1e-6  # large n stays finite


def test_risk_threshold_on_a_hand_made_split():
    # 60 judgments at confidence 0.95, all right; 60 at 0.7, half of them wrong.
    confs = [0.95] * 60 + [0.7] * 60
    correct = [True] * 60 + [True, False] * 30
    result = risk_threshold(confs, correct, alpha=0.1, delta=0.1)
    # Thresholds above 0.95 accept nothing and are not rejected. At 0.94 the 60 accepted
    # have no error: p = P(Bin(60, 0.1) <= 0) = 0.9^60 = 0.0018 <= delta / 29; every
    # lower threshold down to 0.72 accepts the same 60 and inherits the level. At 0.70
    # all 120 come in with 30 errors (25%): not certified.
    assert result.threshold == pytest.approx(0.72)
    assert (result.coverage, result.risk) == (0.5, 0.0)
    tested = {round(t.threshold, 4): t for t in result.tests}
    assert tested[0.96].accepted == 0 and not tested[0.96].rejected
    assert tested[0.94].p_value == pytest.approx(0.9**60) and tested[0.94].rejected
    assert tested[0.7].accepted == 120 and tested[0.7].errors == 30 and not tested[0.7].rejected
    assert accepted_stats(confs, correct, 0.7) == (120, 30)
    # Too few pairs to certify anything: abstain on everything.
    none = risk_threshold([0.99] * 5, [True] * 5, alpha=0.1)
    assert none.threshold is None and none.coverage == 0.0 and none.risk is None and not none.accepts(1.0)
    with pytest.raises(ValueError):
        risk_threshold(confs, correct, alpha=0.0)


def test_fallback_levels_add_up_to_delta():
    confs = [1.0] * 200
    result = risk_threshold(confs, [True] * 200, alpha=0.2, delta=0.1)
    levels = [t.level for t in result.tests]
    share = 0.1 / len(set(DEFAULT_GRID))
    assert levels[0] == pytest.approx(share)
    # every test rejects (no errors at all), so each inherits all the level before it
    assert levels[-1] == pytest.approx(0.1)
    assert result.threshold == min(DEFAULT_GRID) and result.coverage == 1.0


def simulate(n: int, rng: random.Random, right_prob):
    confs = [0.5 + 0.5 * rng.random() for _ in range(n)]  # uniform on [0.5, 1]
    return confs, [rng.random() < right_prob(c) for c in confs]


def true_risk(threshold: float | None, right_prob, steps: int = 4000) -> float:
    """Error rate among judgments with confidence >= threshold, for uniform confidences."""
    if threshold is None or threshold >= 1.0:
        return 0.0
    width = (1.0 - threshold) / steps
    return sum(1.0 - right_prob(threshold + (i + 0.5) * width) for i in range(steps)) / steps


SCENARIOS = {
    # P(right | confidence) and alpha: a calibrated judge, an overconfident one, and one
    # whose most confident judgments are its worst (risk not monotone in the threshold).
    "calibrated": (lambda c: c, 0.2),
    "overconfident": (lambda c: 0.25 + 0.5 * c, 0.35),
    "confidently_wrong": (lambda c: 0.5 if c >= 0.97 else min(1.0, c + 0.15), 0.15),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_threshold_keeps_the_risk_with_probability_one_minus_delta(scenario):
    right_prob, alpha = SCENARIOS[scenario]
    rng = random.Random(f"calibration-{scenario}")
    delta, trials, n = 0.1, 200, 500
    violations, naive_violations, coverages = 0, 0, []
    for _ in range(trials):
        confs, correct = simulate(n, rng, right_prob)
        result = risk_threshold(confs, correct, alpha, delta)
        violations += true_risk(result.threshold, right_prob) > alpha + 1e-9
        coverages.append(result.coverage)
        # The plug-in rule "lowest grid threshold whose calibration error rate is <= alpha"
        # has no guarantee: it is the yardstick that shows this check has teeth.
        plug_in = min((t for t in DEFAULT_GRID if _plug_in_ok(*accepted_stats(confs, correct, t), alpha)),
                      default=None)
        naive_violations += true_risk(plug_in, right_prob) > alpha + 1e-9
    # The guarantee: P(risk > alpha) <= delta (plus three Monte Carlo standard errors).
    assert violations / trials <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)
    assert naive_violations / trials > 0.2
    if scenario == "calibrated":  # and where alpha is reachable it still answers a good share
        assert sorted(coverages)[trials // 2] > 0.4


def _plug_in_ok(accepted: int, errors: int, alpha: float) -> bool:
    return accepted > 0 and errors / accepted <= alpha


def test_selective_result_and_curve():
    confs, correct = [0.9, 0.8, 0.8, 0.6], [True, True, False, False]
    result = selective_result(confs, correct, 0.8)
    assert (result.n, result.accepted, result.errors, result.coverage) == (4, 3, 1, 0.75)
    assert result.risk == pytest.approx(1 / 3)
    assert selective_result(confs, correct, None).risk is None
    assert risk_coverage_curve(confs, correct) == [(0.9, 0.25, 0.0), (0.8, 0.75, pytest.approx(1 / 3)), (0.6, 1.0, 0.5)]


# ---------------------------------------------------------------- selective judging (conj-lite judge --risk)


import argparse  # noqa: E402
import json  # noqa: E402

from conj_lite.cli.options import add_risk_args  # noqa: E402
from conj_lite.errors import InputError  # noqa: E402
from conj_lite.judging import OrderJudgment, combine  # noqa: E402
from conj_lite.judging.selective import (  # noqa: E402
    ABSTAIN,
    calibration_records,
    check_risk_args,
    mark_file,
    mark_record,
    read_judged,
    threshold_from_args,
    threshold_from_records,
)


class ConfidentJudge:
    """Right, and sure of it, when the question says "easy"; a coin flip otherwise."""

    mode = "verdict"

    def compare(self, question, answer_a, answer_b, mode=None):
        easy = "easy" in question
        p1 = 0.95 if "good" in answer_a else 0.05  # P(answer 1 better) in order ab
        if not easy:
            p1 = 0.55
        ab = OrderJudgment("ab", 1 if p1 >= 0.5 else 2, p1, None, None)
        ba = OrderJudgment("ba", 2 if p1 >= 0.5 else 1, 1 - p1, None, None)
        return combine(ab, ba, mode or "verdict")


def calibration_file(path, n_easy=80, n_hard=40):
    rows = []
    for i in range(n_easy + n_hard):
        q = f"{'easy' if i < n_easy else 'hard'} question {i}"
        a, b, label = ("good", "bad", "A") if i % 2 == 0 else ("bad", "good", "B")
        rows.append({"id": f"c{i}", "question": q, "answer_a": a, "answer_b": b, "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def risk_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--output")
    parser.add_argument("--mode", default="verdict")
    add_risk_args(parser)
    return parser.parse_args(argv)


def test_risk_arguments_are_checked():
    assert check_risk_args(risk_args([])) is False
    with pytest.raises(InputError, match="--risk needs --calibration"):
        check_risk_args(risk_args(["--risk", "0.1"]))
    with pytest.raises(InputError, match="--calibration needs --risk"):
        check_risk_args(risk_args(["--calibration", "x.jsonl"]))
    with pytest.raises(InputError, match="between 0 and 1"):
        check_risk_args(risk_args(["--risk", "10", "--calibration", "x.jsonl"]))


def test_threshold_from_a_labelled_file_then_marking_judgments(tmp_path):
    calibration = calibration_file(tmp_path / "cal.jsonl")
    args = risk_args(["--risk", "0.1", "--calibration", str(calibration), "--output", str(tmp_path / "out.jsonl")])
    threshold = threshold_from_args(args, ConfidentJudge())
    # the easy pairs (confidence 0.95, all right) are certified; the hard ones (0.55, half wrong) are not
    assert threshold.threshold is not None and 0.55 < threshold.threshold <= 0.95
    assert threshold.coverage == pytest.approx(80 / 120) and threshold.risk == 0.0
    cache = tmp_path / "out.calibration.jsonl"  # calibration judgments are kept and reused
    assert len(read_judged(cache)) == 120
    assert threshold_from_args(risk_args(["--risk", "0.1", "--calibration", str(cache)]), None).threshold == \
        threshold.threshold

    easy = mark_record(ConfidentJudge().compare("easy one", "good", "bad").to_record(), threshold)
    hard = mark_record(ConfidentJudge().compare("hard one", "good", "bad").to_record(), threshold)
    assert (easy["selective_verdict"], easy["confidence"]) == ("A", 0.95)
    assert hard["selective_verdict"] == ABSTAIN and hard["risk_threshold"] == threshold.threshold
    assert mark_record({"p_a": 0.9}, None) == {"p_a": 0.9}

    out = tmp_path / "judged.jsonl"
    out.write_text(json.dumps({**easy, "label": "A"}) + "\n" + json.dumps({**hard, "label": "B"}) + "\n")
    summary = mark_file(out, threshold)
    assert summary == {"pairs": 2, "answered": 1, "coverage": 0.5, "risk": 0.0, "threshold": threshold.threshold}
    assert [json.loads(line)["selective_verdict"] for line in out.read_text().splitlines()] == ["A", ABSTAIN]


def test_calibration_in_another_mode_is_refused(tmp_path):
    path = tmp_path / "judged.jsonl"
    path.write_text(json.dumps({"id": "x", "p_a": 0.9, "label": "A", "mode": "rationale"}) + "\n")
    with pytest.raises(InputError, match="mode"):
        calibration_records(ConfidentJudge(), path, mode="verdict")
    with pytest.raises(InputError, match="no pair labelled A or B"):
        threshold_from_records([{"p_a": 0.9, "label": "tie"}], 0.1)
