"""Selective judging: abstain when the judge is not confident enough to meet a risk level.

    conj-lite judge --model judge.gguf --data pairs.jsonl --output out.jsonl \\
        --risk 0.1 --calibration calibration.jsonl

`--calibration` is a labelled data file (any format `conj_lite.data` reads), judged
here with the same judge and mode, or a judgments JSONL that already holds `p_a` and
`label` per pair (the output of `conj-lite judge --data ... --output`, or the
`judgments/*.jsonl` of `conj-lite eval`), which skips the judging. From it
`conj_lite.calibration.risk_threshold` picks the confidence threshold that keeps the
error rate among accepted judgments at most alpha with probability >= 1 - delta; each
judged record then gets

    "confidence": max(p_a, 1 - p_a),
    "selective_verdict": "A" | "B" | "abstain",    (A/B from p_a)
    "risk_threshold": the threshold (null when none could be certified).

The judge command (conj_lite.cli.judge) calls, in this order:
    add_risk_args(parser)                      when building its parser (conj_lite.cli.options)
    threshold = threshold_from_args(args, judge, console)   None without --risk
    record = mark_record(record, threshold)    for a single pair, or
    mark_file(path, threshold, console)        after judge_file wrote --output
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import fingerprint_id
from ..data import load_pairs
from ..errors import InputError
from ..jsonio import iter_jsonl_objects, read_jsonl, write_jsonl
from .batch import judge_pairs, judge_provenance, read_provenance
from .calibration import DEFAULT_DELTA, RiskThreshold, confidence, predicted_label, risk_threshold, scored

ABSTAIN = "abstain"


def check_risk_args(args) -> bool:
    """Whether selective judging is on; InputError for inconsistent options."""
    risk, calibration = getattr(args, "risk", None), getattr(args, "calibration", None)
    if risk is None and calibration is None:
        return False
    if risk is None:
        raise InputError("--calibration needs --risk ALPHA (the largest acceptable error rate, e.g. 0.1)")
    if calibration is None:
        raise InputError("--risk needs --calibration FILE: labelled pairs to calibrate the threshold on")
    if not 0.0 < risk < 1.0:
        raise InputError(f"--risk must be between 0 and 1 (an error rate such as 0.1), got {risk}")
    delta = getattr(args, "delta", DEFAULT_DELTA)
    if not 0.0 < delta < 1.0:
        raise InputError(f"--delta must be between 0 and 1, got {delta}")
    return True


# ---------------------------------------------------------------- calibration data


def read_judged(path: str | Path) -> list[dict] | None:
    """The rows of a judgments JSONL with p_a and label per row; None when `path` is not one."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return None
    rows = []
    try:
        for _, row in iter_jsonl_objects(path):
            if "p_a" not in row or "label" not in row:
                return None
            rows.append(row)
    except InputError:  # not JSON objects throughout: a data file, not judgments
        return None
    return rows or None


def calibration_records(judge, source, *, mode: str | None = None, preset: str = "auto", cache: str | Path | None = None,
                        console=None) -> list[dict]:
    """Judged records ({"p_a", "label", ...}) for the calibration split: one per pair of
    `source`, made by this judge setup.

    `source` is a judgments JSONL (used as it is, unless its fingerprint names another
    judge setup: refused), a data file (judged with `judge`, into `cache` when given,
    so an interrupted run resumes; a cache made by another judge setup is set aside,
    and rows of other calibration pairs in it are not used), or a list of
    PreferencePair records."""
    mode = mode or getattr(judge, "mode", "rationale")
    provenance = judge_provenance(judge, mode)
    if isinstance(source, (str, Path)):
        judged = read_judged(source)
        if judged is not None:
            modes = {row.get("mode") for row in judged} - {None}
            if modes and modes != {mode}:
                raise InputError(f"{source}: calibration judgments were made in mode {sorted(modes)}, "
                                 f"but this judge runs in mode {mode!r}; calibrate in the same mode")
            fid = fingerprint_id(provenance)
            meta = read_provenance(source)
            marks = {row.get("fingerprint") for row in judged} - {None}
            if judge is not None and ((meta is not None and meta.get("fingerprint") != fid) or marks - {fid}):
                raise InputError(f"{source}: these calibration judgments were made by another judge setup "
                                 f"(fingerprint {meta.get('fingerprint') if meta else sorted(marks)[0]}, this judge "
                                 f"is {fid}); a threshold calibrated on one judge says nothing about another: pass "
                                 "the labelled data file as --calibration to judge it with this judge")
            return judged
        pairs = load_pairs(source, preset=preset).pairs
    else:
        pairs = list(source)
    if cache is None:
        return judge_pairs(judge, pairs, mode, console=console, name="calibration", stage="judge",
                           provenance=provenance)
    return judge_pairs(judge, pairs, mode, records_path=cache, console=console, name=Path(cache).name, stage="judge",
                       on_mismatch="replace", provenance=provenance)


