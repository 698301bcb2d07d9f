"""Learnability: one Con-J round on a synthetic task teaches the tiny judge a rule.

    python benchmarks/learnability.py                 # conj and the controls swapped, hint_lost
    python benchmarks/learnability.py --variants conj --no-write

A synthetic pairwise task with a decidable right answer (the question states a fact;
the right answer restates it, the wrong one contradicts it), a base judge that writes
the format and follows hints but judges at chance (it always picks answer 1), one Con-J
round through the real pipeline (sample -> filter -> train), and `conj-lite eval`'s
metrics before and after on held-out pairs (see conj_lite/synthetic.py). Two ablations
show the check can fail: "swapped" trains on chosen/rejected swapped, "hint_lost" loses
the hint during sampling. (benchmarks/variants.py runs the recipe variants through the
same check.) Writes the "Learnability" section of docs/benchmarks.md and
docs/benchmarks/learnability.json; tests/test_learnability.py asserts the threshold
that separates the variants.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, today, versions, write_section  # noqa: E402

from conj_lite.synthetic import (  # noqa: E402
    AFTER_MIN,
    GAIN_MIN,
    CONTROLS,
    RECIPE_OVERRIDES,
    VARIANTS,
    learnability_check,
    right_and_wrong,
    synthetic_pairs,
)

DESCRIPTIONS = {
    "conj": "Con-J as shipped",
    "swapped": "chosen and rejected swapped before training",
    "hint_lost": "hint lost during sampling (the reference release's bug)",
}


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ci(m: dict, name: str) -> str:
    c = m.get(f"{name}_ci")
    return f"{pct(m[name])} [{100 * c[0]:.1f}, {100 * c[1]:.1f}]" if c else pct(m[name])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["conj", *CONTROLS], choices=VARIANTS)
    parser.add_argument("--n-train", type=int, default=160)
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    work = Path(args.work or tempfile.mkdtemp(prefix="conj-lite-learnability-"))
    results, before = {}, None
    start = time.perf_counter()
    for variant in args.variants:
        result = learnability_check(work / variant, variant=variant, n_train=args.n_train, n_test=args.n_test,
                                    seed=args.seed, before=before)
        before = result.pop("before_report")
        result.pop("after_report")
        results[variant] = result
        print(f"{variant}: accuracy {pct(result['before']['accuracy'])} -> {pct(result['after']['accuracy'])} "
              f"(gain {100 * result['gain']:+.1f} points), DPO pairs {result['stats']['dpo_pairs']}, "
              f"seconds {result['seconds']}", flush=True)
    total = time.perf_counter() - start
    if args.no_write:
        return 0

    first = next(iter(results.values()))
    b = first["before"]
    rows = []
    for variant, r in results.items():
        a, kinds = r["after"], r["stats"]["dpo_pairs_by_kind"]
        pairs = f"{r['stats']['dpo_pairs']} ({kinds['repeat']} repeat, {kinds['unknown']} unknown, {kinds['hint']} hint)"
        rows.append(f"| {variant}: {DESCRIPTIONS[variant]} | {pairs} | {ci(a, 'accuracy')} | "
                    f"**{100 * r['gain']:+.1f}** | {pct(a['consistency'])} | {pct(a['position_bias'])} | "
                    f"{r['seconds']['run'] - r['seconds']['train']:.0f} + {r['seconds']['train']:.0f} |")
    stats = first["stats"]
    hint = stats["hint_follow_rate"]
    conj = results.get("conj")
    verdict = ""
    if conj is not None:
        others = [v for v in results if v != "conj"]
        worst_other = max((results[v]["after"]["accuracy"] for v in others), default=None)
        verdict = (f"Con-J gains **{100 * conj['gain']:+.1f} points** (target ≥ +15). The slow test "
                   f"(`tests/test_learnability.py`, Con-J variant) asserts gain ≥ +{100 * GAIN_MIN:.0f} points and "
                   f"accuracy after ≥ {100 * AFTER_MIN:.0f}%")
        if worst_other is not None:
            verdict += (f"; the best ablation ends at {pct(worst_other)}, so the test fails if chosen and rejected "
                        "are swapped or the hint is lost")
        verdict += "."
    example = synthetic_pairs(1)[0]
    question, right, wrong = right_and_wrong(example)
    training = {k.split("=")[0].split(".")[1]: k.split("=")[1] for k in RECIPE_OVERRIDES if k.startswith("training.")}
    body = f"""
Date: {today()}. Machine: {machine()}. Versions: {versions('torch', 'transformers', 'trl', 'peft')}.
Command: `python benchmarks/learnability.py` ({total / 60:.1f} minutes for {len(results)} variants, seed {args.seed}).

Task (`conj_lite/synthetic.py`): the question states a fact and asks whether it is true ("{question}"); the
right answer confirms it ("{right}"), the wrong one contradicts it ("{wrong}"); counts, colours and cities;
the right answer in slot A for exactly half the pairs. {first['n_train']} training pairs, {first['n_test']}
held-out pairs whose questions never occur in training; a short judge prompt (`synthetic.TEMPLATE`).

Base judge: the default tiny model (2.6M parameters) warmed up {first['base_spec']['steps']} more steps on the
task's prompts (`synthetic.base_judge`): it writes the judgment JSON, follows hints
({pct(hint.get('hint_true'))} / {pct(hint.get('hint_reverse'))} of the true / reversed hint samples in the Con-J
run), and on plain prompts always picks answer 1: accuracy {pct(b['accuracy'])}, position bias
{pct(b['position_bias'])}, consistency {pct(b['consistency'])}.

One Con-J round through `ConjRun` (sample → filter → train; `synthetic.RECIPE_OVERRIDES`: 2 repeats + 1 true
hint + 1 reversed hint per pair and order at temperature 1.0; DPO + SFT with LoRA r={training['lora_r']},
lr {training['learning_rate']}, {training['epochs']} epochs, batch {training['batch_size']}), then `evaluate` on
the held-out pairs in rationale mode (the merged model; 95% bootstrap CI over pairs).

| variant | DPO pairs | accuracy after | gain (points) | consistency | position bias | seconds (sample etc. + train) |
|---|---:|---:|---:|---:|---:|---:|
| base judge (before) | – | {ci(b, 'accuracy')} | – | {pct(b['consistency'])} | {pct(b['position_bias'])} | – |
{chr(10).join(rows)}

{verdict}

This is one seed. Over five seeds at the same budget (the next section) Con-J reached ≥ 97.5% on three and
stalled on two (50.0%, 66.7%); the slow test runs seed 0.

Reading it: the base judge's repeated samples almost never disagree, so nearly all contrastive pairs come from
hint-driven sampling; without the hint (hint_lost) there is next to nothing to train on, and with the pairs
swapped the judge learns the opposite rule. The cue is deliberately one a 2-layer model can pick up: the check
measures whether the loop carries the labels into the judge, not the judge's reasoning. The harder "wrong
value" version of the task (`wrong="value"`: "Mira has 4 lamps." for "How many lamps does Mira have?") needs a
comparison across the prompt that this model does not learn at CPU scale (300 steps of full supervised
fine-tuning stayed at 50%).
"""
    raw = {"date": today(), "machine": machine(), "args": vars(args), "seconds": total,
           "gain_min": GAIN_MIN, "after_min": AFTER_MIN, "results": results}
    path = write_section("Learnability: one Con-J round on a synthetic task", body, raw, "learnability.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
