"""Export verification: does each GGUF file judge like the merged model it came from?

    report = verify_export(merged_dir, {"q8_0": path, ...}, n=20)   # `conj-lite export --verify N`
    report.files["q8_0"]["agreement"], report.files["q8_0"]["max_p_diff"]

The merged transformers model and every GGUF judge the same pairs in verdict mode; the
report gives the verdict agreement and the largest and mean |P(A) difference|.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import PreferencePair, load_pairs
from ..tiny import FACTS
from .judge import Judge


@dataclass
class VerifyReport:
    """HF merged model vs each GGUF on the same pairs (verdict mode)."""

    pairs: int
    files: dict[str, dict]  # type -> {"agreement", "max_p_diff", "mean_p_diff"}

    def to_dict(self) -> dict:
        return asdict(self)


def default_verify_pairs(n: int):
    """N sanity pairs (the built-in facts, right answer alternating between A and B)."""
    pairs = []
    for i in range(n):
        question, good, bad = FACTS[i % len(FACTS)]
        a, b, label = (good, bad, "A") if i % 2 == 0 else (bad, good, "B")
        pairs.append(PreferencePair(id=f"verify-{i}", question=question, answer_a=a, answer_b=b, label=label))
    return pairs


def verify_export(merged_dir: Path, files: dict[str, Path], n: int, *, pairs=None, threads: int | None = None,
                  console=None) -> VerifyReport:
    """Judge `n` pairs with the merged HF model and with each GGUF; compare verdicts and P(A)."""
    if pairs is None:
        pairs = default_verify_pairs(n)
    elif isinstance(pairs, (str, Path)):
        pairs = load_pairs(pairs, limit=n).pairs
    pairs = list(pairs)[:n]
    reference = Judge.from_hf(merged_dir)
    ref = [reference.compare(p.question, p.answer_a, p.answer_b, mode="verdict") for p in pairs]
    reference.close()
    out = {}
    for qtype, path in files.items():
        judge = Judge.from_gguf(path, n_threads=threads)
        got = [judge.compare(p.question, p.answer_a, p.answer_b, mode="verdict") for p in pairs]
        judge.close()
        diffs = [abs(a.p_a - b.p_a) for a, b in zip(ref, got)]
        out[qtype] = {
            "agreement": sum(a.verdict == b.verdict for a, b in zip(ref, got)) / max(1, len(pairs)),
            "max_p_diff": max(diffs, default=0.0),
            "mean_p_diff": sum(diffs) / max(1, len(diffs)),
        }
    return VerifyReport(len(pairs), out)


def print_verify(report: VerifyReport, console) -> None:
    from rich.table import Table

    table = Table(title=f"verify: merged HF model vs GGUF on {report.pairs} pairs (verdict mode)", header_style="bold")
    for column in ("file", "verdict agreement", "max |ΔP(A)|", "mean |ΔP(A)|"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for qtype, row in report.files.items():
        table.add_row(qtype, f"{100 * row['agreement']:.0f}%", f"{row['max_p_diff']:.4f}", f"{row['mean_p_diff']:.4f}")
    console.print(table)