def threshold_from_records(records: list[dict], alpha: float, delta: float = DEFAULT_DELTA) -> RiskThreshold:
    confs, correct = scored([r.get("p_a") for r in records], [r.get("label") for r in records])
    if not confs:
        raise InputError("the calibration split has no pair labelled A or B with a probability; "
                         "selective judging needs labelled pairs (ties do not count)")
    return risk_threshold(confs, correct, alpha, delta)


def threshold_from_args(args, judge, console=None) -> RiskThreshold | None:
    """The risk threshold for `conj-lite judge --risk ALPHA --calibration FILE` (None
    without --risk). Calibration judgments of a data file are cached next to
    --output as `<output>.calibration.jsonl`."""
    if not check_risk_args(args):
        return None
    output = getattr(args, "output", None)
    cache = Path(output).with_suffix(".calibration.jsonl") if output else None
    records = calibration_records(judge, args.calibration, mode=getattr(args, "mode", None),
                                  preset=getattr(args, "calibration_preset", "auto"), cache=cache, console=console)
    threshold = threshold_from_records(records, args.risk, getattr(args, "delta", DEFAULT_DELTA))
    if console is not None:
        console.print(describe(threshold), highlight=False)
    return threshold


def describe(threshold: RiskThreshold) -> str:
    head = f"selective judging: risk <= {threshold.alpha:g} with probability >= {1 - threshold.delta:g}"
    if threshold.threshold is None:
        return (f"{head}: no confidence threshold can be certified from {threshold.n_calibration} calibration "
                "pairs; every pair abstains (use more calibration pairs or a larger --risk)")
    risk = "n/a" if threshold.risk is None else f"{100 * threshold.risk:.1f}%"
    return (f"{head}: answer when confidence >= {threshold.threshold:g}; on the {threshold.n_calibration} "
            f"calibration pairs that answers {100 * threshold.coverage:.1f}% with {risk} errors")


# ---------------------------------------------------------------- marking judgments


def mark_record(record: dict, threshold: RiskThreshold | None) -> dict:
    """The record with confidence, selective_verdict (A, B or abstain) and risk_threshold."""
    if threshold is None:
        return record
    p_a = record.get("p_a")
    out = dict(record)
    if p_a is None:
        out.update(confidence=None, selective_verdict=ABSTAIN, risk_threshold=threshold.threshold)
        return out
    conf = confidence(p_a)
    out.update(
        confidence=round(conf, 6),
        selective_verdict=predicted_label(p_a) if threshold.accepts(conf) else ABSTAIN,
        risk_threshold=threshold.threshold,
    )
    return out


def mark_file(path: str | Path, threshold: RiskThreshold | None, console=None) -> dict | None:
    """Add the selective fields to every record of a judgments JSONL (rewritten in
    place, atomically); returns and prints coverage (and the error rate among answered
    pairs when the records carry labels)."""
    if threshold is None:
        return None
    path = Path(path)
    marked = [mark_record(row, threshold) for row in read_jsonl(path)]
    write_jsonl(path, marked)
    answered = [row for row in marked if row["selective_verdict"] != ABSTAIN]
    labelled = [row for row in answered if row.get("label") in ("A", "B")]
    summary = {
        "pairs": len(marked),
        "answered": len(answered),
        "coverage": len(answered) / len(marked) if marked else None,
        "risk": (sum(row["selective_verdict"] != row["label"] for row in labelled) / len(labelled)) if labelled else None,
        "threshold": threshold.threshold,
    }
    if console is not None:
        risk = "" if summary["risk"] is None else f"; error rate among answered labelled pairs {100 * summary['risk']:.1f}%"
        cover = 0.0 if summary["coverage"] is None else 100 * summary["coverage"]
        console.print(f"selective judging: answered {summary['answered']} of {summary['pairs']} pairs "
                      f"({cover:.1f}%), abstained on the rest{risk}", highlight=False)
    return summary
