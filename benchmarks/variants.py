"""Recipe variants on the learnability task: Con-J, RISE, iterative rounds, the ablations.

    python benchmarks/variants.py                       # every variant, seeds 0 to 4
    python benchmarks/variants.py --variants conj rise --seeds 0 --no-write

Every variant of `conj_lite.variants` runs the learnability check of
`conj_lite.synthetic` (the same base judge, training set, held-out set and training
budget per seed; only the variant's recipe switches differ) and is evaluated on the
held-out pairs. Writes the "Recipe variants" section of docs/benchmarks.md and
docs/benchmarks/variants.json: held-out accuracy, consistency, unparseable rate and
training time, as the mean and the spread over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, today, versions, write_section  # noqa: E402

from conj_lite.synthetic import RECIPE_OVERRIDES, learnability_check  # noqa: E402
from conj_lite.variants import VARIANTS  # noqa: E402


def spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """mean ± sd [min–max] of `values` (× scale)."""
    xs = [scale * v for v in values]
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return f"{mean:.{digits}f}"
    sd = statistics.stdev(xs)
    return f"{mean:.{digits}f} ± {sd:.{digits}f} [{min(xs):.{digits}f}–{max(xs):.{digits}f}]"


def median_range(values: list[float], digits: int = 0) -> str:
    """median [min–max]: training times on a shared machine have outliers."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def summarise(runs: list[dict]) -> dict:
    """The table's figures for one variant over its seeds."""
    def metric(name):
        return [r["after"][name] if r["after"][name] is not None else 0.0 for r in runs]

    examples = []
    for r in runs:
        last = r["stages"][-1] if r["stages"] else {}
        examples.append(last.get("stats", {}).get("dpo_pairs", 0))
    return {
        "accuracy": metric("accuracy"),
        "consistency": metric("consistency"),
        "unparseable_rate": metric("unparseable_rate"),
        "position_bias": metric("position_bias"),
        "train_seconds": [r["seconds"]["train"] for r in runs],
        "steps": [sum((s.get("train") or {}).get("steps", 0) for s in r["stages"]) for r in runs],
        "pairs_last_round": examples,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--n-train", type=int, default=160)
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--render", nargs="+", metavar="JSON",
                        help="only rewrite the docs section from raw results files (several: runs of other seeds, merged)")
    args = parser.parse_args(argv)
    if args.render:
        raw = merge_raw([json.loads(Path(path).read_text()) for path in args.render])
        print(f"wrote {write_section(TITLE, render(raw), raw, 'variants.json')}")
        return 0

    import torch

    torch.set_num_threads(2)
    work = Path(args.work or tempfile.mkdtemp(prefix="conj-lite-variants-"))
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    befores = []
    start = time.perf_counter()
    for seed in args.seeds:
        before = None
        for variant in args.variants:
            result = learnability_check(work / f"seed-{seed}" / variant, variant=variant, n_train=args.n_train,
                                        n_test=args.n_test, seed=seed, before=before, bootstrap=200)
            if before is None:
                befores.append(result["before"])
            before = result.pop("before_report")
            result.pop("after_report")
            runs[variant].append(result)
            print(f"seed {seed} {variant}: accuracy {100 * result['before']['accuracy']:.1f}% -> "
                  f"{100 * result['after']['accuracy']:.1f}%, train {result['seconds']['train']:.1f}s", flush=True)
    raw = {"date": today(), "machine": machine(), "versions": versions("torch", "transformers", "trl", "peft"),
           "args": vars(args), "seconds": time.perf_counter() - start,
           "summary": {v: summarise(rs) for v, rs in runs.items()}, "before": befores, "runs": runs}
    for v, s in raw["summary"].items():
        print(f"{v:13s} accuracy {spread(s['accuracy'])}  consistency {spread(s['consistency'])}  "
              f"train s {median_range(s['train_seconds'])}")
    if not args.no_write:
        print(f"wrote {write_section(TITLE, render(raw), raw, 'variants.json')}")
    return 0


