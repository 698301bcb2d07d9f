"""Evaluate a pairwise judge: accuracy both ways, consistency, position bias,
calibration, bootstrap confidence intervals, bias probes and selective judging.

    from conj_lite.judging import open_judge, evaluate, write_report
    judge = open_judge("runs/tiny/gguf/judge-q4_k_m.gguf")
    report = evaluate(judge, pairs, mode="rationale", ties="drop", bootstrap=1000, seed=0)
    report.metrics["accuracy"], report.metrics["accuracy_ci"]
    write_report({"before": r0, "after": r1}, "runs/eval")   # report.json, report.md, plots/

or `conj-lite eval --judge SPEC [--judge SPEC2 ...] --data FILE --out DIR` (conj_lite.cli.eval).

Every pair is judged in both answer orders (answer 1 = A, then answer 1 = B). Per pair
the judge gives a winner in each order (A, B, or unreadable) and P(A better) averaged
over both orders (`p_a`). The metrics (all fractions in [0, 1]):

  accuracy             share of the per-order verdicts that name the better answer
  accuracy_ab / _ba    the same in one order only
  accuracy_pair        share of pairs whose two verdicts agree and are right
  consistency          share of pairs whose two verdicts agree (all pairs)
  position_bias        share of readable per-order verdicts that pick answer 1
                       (0.5 = no preference for the first position)
  unparseable_rate     share of per-order verdicts with no readable verdict
  accuracy_consistent  accuracy_pair among the consistent pairs
  accuracy_prob        share of pairs where argmax(p_a) is the better answer
  ece, brier           calibration of p_a (see conj_lite.calibration)

Ties (`ties=`): "drop" leaves tie-labelled pairs out of the accuracies; "count-half"
scores any readable verdict on a tie as half right; "as-class" makes tie a third
class, predicted when the two orders disagree (the preference flips with the order),
so an inconsistent pair is right on a tie and wrong on A/B. Consistency, position bias
and the unparseable rate count every pair; accuracy_prob, ece and brier only A/B pairs.

Confidence intervals: percentile bootstrap over pairs (both orders of a pair stay
together), `bootstrap` resamples, 95%: metrics["<name>_ci"] = [low, high].
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..artifacts import fingerprint_id
from ..errors import InputError
from ..jsonio import write_jsonl
from ..progress import get_console, stage_progress
from .batch import judge_pairs, judge_provenance, write_provenance
from .calibration import (
    DEFAULT_BINS,
    DEFAULT_DELTA,
    bin_index,
    confidence,
    expected_calibration_error,
    predicted_label,
    reliability,
    risk_coverage_curve,
    scored,
    selective_result,
)
from .judge import open_judge
from .probes import probe_cost, run_probes
from .selective import calibration_records, threshold_from_records
from .verdicts import MODES

TIE_POLICIES = ("drop", "count-half", "as-class")
INCONSISTENT = "inconsistent"
NO_SUBSET = "(none)"

# name -> (numerator component, denominator component, what it measures)
RATIO_METRICS = {
    "accuracy": ("s_orders", "orders_counted", "per-order verdicts naming the better answer"),
    "accuracy_ab": ("s_ab", "counted", "accuracy with answer A shown first"),
    "accuracy_ba": ("s_ba", "counted", "accuracy with answer B shown first"),
    "accuracy_pair": ("s_pair", "counted", "pairs whose two verdicts agree and are right"),
    "consistency": ("consistent", "one", "pairs with the same winner in both orders"),
    "position_bias": ("slot1", "parsed", "readable verdicts picking answer 1 (0.5 = none)"),
    "unparseable_rate": ("unparsed", "two", "per-order verdicts that could not be read"),
    "accuracy_consistent": ("s_pair_consistent", "consistent_counted", "accuracy on the consistent pairs"),
    "accuracy_prob": ("correct_p", "has_p", "argmax of P(A better) names the better answer"),
    "brier": ("squared_error", "has_p", "mean squared error of P(A better) (lower is better)"),
}
METRIC_ORDER = (
    "accuracy", "accuracy_ab", "accuracy_ba", "accuracy_pair", "consistency", "position_bias",
    "unparseable_rate", "accuracy_consistent", "accuracy_prob", "ece", "brier",
)
METRIC_HELP = {**{k: v[2] for k, v in RATIO_METRICS.items()},
               "ece": "expected calibration error of P(A better) (lower is better)"}
COMPONENTS = (
    "one", "two", "counted", "orders_counted", "s_ab", "s_ba", "s_orders", "s_pair", "consistent", "parsed",
    "slot1", "unparsed", "consistent_counted", "s_pair_consistent", "has_p", "correct_p", "squared_error",
)


# ---------------------------------------------------------------- pure core


@dataclass(frozen=True)
class PairOutcome:
    """One pair judged in both orders: the winner of each order ("A", "B" or None when
    unreadable) and P(A better)."""

    id: str
    label: str  # "A" | "B" | "tie"
    verdict_ab: str | None
    verdict_ba: str | None
    p_a: float | None = None
    subset: str | None = None

    @classmethod
    def from_record(cls, record: dict) -> "PairOutcome":
        p_a = record.get("p_a")
        return cls(str(record["id"]), record["label"], record.get("verdict_ab"), record.get("verdict_ba"),
                   None if p_a is None else float(p_a), record.get("subset"))

    @property
    def parsed(self) -> int:
        return (self.verdict_ab is not None) + (self.verdict_ba is not None)

    @property
    def consistent(self) -> bool:
        return self.verdict_ab is not None and self.verdict_ab == self.verdict_ba

    @property
    def slot1_wins(self) -> int:
        """Per-order verdicts that picked the answer shown first."""
        return (self.verdict_ab == "A") + (self.verdict_ba == "B")

    @property
    def outcome(self) -> str:
        """"A"/"B" (both orders agree), "inconsistent" (they disagree) or "unparseable"."""
        if self.verdict_ab is None or self.verdict_ba is None:
            return "unparseable"
        return self.verdict_ab if self.consistent else INCONSISTENT


def score_outcome(o: PairOutcome, ties: str) -> dict[str, float]:
    """The additive components of every ratio metric for one pair."""
    if ties not in TIE_POLICIES:
        raise InputError(f"tie policy must be one of {', '.join(TIE_POLICIES)}, got {ties!r}")
    c = dict.fromkeys(COMPONENTS, 0.0)
    c["one"], c["two"] = 1.0, 2.0
    c["consistent"] = float(o.consistent)
    c["parsed"] = float(o.parsed)
    c["unparsed"] = float(2 - o.parsed)
    c["slot1"] = float(o.slot1_wins)
    if o.label in ("A", "B"):
        counted = True
        s_ab, s_ba = float(o.verdict_ab == o.label), float(o.verdict_ba == o.label)
        s_pair = float(o.consistent and o.verdict_ab == o.label)
        if o.p_a is not None and not math.isnan(o.p_a):
            c["has_p"] = 1.0
            c["correct_p"] = float(predicted_label(o.p_a) == o.label)
            c["squared_error"] = (o.p_a - (1.0 if o.label == "A" else 0.0)) ** 2
    elif ties == "drop":
        counted, s_ab, s_ba, s_pair = False, 0.0, 0.0, 0.0
    elif ties == "count-half":
        counted = True
        s_ab, s_ba = 0.5 * (o.verdict_ab is not None), 0.5 * (o.verdict_ba is not None)
        s_pair = 0.5 * (o.parsed == 2)
    else:  # as-class: a tie is predicted when the two readable verdicts disagree
        counted = True
        s_ab = s_ba = s_pair = float(o.outcome == INCONSISTENT)
    if counted:
        c["counted"], c["orders_counted"] = 1.0, 2.0
        c["s_ab"], c["s_ba"], c["s_orders"], c["s_pair"] = s_ab, s_ba, s_ab + s_ba, s_pair
        c["consistent_counted"] = float(o.consistent)
        c["s_pair_consistent"] = s_pair * o.consistent
    return c


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def compute_metrics(outcomes: Sequence[PairOutcome], ties: str = "drop", n_bins: int = DEFAULT_BINS) -> dict:
    """Point estimates of every metric, plus counts (n, n_ties, n_counted, n_with_p)."""
    totals = dict.fromkeys(COMPONENTS, 0.0)
    for o in outcomes:
        for key, value in score_outcome(o, ties).items():
            totals[key] += value
    metrics = {name: _ratio(totals[num], totals[den]) for name, (num, den, _) in RATIO_METRICS.items()}
    confs, correct = scored([o.p_a for o in outcomes], [o.label for o in outcomes])
    metrics["ece"] = expected_calibration_error(confs, correct, n_bins)
    metrics["n"] = len(outcomes)
    metrics["n_ties"] = sum(o.label == "tie" for o in outcomes)
    metrics["n_counted"] = int(totals["counted"])
    metrics["n_with_p"] = len(confs)
    return {name: metrics[name] for name in (*METRIC_ORDER, "n", "n_ties", "n_counted", "n_with_p")}


def confusion(outcomes: Iterable[PairOutcome]) -> dict[str, dict[str, int]]:
    """label -> pair outcome (A, B, inconsistent, unparseable) -> count."""
    table: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = table.setdefault(o.label, {"A": 0, "B": 0, INCONSISTENT: 0, "unparseable": 0})
        row[o.outcome] += 1
    return table


def bootstrap_cis(outcomes: Sequence[PairOutcome], ties: str = "drop", n_resamples: int = 1000, seed: int = 0,
                  level: float = 0.95, n_bins: int = DEFAULT_BINS) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of every metric, resampling whole pairs."""
    import numpy as np

    if n_resamples <= 0 or not outcomes:
        return {name: None for name in METRIC_ORDER}
    n = len(outcomes)
    table = np.array([[score_outcome(o, ties)[k] for k in COMPONENTS] for o in outcomes], dtype=float)
    col = {k: i for i, k in enumerate(COMPONENTS)}
    # ECE per resample: sum over bins of |sum of (correct - confidence)| / number with p.
    onehot = np.zeros((n, n_bins))
    for i, o in enumerate(outcomes):
        if table[i, col["has_p"]]:
            conf = confidence(o.p_a)
            onehot[i, bin_index(conf, n_bins)] = table[i, col["correct_p"]] - conf
    rng = np.random.default_rng(seed)
    sums, ece_num = [], []
    for start in range(0, n_resamples, 250):  # bounded memory: 250 x n counts at a time
        size = min(250, n_resamples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(float)
        sums.append(weights @ table)
        ece_num.append(np.abs(weights @ onehot).sum(axis=1))
    sums, ece_num = np.vstack(sums), np.concatenate(ece_num)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, (num, den, _) in RATIO_METRICS.items():
            out[name] = _interval(sums[:, col[num]] / sums[:, col[den]], lo_q, hi_q)
        out["ece"] = _interval(ece_num / sums[:, col["has_p"]], lo_q, hi_q)
    return {name: out[name] for name in METRIC_ORDER}


def _interval(values, lo_q: float, hi_q: float) -> list[float] | None:
    import numpy as np

    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    return [float(np.percentile(values, lo_q)), float(np.percentile(values, hi_q))]


def metrics_with_cis(outcomes: Sequence[PairOutcome], ties: str, n_resamples: int, seed: int,
                     n_bins: int = DEFAULT_BINS) -> dict:
    metrics = compute_metrics(outcomes, ties, n_bins)
    for name, ci in bootstrap_cis(outcomes, ties, n_resamples, seed, n_bins=n_bins).items():
        metrics[f"{name}_ci"] = ci
    return metrics


def paired_gain(before: Sequence[dict], after: Sequence[dict], metric: str = "accuracy", n_resamples: int = 2000,
                seed: int = 0, level: float = 0.95) -> dict:
    """The change of `metric` between two judgments of the same labelled pairs (records
    of `evaluate`, matched by id), with a paired percentile bootstrap interval: each
    resample draws pairs and scores both judges on the same draw. Metrics are the
    per-pair ratios of `compute_metrics` ("accuracy": per-order verdicts, "accuracy_prob":
    the both-order decision). {"gain", "ci": [low, high], "n"}; n counts the pairs in
    both and labelled A or B."""
    import numpy as np

    if metric not in RATIO_METRICS:
        raise ValueError(f"metric must be one of {', '.join(RATIO_METRICS)}, got {metric!r}")
    num, den, _ = RATIO_METRICS[metric]
    by_id = [{str(r["id"]): PairOutcome.from_record(r) for r in side if r.get("label") in ("A", "B")}
             for side in (before, after)]
    ids = sorted(set(by_id[0]) & set(by_id[1]))
    if not ids:
        return {"gain": None, "ci": None, "n": 0}
    tables = [np.array([[score_outcome(side[i], "drop")[k] for k in (num, den)] for i in ids]) for side in by_id]
    n = len(ids)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = [(weights @ t[:, 0]) / (weights @ t[:, 1]) for t in tables]
        gain = tables[1][:, 0].sum() / tables[1][:, 1].sum() - tables[0][:, 0].sum() / tables[0][:, 1].sum()
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {"gain": float(gain), "ci": _interval(ratios[1] - ratios[0], lo_q, hi_q), "n": n}


def split_for_calibration(ids: Sequence[str], seed: int = 0) -> tuple[set[str], set[str]]:
    """A deterministic half/half split of pair ids into (calibration, test)."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode("utf-8")).hexdigest())
    half = len(ranked) // 2
    return set(ranked[:half]), set(ranked[half:])


# ---------------------------------------------------------------- the report


@dataclass
class EvalReport:
    """What `evaluate` measured for one judge on one data set."""

    name: str
    judge: str
    mode: str
    ties: str
    metrics: dict
    by_subset: dict[str, dict] = field(default_factory=dict)
    confusion: dict = field(default_factory=dict)
    reliability: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list, repr=False)
    probes: dict | None = None
    selective: dict | None = None
    seconds: float = 0.0
    bootstrap: int = 0
    seed: int = 0
    data: str | None = None
    provenance: dict | None = None  # what made the records (batch.judge_provenance)

    @property
    def ci(self) -> dict:
        return {name: self.metrics.get(f"{name}_ci") for name in METRIC_ORDER}

    @property
    def outcomes(self) -> list[PairOutcome]:
        return [PairOutcome.from_record(r) for r in self.records]

    def to_dict(self, records: bool = False) -> dict:
        out = {
            "name": self.name, "judge": self.judge, "mode": self.mode, "ties": self.ties, "data": self.data,
            "metrics": self.metrics, "by_subset": self.by_subset, "confusion": self.confusion,
            "reliability": self.reliability, "probes": self.probes, "selective": self.selective,
            "seconds": round(self.seconds, 3), "bootstrap": self.bootstrap, "seed": self.seed,
            "fingerprint": fingerprint_id(self.provenance) if self.provenance else None,
            "provenance": self.provenance,
        }
        if records:
            out["records"] = self.records
        return out


def build_report(records: list[dict], *, name: str, judge: str, mode: str, ties: str = "drop", bootstrap: int = 1000,
                 seed: int = 0, n_bins: int = DEFAULT_BINS, data: str | None = None, seconds: float = 0.0) -> EvalReport:
    """An EvalReport from judged records ({"id", "label", "subset", "verdict_ab",
    "verdict_ba", "p_a"}): the pure half of `evaluate`."""
    if ties not in TIE_POLICIES:
        raise InputError(f"--ties must be one of {', '.join(TIE_POLICIES)}, got {ties!r}")
    outcomes = [PairOutcome.from_record(r) for r in records]
    if not outcomes:
        raise InputError("nothing to evaluate: no judged pairs")
    metrics = metrics_with_cis(outcomes, ties, bootstrap, seed, n_bins)
    subsets = sorted({o.subset or NO_SUBSET for o in outcomes})
    by_subset = {}
    if len(subsets) > 1 or subsets != [NO_SUBSET]:
        for subset in subsets:
            part = [o for o in outcomes if (o.subset or NO_SUBSET) == subset]
            by_subset[subset] = metrics_with_cis(part, ties, bootstrap, seed, n_bins)
    confs, correct = scored([o.p_a for o in outcomes], [o.label for o in outcomes])
    return EvalReport(
        name=name, judge=judge, mode=mode, ties=ties, metrics=metrics, by_subset=by_subset,
        confusion=confusion(outcomes), reliability=[b.to_dict() for b in reliability(confs, correct, n_bins)],
        records=records, seconds=seconds, bootstrap=bootstrap, seed=seed, data=data,
    )


# ---------------------------------------------------------------- edge: judges


def split_name(spec: str) -> tuple[str | None, str]:
    """"before=runs/x/adapter" -> ("before", "runs/x/adapter"); a plain spec has no name."""
    head, sep, tail = str(spec).partition("=")
    if sep and head and tail and "/" not in head and "\\" not in head and not Path(spec).exists():
        return head, tail
    return None, str(spec)


def default_name(spec: str) -> str:
    """A judge's column name: its file stem with the run it belongs to, so that
    runs/a/gguf/judge-q4_k_m.gguf and runs/b/gguf/judge-q4_k_m.gguf are a/judge-q4_k_m
    and b/judge-q4_k_m."""
    path = Path(spec)
    if spec == "tiny":
        return "tiny"
    if path.name in ("adapter", "merged") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    if path.suffix.lower() == ".gguf":
        run = path.parent.parent if path.parent.name == "gguf" else path.parent
        return f"{run.name}/{path.stem}" if run.name else path.stem
    return path.name or spec


def describe_judge(judge, spec=None) -> str:
    if spec is not None and isinstance(spec, (str, Path)):
        return str(spec)
    backend = getattr(judge, "backend", None)
    return str(getattr(backend, "path", None) or getattr(backend, "source", None) or type(judge).__name__)


# ---------------------------------------------------------------- edge: judging


def evaluate(judge, pairs, mode: str = "rationale", ties: str = "drop", bootstrap: int = 1000, seed: int = 0, *,
             probes: bool = False, risk: float | None = None, calibration=None, delta: float = DEFAULT_DELTA,
             name: str | None = None, records_path: str | Path | None = None, n_bins: int = DEFAULT_BINS,
             data: str | None = None, console=None, on_mismatch: str = "replace") -> EvalReport:
    """Judge every pair in both orders and measure the judge (see the module notes).

    judge        a Judge, or a spec for `open_judge` (opened and closed here)
    pairs        PreferencePair records (`conj_lite.data.load_pairs(...).pairs`)
    probes       also run the verbosity and injection probes (8 more order-judgments
                 per labelled pair); the position probe is always reported
    risk         selective judging at this risk level: the threshold is calibrated on
                 `calibration` (a data file, a judgments JSONL or PreferencePair
                 records) or, without one, on a seeded half of `pairs`, and its
                 coverage and error rate are reported on the other half
    records_path JSONL of per-pair judgments; a re-run resumes from it when the same
                 judge setup made it; otherwise it is set aside and judged afresh
                 (on_mismatch="replace") or refused ("error"), see batch.check_store"""
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if ties not in TIE_POLICIES:
        raise InputError(f"--ties must be one of {', '.join(TIE_POLICIES)}, got {ties!r}")
    if risk is not None and not 0.0 < risk < 1.0:
        raise InputError(f"--risk must be between 0 and 1, got {risk}")
    pairs = list(pairs)
    if not pairs:
        raise InputError("nothing to evaluate: no pairs")
    owned = isinstance(judge, (str, Path))
    spec = judge if owned else None
    name = name or (default_name(str(spec)) if owned else "judge")
    judge = open_judge(judge, mode=mode) if owned else judge
    try:
        start = time.perf_counter()
        provenance = judge_provenance(judge, mode)
        records = judge_pairs(judge, pairs, mode, records_path=records_path, console=console, name=name,
                              on_mismatch=on_mismatch, provenance=provenance)
        report = build_report(records, name=name, judge=describe_judge(judge, spec), mode=mode, ties=ties,
                              bootstrap=bootstrap, seed=seed, n_bins=n_bins, data=data)
        report.provenance = provenance
        if probes:
            report.probes = _probes(judge, pairs, records, mode, console, name)
        if risk is not None:
            report.selective = _selective(judge, records, risk, delta, calibration, mode, seed, console)
        report.seconds = time.perf_counter() - start
        return report
    finally:
        if owned:
            judge.close()


def _probes(judge, pairs, records, mode, console, name) -> dict:
    base = {r["id"]: r for r in records}
    labelled = [p for p in pairs if p.label in ("A", "B")]
    with stage_progress("probes", console, unit="pairs") as progress:
        task = progress.add_task(f"{name} ({probe_cost(len(labelled))} judgments)", total=len(labelled))
        return run_probes(judge, pairs, base, mode, progress=lambda: progress.advance(task))


def calibration_overlap(cal: list[dict], test: list[dict]) -> int:
    """Test records that are also calibration records: the same pair texts (`key`), or
    the same id where a calibration row carries no key."""
    keys = {r.get("key") for r in cal if r.get("key")}
    ids = {str(r.get("id")) for r in cal if not r.get("key")}
    return sum(1 for r in test if (r.get("key") in keys) or (str(r.get("id")) in ids))


def _selective(judge, records, risk, delta, calibration, mode, seed, console) -> dict:
    if calibration is None:
        cal_ids, _ = split_for_calibration([r["id"] for r in records], seed)
        cal = [r for r in records if r["id"] in cal_ids]
        test = [r for r in records if r["id"] not in cal_ids]
        source = "half of the evaluation pairs (seeded split); reported on the other half"
    else:
        if isinstance(calibration, (list, tuple)) and calibration and not isinstance(calibration[0], dict):
            cal = judge_pairs(judge, calibration, mode, console=console, name="calibration")
        else:
            cal = list(calibration) if isinstance(calibration, (list, tuple)) else \
                calibration_records(judge, calibration, mode=mode, console=console)
        test = records
        source = str(calibration) if isinstance(calibration, (str, Path)) else f"{len(cal)} calibration pairs"
        overlap = calibration_overlap(cal, test)
        if test and overlap == len(test):
            raise InputError(f"every one of the {len(test)} test pairs is also a calibration pair ({source}): the "
                             "risk and coverage would be measured on the pairs that set the threshold; calibrate on "
                             "other labelled pairs, or leave out --calibration to split the data in two")
        if overlap:
            (console or get_console()).print(
                f"[yellow]warning:[/] {overlap} of the {len(test)} test pairs are also calibration pairs ({source}); "
                "the test risk and coverage are optimistic for them", highlight=False)
    threshold = threshold_from_records(cal, risk, delta)
    confs, correct = scored([r.get("p_a") for r in test], [r.get("label") for r in test])
    result = selective_result(confs, correct, threshold.threshold)
    return {
        "alpha": risk, "delta": delta, "calibration_source": source, **threshold.to_dict(),
        "calibration_overlap": overlap if calibration is not None else 0,
        "test": result.to_dict(),
        "curve": [list(point) for point in risk_coverage_curve(confs, correct)],
    }


# ---------------------------------------------------------------- reports


def _as_reports(reports) -> dict[str, EvalReport]:
    if isinstance(reports, EvalReport):
        return {reports.name: reports}
    if isinstance(reports, dict):
        out = {}
        for key, report in reports.items():
            report.name = str(key)
            out[str(key)] = report
        return out
    return {r.name: r for r in reports}


def pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def fmt_metric(metrics: dict, name: str) -> str:
    value, ci = metrics.get(name), metrics.get(f"{name}_ci")
    if value is None:
        return "n/a"
    if name in ("ece", "brier"):
        text = f"{value:.3f}"
        return text + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    return pct(value) + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def write_report(reports, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """report.json, report.md, plots/*.png and judgments/<name>.jsonl in `out_dir`.

    `reports`: an EvalReport, a list of them, or {name: report} (names become column
    headings, e.g. {"before": r0, "after": r1}). Plots need matplotlib; without it the
    report says so and the other files are written."""
    reports = _as_reports(reports)
    if not reports:
        raise InputError("write_report: no reports")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    (out / "judgments").mkdir(exist_ok=True)
    for name, report in reports.items():
        path = out / "judgments" / f"{file_name(name)}.jsonl"
        write_jsonl(path, report.records)
        if report.provenance:
            write_provenance(path, report.provenance, judge=report.judge)
        paths[f"judgments/{name}"] = path
    plot_files, plot_note = ({}, "plots were not requested")
    if plots:
        plot_files, plot_note = _write_plots(reports, out / "plots")
    paths.update(plot_files)
    doc = {
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics_help": METRIC_HELP,
        "judges": {name: report.to_dict() for name, report in reports.items()},
        "plots": {k: str(v.relative_to(out)) for k, v in plot_files.items()},
    }
    (out / "report.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", "utf-8")
    (out / "report.md").write_text(markdown_report(reports, plot_files, plot_note, out), "utf-8")
    paths["report.json"], paths["report.md"] = out / "report.json", out / "report.md"
    return paths


def file_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "judge"


def markdown_report(reports: dict[str, EvalReport], plot_files: dict, plot_note: str, out: Path) -> str:
    names = list(reports)
    first = reports[names[0]]
    lines = [
        "# Judge evaluation",
        "",
        f"Data: `{first.data or 'pairs given in Python'}`. Mode: {first.mode}. Ties: {first.ties}. "
        f"Every pair judged in both answer orders; 95% bootstrap intervals over pairs "
        f"({first.bootstrap} resamples, seed {first.seed}).",
        "",
        "| judge | spec | pairs | ties | seconds |",
        "|---|---|---:|---:|---:|",
    ]
    for name, r in reports.items():
        lines.append(f"| {name} | `{r.judge}` | {r.metrics['n']} | {r.metrics['n_ties']} | {r.seconds:.1f} |")
    lines += ["", "## Metrics", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in METRIC_ORDER:
        lines.append(f"| {metric} | " + " | ".join(fmt_metric(reports[n].metrics, metric) for n in names) + " |")
    lines += ["", "What they measure: " + "; ".join(f"**{k}** {v}" for k, v in METRIC_HELP.items()) + "."]
    subsets = sorted({s for r in reports.values() for s in r.by_subset})
    if subsets:
        lines += ["", "## Accuracy by subset", "", "| subset | pairs | " + " | ".join(names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for subset in subsets:
            n = next((r.by_subset[subset]["n"] for r in reports.values() if subset in r.by_subset), 0)
            cells = [fmt_metric(reports[name].by_subset.get(subset, {}), "accuracy") for name in names]
            lines.append(f"| {subset} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Outcomes by label", "", "Pair outcome: both orders agree on A or B, disagree "
              "(inconsistent), or at least one verdict unreadable.", ""]
    for name, r in reports.items():
        lines += [f"**{name}**", "", "| label | A | B | inconsistent | unparseable |", "|---|---:|---:|---:|---:|"]
        for label in ("A", "B", "tie"):
            if label in r.confusion:
                row = r.confusion[label]
                lines.append(f"| {label} | {row['A']} | {row['B']} | {row[INCONSISTENT]} | {row['unparseable']} |")
        lines.append("")
    probed = {n: r.probes for n, r in reports.items() if r.probes}
    if probed:
        lines += ["## Bias probes", "", "Flip rate: share of verdicts that picked the better answer and moved to the "
                  "manipulated one (position: share of pairs whose winner changes when the answers swap).", "",
                  "| probe | " + " | ".join(probed) + " |", "|---|" + "---:|" * len(probed)]
        rows = [("position", lambda p: p["position"]), ("verbosity", lambda p: p["verbosity"])]
        rows += [(f"injection: {k}", lambda p, k=k: p["injection"][k]) for k in next(iter(probed.values()))["injection"]]
        for title, get in rows:
            cells = []
            for p in probed.values():
                item = get(p)
                base = item.get("eligible", item.get("pairs"))
                cells.append(f"{pct(item['flip_rate'])} ({item['flipped']}/{base})")
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        lines.append("")
    chosen = {n: r.selective for n, r in reports.items() if r.selective}
    if chosen:
        lines += ["## Selective judging", "", "The judge answers when max(P(A), P(B)) reaches the threshold and "
                  "abstains otherwise; the threshold keeps the error rate among answered pairs at most alpha with "
                  "probability >= 1 - delta (conj_lite.calibration).", "",
                  "| judge | alpha | delta | threshold | calibration pairs | calibration coverage / risk | "
                  "test pairs | test coverage | test risk |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, s in chosen.items():
            t = s["test"]
            thr = "none (abstain)" if s["threshold"] is None else f"{s['threshold']:g}"
            lines.append(f"| {n} | {s['alpha']:g} | {s['delta']:g} | {thr} | {s['n_calibration']} | "
                         f"{pct(s['coverage'])} / {pct(s['risk'])} | {t['n']} | {pct(t['coverage'])} | {pct(t['risk'])} |")
        lines += ["", f"Calibration: {next(iter(chosen.values()))['calibration_source']}.", ""]
    lines += ["## Plots", ""]
    if plot_files:
        for key, path in plot_files.items():
            lines.append(f"![{key}]({path.relative_to(out).as_posix()})")
    else:
        lines.append(f"No plots: {plot_note}.")
    lines += ["", "Per-pair judgments: `judgments/<judge>.jsonl`; all figures: `report.json`.", ""]
    return "\n".join(lines)


def _write_plots(reports: dict[str, EvalReport], plot_dir: Path) -> tuple[dict[str, Path], str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, "matplotlib is not installed (pip install matplotlib)"
    plot_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    names = list(reports)

    # Accuracy by subset (overall first), one bar per judge, 95% intervals as error bars.
    groups = ["overall"] + sorted({s for r in reports.values() for s in r.by_subset})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(names)) * 0.6 + 2), 3.6))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        r = reports[name]
        values, lows, highs = [], [], []
        for g in groups:
            m = r.metrics if g == "overall" else r.by_subset.get(g, {})
            v, ci = m.get("accuracy"), m.get("accuracy_ci")
            values.append(v if v is not None else 0.0)
            lows.append((v - ci[0]) if v is not None and ci else 0.0)
            highs.append((ci[1] - v) if v is not None and ci else 0.0)
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width, yerr=[lows, highs], capsize=3, label=name)
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (both orders)")
    ax.set_title("Accuracy by subset (95% CI)")
    if len(names) > 1:
        ax.legend()
    fig.tight_layout()
    files["accuracy_by_subset"] = plot_dir / "accuracy_by_subset.png"
    fig.savefig(files["accuracy_by_subset"], dpi=110)
    plt.close(fig)

    # Reliability diagram: accuracy against mean confidence per bin.
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0.5, 1.0], [0.5, 1.0], color="gray", linestyle=":", linewidth=1, label="perfect calibration")
    for name in names:
        r = reports[name]
        pts = [(b["confidence"], b["accuracy"], b["n"]) for b in r.reliability if b["n"]]
        if pts:
            ece = r.metrics.get("ece")
            label = f"{name} (ECE {ece:.3f})" if ece is not None else name
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.0)
    files["reliability"] = _save_plot(
        plt, fig, ax, plot_dir / "reliability.png", "Reliability diagram",
        "confidence max(P(A), P(B))", "accuracy of argmax",
    )

    curves = {n: r.selective["curve"] for n, r in reports.items() if r.selective and r.selective.get("curve")}
    if curves:
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        for name, curve in curves.items():
            ax.plot([c[1] for c in curve], [c[2] for c in curve], label=name)
            s = reports[name].selective
            ax.axhline(s["alpha"], color="gray", linestyle=":", linewidth=1)
            if s["test"]["coverage"]:
                ax.plot([s["test"]["coverage"]], [s["test"]["risk"] or 0.0], marker="*", markersize=12)
        files["risk_coverage"] = _save_plot(
            plt, fig, ax, plot_dir / "risk_coverage.png", "Risk-coverage (test pairs)",
            "coverage (share answered)", "error rate among answered",
        )
    return files, ""


def print_report(reports, console=None) -> None:
    """The metrics side by side as a rich table (and the probes when there are any)."""
    from rich.table import Table

    reports = _as_reports(reports)
    console = console or get_console()
    names = list(reports)
    first = reports[names[0]]
    table = Table(title=f"judge evaluation ({first.mode} mode, ties: {first.ties}; 95% CI)", header_style="bold")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for metric in METRIC_ORDER:
        table.add_row(metric, *[fmt_metric(reports[n].metrics, metric) for n in names])
    table.add_row("pairs", *[str(reports[n].metrics["n"]) for n in names])
    subsets = sorted({s for r in reports.values() for s in r.by_subset})
    for subset in subsets:
        table.add_row(f"accuracy: {subset}", *[fmt_metric(reports[n].by_subset.get(subset, {}), "accuracy")
                                              for n in names])
    if any(r.probes for r in reports.values()):
        for key, title in (("position", "position flips"), ("verbosity", "verbosity flips")):
            table.add_row(title, *[pct(r.probes[key]["flip_rate"]) if r.probes else "-" for r in reports.values()])
        table.add_row("injection flips", *[pct(r.probes["injection"]["overall"]["flip_rate"]) if r.probes else "-"
                                           for r in reports.values()])
    if any(r.selective for r in reports.values()):
        def sel(r):
            if not r.selective:
                return "-"
            t = r.selective["test"]
            return f"cover {pct(t['coverage'])}, risk {pct(t['risk'])}"
        table.add_row("selective (test)", *[sel(r) for r in reports.values()])
    console.print(table)


def _save_plot(plt, fig, ax, path, title: str, xlabel: str, ylabel: str):
    """Label, legend, write and close one figure; returns its path."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
