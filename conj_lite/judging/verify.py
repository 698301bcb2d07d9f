"""Export verification: does each GGUF file judge like the model that was trained?

    report = verify_export(merged_dir, {"q8_0": path, ...}, n=20, reference=adapter_dir)
    report.files["q8_0"]["agreement"], report.files["q8_0"]["max_p_diff"]

The reference is what training produced: base + LoRA adapter in full precision through
transformers (the merged model only when the export source was a whole model). Comparing
with the merged model would hide what merging lost. The reference and every GGUF judge
the same pairs in verdict mode; the report gives the verdict agreement and the largest
and mean |P(A) difference|.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import PreferencePair, load_pairs
from ..tiny import FACTS
from .judge import Judge


@dataclass
class VerifyReport:
    """The trained model (base + adapter, or the merged model) vs each GGUF (verdict mode)."""

    pairs: int
    files: dict[str, dict]  # type -> {"agreement", "max_p_diff", "mean_p_diff"}
    reference: str = ""  # what the GGUFs were compared with

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
                  reference: str | Path | None = None, console=None) -> VerifyReport:
    """Judge `n` pairs with the reference (`reference`: the adapter directory, judged as
    base + adapter; default the merged model) and with each GGUF; compare verdicts and P(A)."""
    if pairs is None:
        pairs = default_verify_pairs(n)
    elif isinstance(pairs, (str, Path)):
        pairs = load_pairs(pairs, limit=n).pairs
    pairs = list(pairs)[:n]
    source = reference or merged_dir
    judge = Judge.from_hf(source)
    ref = [judge.compare(p.question, p.answer_a, p.answer_b, mode="verdict") for p in pairs]
    judge.close()
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
    return VerifyReport(len(pairs), out, str(source))


def print_verify(report: VerifyReport, console) -> None:
    from rich.table import Table

    table = Table(title=f"verify: {report.reference or 'the merged model'} (transformers) vs GGUF on {report.pairs} pairs "
                        "(verdict mode)", header_style="bold")
    for column in ("file", "verdict agreement", "max |ΔP(A)|", "mean |ΔP(A)|"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for qtype, row in report.files.items():
        table.add_row(qtype, f"{100 * row['agreement']:.0f}%", f"{row['max_p_diff']:.4f}", f"{row['mean_p_diff']:.4f}")
    console.print(table)