TITLE = "Recipe variants on the learnability task"


def merge_raw(raws: list[dict]) -> dict:
    """One raw result from runs of different seeds (same variants and sizes)."""
    if len(raws) == 1:
        return raws[0]
    first = raws[0]
    variants = first["args"]["variants"]
    for raw in raws[1:]:
        same = {k: raw["args"][k] for k in ("variants", "n_train", "n_test")}
        if same != {k: first["args"][k] for k in ("variants", "n_train", "n_test")}:
            raise SystemExit("--render: the files differ in variants or sizes; they cannot be merged")
    runs = {v: [r for raw in raws for r in raw["runs"][v]] for v in variants}
    return {
        **first,
        "date": max(raw["date"] for raw in raws),
        "args": {**first["args"], "seeds": [s for raw in raws for s in raw["args"]["seeds"]]},
        "invocations": len(raws),
        "seconds": sum(raw["seconds"] for raw in raws),
        "summary": {v: summarise(rs) for v, rs in runs.items()},
        "before": [b for raw in raws for b in raw["before"]],
        "runs": runs,
    }


def render(raw: dict) -> str:
    """The docs section from the raw results."""
    args, befores, summary = raw["args"], raw["before"], raw["summary"]
    rows = [f"| base judge (before training) | {spread([b['accuracy'] for b in befores])} | "
            f"{spread([b['consistency'] for b in befores])} | {spread([b['unparseable_rate'] for b in befores])} | "
            f"{spread([b['position_bias'] for b in befores])} | – | – |"]
    for v, s in summary.items():
        rows.append(f"| `{v}`: {VARIANTS[v].summary} | {spread(s['accuracy'])} | {spread(s['consistency'])} | "
                    f"{spread(s['unparseable_rate'])} | {spread(s['position_bias'])} | "
                    f"{median_range(s['train_seconds'])} | {statistics.fmean(s['steps']):.0f} |")
    training = {k.split("=")[0].split(".")[1]: k.split("=")[1] for k in RECIPE_OVERRIDES if k.startswith("training.")}
    n = raw.get("invocations", 1)
    invocations = f", run as {n} invocations over the seeds and merged with `--render`" if n > 1 else ""
    per_seed = "\n".join(
        f"| `{v}` | " + " | ".join(f"{100 * r['after']['accuracy']:.1f}" for r in raw["runs"][v]) + " |"
        for v in summary)
    seed_header = " | ".join(f"seed {seed}" for seed in args["seeds"])
    return f"""
Date: {raw['date']}. Machine: {raw['machine']}. Versions: {raw.get('versions') or versions('torch', 'transformers', 'trl', 'peft')}.
Command: `python benchmarks/variants.py --seeds {' '.join(map(str, args['seeds']))}` ({raw['seconds'] / 60:.1f} minutes:
{len(args['variants'])} variants × {len(args['seeds'])} seeds{invocations}).

Every variant is `conj-lite run --variant NAME` (the overrides in `conj_lite/variants.py`) on the learnability
task of the section above: the same position-biased base judge (50%, always answer 1), {args['n_train']} synthetic
training pairs and {args['n_test']} held-out pairs per seed (the seed also drives sampling and training), the same
budget per training stage (`synthetic.RECIPE_OVERRIDES`: LoRA r={training['lora_r']}, lr
{training['learning_rate']}, {training['epochs']} epochs, batch {training['batch_size']}; RISE adds a one-epoch
SFT warm-up, `iterative` a second round). Held-out figures in percent, as mean ± standard deviation
[min–max] over the seeds; training time in seconds on 2 CPU cores, median [min–max] over the seeds, summed
over a variant's training stages; steps: mean over the seeds, all stages.

| variant | held-out accuracy | consistency | unparseable | position bias | train s | steps |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Held-out accuracy per seed:

| variant | {seed_header} |
|---|{'---:|' * len(args['seeds'])}
{per_seed}
"""


if __name__ == "__main__":
    sys.exit(main())
