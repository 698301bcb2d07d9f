"""Calibration of P(A better) and the risk-controlled acceptance threshold (pure core).

A judged pair has p_a = P(answer A is better), averaged over both answer orders so that
it does not depend on which answer was shown first (the bidirectional preference of
SCOPE). Its prediction is A when p_a >= 0.5, else B, and its confidence is
max(p_a, 1 - p_a), in [0.5, 1]; SCOPE's bidirectional preference entropy is a
decreasing function of this confidence, so both rank judgments the same way.

Calibration (`reliability`, `expected_calibration_error`): confidences go into
`n_bins` equal-width bins over [0.5, 1]; ECE = sum over bins of
(bin size / n) * |accuracy in bin - mean confidence in bin|.

Selective judging (`risk_threshold`): given a labelled calibration split and a risk
level alpha, the judge answers only when its confidence is at least a threshold and
abstains otherwise. The threshold comes with a finite-sample, distribution-free
guarantee (Learn-then-Test, Angelopoulos et al. 2021): if calibration and future pairs
are drawn i.i.d. from the same distribution, then with probability at least 1 - delta
over the calibration draw, the error rate among accepted judgments is at most alpha.

How: for every threshold t of a fixed grid (fixed before seeing data), the null
hypothesis "the error rate among judgments with confidence >= t exceeds alpha" is
tested with the exact binomial tail: given the m calibration judgments accepted at t,
their errors k are Binomial(m, risk(t)), so p(t) = P(Binomial(m, alpha) <= k) is a
valid p-value. The tests run from the strictest threshold down as a fallback procedure
(Wiens 2003): each threshold gets delta / len(grid), and a threshold whose predecessor
was rejected also inherits that predecessor's level. This controls the chance of any
false rejection at delta whatever the dependence between tests, so every rejected
threshold is safe at once and the lowest one (the most coverage) is chosen. When none
is rejected the judge abstains on everything.

Nothing here imports torch; numpy is used for the bootstrap in `conj_lite.evaluation`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

DEFAULT_BINS = 10
DEFAULT_DELTA = 0.1
# Confidence thresholds tried by risk_threshold: fixed in advance (the guarantee needs
# a grid that does not depend on the calibration data), finer near 1 where large
# models put most of their judgments.
DEFAULT_GRID = tuple(round(0.5 + 0.02 * i, 4) for i in range(25)) + (0.99, 0.995, 0.999, 0.9999)


# ---------------------------------------------------------------- predictions


def confidence(p_a: float) -> float:
    """The confidence of the prediction argmax(p_a, 1 - p_a): in [0.5, 1]."""
    return max(p_a, 1.0 - p_a)


def predicted_label(p_a: float) -> str:
    """"A" when P(A better) >= 0.5, else "B"."""
    return "A" if p_a >= 0.5 else "B"


def scored(p_as: Iterable[float | None], labels: Iterable[str]) -> tuple[list[float], list[bool]]:
    """(confidences, correct flags) of the pairs with a probability and an A/B label."""
    confs, correct = [], []
    for p_a, label in zip(p_as, labels):
        if p_a is None or label not in ("A", "B") or (isinstance(p_a, float) and math.isnan(p_a)):
            continue
        confs.append(confidence(p_a))
        correct.append(predicted_label(p_a) == label)
    return confs, correct


# ---------------------------------------------------------------- calibration


@dataclass
class Bin:
    lo: float
    hi: float
    n: int
    confidence: float | None  # mean confidence in the bin
    accuracy: float | None  # share of correct predictions in the bin

    def to_dict(self) -> dict:
        return asdict(self)


def bin_index(conf: float, n_bins: int = DEFAULT_BINS) -> int:
    """The bin of a confidence in [0.5, 1] (1.0 goes into the last bin)."""
    position = (conf - 0.5) / 0.5 * n_bins
    return min(n_bins - 1, max(0, int(math.floor(position + 1e-12))))


def reliability(confs: Sequence[float], correct: Sequence[bool], n_bins: int = DEFAULT_BINS) -> list[Bin]:
    """Equal-width bins over [0.5, 1] with their mean confidence and accuracy."""
    sums = [[0, 0.0, 0] for _ in range(n_bins)]  # count, confidence sum, correct count
    for conf, ok in zip(confs, correct):
        cell = sums[bin_index(conf, n_bins)]
        cell[0] += 1
        cell[1] += conf
        cell[2] += bool(ok)
    width = 0.5 / n_bins
    return [
        Bin(round(0.5 + i * width, 6), round(0.5 + (i + 1) * width, 6), n,
            (s / n) if n else None, (k / n) if n else None)
        for i, (n, s, k) in enumerate(sums)
    ]


def expected_calibration_error(confs: Sequence[float], correct: Sequence[bool], n_bins: int = DEFAULT_BINS) -> float | None:
    """ECE: the bin-size-weighted mean |accuracy - confidence|; None without data."""
    total = len(confs)
    if not total:
        return None
    return sum(b.n / total * abs(b.accuracy - b.confidence) for b in reliability(confs, correct, n_bins) if b.n)


# ---------------------------------------------------------------- selective judging


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), exactly (summed in log space, so large n is fine)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


@dataclass
class ThresholdTest:
    threshold: float
    accepted: int  # calibration judgments with confidence >= threshold
    errors: int  # wrong ones among them
    p_value: float
    level: float  # the level it was tested at (fallback procedure)
    rejected: bool  # True: the risk at this threshold is certified <= alpha

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RiskThreshold:
    """The chosen confidence threshold and what the calibration split says about it."""

    alpha: float
    delta: float
    threshold: float | None  # None: no threshold is certified; abstain on everything
    n_calibration: int
    coverage: float  # share of calibration judgments accepted at the threshold
    risk: float | None  # error rate among them (None when none is accepted)
    tests: list[ThresholdTest] = field(default_factory=list, repr=False)

    def accepts(self, conf: float) -> bool:
        return self.threshold is not None and conf >= self.threshold - 1e-12

    def to_dict(self, with_tests: bool = False) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "tests"}
        if with_tests:
            out["tests"] = [t.to_dict() for t in self.tests]
        return out


def accepted_stats(confs: Sequence[float], correct: Sequence[bool], threshold: float | None) -> tuple[int, int]:
    """(accepted, errors among them) at a threshold (None accepts nothing)."""
    if threshold is None:
        return 0, 0
    accepted = errors = 0
    for conf, ok in zip(confs, correct):
        if conf >= threshold - 1e-12:
            accepted += 1
            errors += not ok
    return accepted, errors


def risk_threshold(
    confs: Sequence[float],
    correct: Sequence[bool],
    alpha: float,
    delta: float = DEFAULT_DELTA,
    grid: Sequence[float] = DEFAULT_GRID,
) -> RiskThreshold:
    """The lowest grid threshold certified to keep the accepted error rate <= alpha
    with probability >= 1 - delta (see the module notes)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"risk level alpha must be in (0, 1), got {alpha!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if len(confs) != len(correct):
        raise ValueError("confs and correct must have the same length")
    thresholds = sorted(set(grid), reverse=True)
    if not thresholds:
        raise ValueError("the threshold grid is empty")
    share = delta / len(thresholds)
    tests, carried, chosen = [], 0.0, None
    for t in thresholds:
        level = share + carried
        accepted, errors = accepted_stats(confs, correct, t)
        p_value = binomial_cdf(errors, accepted, alpha) if accepted else 1.0
        rejected = p_value <= level
        tests.append(ThresholdTest(t, accepted, errors, p_value, level, rejected))
        carried = level if rejected else 0.0
        if rejected:
            chosen = t  # thresholds go down, so the last rejected one covers the most
    accepted, errors = accepted_stats(confs, correct, chosen)
    return RiskThreshold(
        alpha=alpha,
        delta=delta,
        threshold=chosen,
        n_calibration=len(confs),
        coverage=accepted / len(confs) if confs else 0.0,
        risk=errors / accepted if accepted else None,
        tests=tests,
    )


@dataclass
class SelectiveResult:
    """Coverage and empirical risk of a threshold on a (separate) test split."""

    n: int
    accepted: int
    errors: int

    @property
    def coverage(self) -> float | None:
        return self.accepted / self.n if self.n else None

    @property
    def risk(self) -> float | None:
        return self.errors / self.accepted if self.accepted else None

    def to_dict(self) -> dict:
        return {"n": self.n, "accepted": self.accepted, "errors": self.errors,
                "coverage": self.coverage, "risk": self.risk}


def selective_result(confs: Sequence[float], correct: Sequence[bool], threshold: float | None) -> SelectiveResult:
    accepted, errors = accepted_stats(confs, correct, threshold)
    return SelectiveResult(len(confs), accepted, errors)


def risk_coverage_curve(confs: Sequence[float], correct: Sequence[bool]) -> list[tuple[float, float, float]]:
    """(threshold, coverage, risk) for every distinct confidence, highest first."""
    order = sorted(zip(confs, correct), key=lambda x: -x[0])
    out, errors = [], 0
    for i, (conf, ok) in enumerate(order, 1):
        errors += not ok
        if i == len(order) or order[i][0] < conf:
            out.append((conf, i / len(order), errors / i))
    return out
