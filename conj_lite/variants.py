"""Named recipe variants: Con-J, its close relatives, and the paper's ablations.

Each variant is a handful of recipe overrides on the one pipeline, so any recipe can
run any of them:

    conj-lite run tiny-cpu --out runs/rise --variant rise
    conj-lite run tiny-cpu --out runs/rise warmup.source=positives   # the same
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]
    summary: str


VARIANTS = {
    v.name: v
    for v in (
        Variant("conj", (), "Con-J: repeated + hint-driven sampling, DPO + alpha*SFT, one round"),
        Variant("rise", ("warmup.source=positives",),
                "RISE two-stage: SFT warm-up on the base model's correct judgments (positions swapped), "
                "then DPO + SFT on pairs sampled from the warmed-up model"),
        Variant("iterative", ("rounds=2",),
                "two Con-J rounds: round 2 samples from, and continues, the round-1 adapter"),
        Variant("untrained", ("rounds=0",), "the untrained judge (the 'before' row)"),
        Variant("no_hint", ("sampling.hints=false",), "without hint-driven sampling: pairs from repeated samples only"),
        Variant("no_dpo", ("training.objective=sft",), "without DPO: SFT on the positive (chosen) judgments only"),
        Variant("no_sft", ("training.objective=dpo",), "without the SFT term: DPO alone"),
        Variant("verdict_only", ("filtering.rationale=false",),
                "verdict-only judgments: training targets without a rationale"),
    )
}


def variant_overrides(name: str | None) -> tuple[str, ...]:
    """The recipe overrides of a named variant (none for None)."""
    if name is None:
        return ()
    if name not in VARIANTS:
        raise InputError(f"--variant {name!r}: expected one of {', '.join(VARIANTS)}")
    return VARIANTS[name].overrides
