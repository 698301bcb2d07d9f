"""Does the Con-J loop teach a real model? SmolLM2-135M-Instruct before vs after.

Trains on real pairs (Anthropic HH harmless, MIT, from ../shared/data) and judges, in
both answer orders, pairs never trained on: a held-out split of the same source, and
LLMBar Natural (100 pairs) for transfer. Per variant (conj, rise) and seed: one Con-J
round with the embedded default recipe (smollm2-135m_cpu) on the training split, then
the packaged GGUF and the same GGUF + the trained LoRA (llama.cpp's LoRA converter) are
judged in verdict mode (the same weights on both sides; only training differs). Reports accuracy,
consistency, position bias and the unparseable rate with 95% bootstrap intervals, the
accuracy gain with its paired interval, and the time of each stage.

    python benchmarks/real_learnability.py --seeds 0 1 2 --variants conj rise \
        --train 48 --test 100 --out runs/real-learnability
    python benchmarks/real_learnability.py --render runs/real-learnability/results.json

Runs resume: a finished variant/seed (its eval JSON exists) is not run again. Runs made
on another machine or in another session join the report with `--merge OLD_RESULTS.json`
(e.g. docs/benchmarks/real_learnability.json): its rows for variant/seeds not run here
are kept, provided the base judge scored exactly the same on the same sets (the same
data, split and judge), else the merge is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from conj_lite.data import load_pairs, write_pairs_jsonl  # noqa: E402
from conj_lite.relevance import pair_chars  # noqa: E402
from conj_lite.export import convert_lora_to_gguf  # noqa: E402
from conj_lite.judging import Judge, evaluate  # noqa: E402
from conj_lite.judging.evaluation import paired_gain  # noqa: E402
from conj_lite.artifacts import TRAIN_META  # noqa: E402
from conj_lite.packaged import BASE_GGUF  # noqa: E402
from conj_lite.pipeline import JUDGMENTS, SAMPLED_FROM, WARMUP, ConjRun  # noqa: E402
from conj_lite.sampling import TOO_LONG  # noqa: E402
from conj_lite.system import usable_cpus  # noqa: E402
from conj_lite.training import recorded_template  # noqa: E402
from conj_lite.variants import variant_overrides  # noqa: E402
from report import write_section  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
HH = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
LLMBAR = SHARED / "llmbar" / "Dataset" / "LLMBar" / "Natural" / "dataset.json"
RECIPE = "smollm2-135m_cpu"
METRICS = ("accuracy", "consistency", "position_bias", "unparseable_rate", "accuracy_prob")
TITLE = "The real model learning: SmolLM2-135M-Instruct, one Con-J round (benchmarks/real_learnability.py)"


def short_pairs(pairs, max_chars: int) -> list:
    """Labelled pairs whose question and answers are short enough for a quick CPU run."""
    return [p for p in pairs if p.label in ("A", "B")
            and len(p.question) + len(p.answer_a) + len(p.answer_b) <= max_chars]


def split(pairs, n_train: int, n_test: int, seed: int = 0) -> tuple[list, list]:
    """Disjoint train/test splits, in a seeded order independent of the file's."""
    ranked = sorted(pairs, key=lambda p: hashlib.blake2b(f"{seed}|{p.id}".encode(), digest_size=8).digest())
    if n_train + n_test > len(ranked):
        raise SystemExit(f"only {len(ranked)} usable pairs for {n_train} + {n_test}")
    return ranked[:n_train], ranked[n_train:n_train + n_test]


def hh_split(n_test: int, max_chars: int) -> tuple[list, list]:
    """(train, held-out) HH harmless pairs whose question and answers fit in `max_chars`:
    the split the learning curve and the supervised ceiling share."""
    hh = [p for p in load_pairs(HH, skip_invalid=True).pairs if p.label in ("A", "B") and pair_chars(p) <= max_chars]
    return split(hh, len(hh) - n_test, n_test)


def judge_sets(base_gguf: Path, lora_gguf: Path | None, sets: dict, work: Path, template=None,
               n_ctx: int = 2048) -> dict:
    """Judge every set in verdict mode on the base GGUF, with the trained LoRA applied
    at run time when given (its recorded template then rules). The packaged GGUF holds
    exactly the weights the HF directory was dequantized from, so before and after differ
    only by the adapter. The base is asked in the trained judge's format (`template`):
    after an empty rationale, or for the verdict alone when training dropped rationales."""
    out = {}
    judge = Judge.from_gguf(base_gguf, lora_path=lora_gguf, template=template, mode="verdict", n_ctx=n_ctx)
    try:
        for name, pairs in sets.items():
            start = time.perf_counter()
            report = evaluate(judge, pairs, mode="verdict", bootstrap=1000, name=name,
                              records_path=work / f"{name}.records.jsonl")
            out[name] = {"metrics": report.metrics, "seconds": time.perf_counter() - start,
                         "records": [r for r in report.records]}
    finally:
        judge.close()
    return out


def run_one(variant: str, seed: int, train_file: Path, sets: dict, out: Path, extra: list[str]) -> dict:
    work = out / f"{variant}-seed{seed}"
    result_path = work / "eval.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    overrides = [f"data.path={train_file}", "data.heldout=0", f"sampling.seed={seed}", f"training.seed={seed}",
                 f"filtering.seed={seed}", "export.enabled=false", *extra]
    run = ConjRun.from_recipe(RECIPE, work, [*variant_overrides(variant), *overrides])
    reuse_base_samples(out / f"conj-seed{seed}", work / WARMUP if run.recipe.warmup.enabled else None)
    times = {}
    start = time.perf_counter()
    if run.recipe.warmup.enabled:
        run.warmup()
        times["warmup"] = time.perf_counter() - start
    for stage in ("sample", "filter", "train"):
        t = time.perf_counter()
        getattr(run, stage)(1)
        times[stage] = time.perf_counter() - t
    stats = json.loads((work / "stats.json").read_text())
    t = time.perf_counter()
    lora = convert_lora_to_gguf(run.final_adapter(), work / "adapter.gguf", run.base_model())
    times["lora_to_gguf"] = time.perf_counter() - t
    t = time.perf_counter()
    judged = judge_sets(Path(run.base_model()) / BASE_GGUF, lora, sets, work)
    times["eval"] = time.perf_counter() - t
    result = {"variant": variant, "seed": seed, "times": times, "stats": stats, "judged": judged}
    result_path.write_text(json.dumps(result, indent=1))
    return result


def reuse_base_samples(donor: Path, dest: Path | None) -> None:
    """RISE's warm-up samples the base model exactly as the Con-J run of the same seed did
    (same model, data, settings and seed): start from those judgments. The stage's own
    provenance check still decides; a mismatch is moved aside and sampled anew."""
    if dest is None or not (donor / SAMPLED_FROM).is_file() or (dest / JUDGMENTS).exists():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in (JUDGMENTS, TOO_LONG, SAMPLED_FROM):
        if (donor / name).is_file():
            shutil.copy2(donor / name, dest / name)


def mean_p1(records: list[dict]) -> float:
    """Mean P(answer 1 is better) over both orders: how hard the judge leans to position 1."""
    values = [r[k] for r in records for k in ("p1_ab", "p1_ba") if r.get(k) is not None]
    return sum(values) / len(values)


def train_summary(work: Path) -> dict:
    """The DPO stage's own before/after on its training pairs (loss, reward margin, pair accuracy)."""
    meta = work / "adapter" / TRAIN_META
    return json.loads(meta.read_text())["summary"] if meta.is_file() else {}


def summarize(base: dict, runs: list[dict], out: Path) -> dict:
    rows = []
    for r in runs:
        row = {"variant": r["variant"], "seed": r["seed"], "times": r["times"],
               "dpo_pairs": r["stats"].get("dpo_pairs", r["stats"].get("pairs")),
               "train": train_summary(out / f"{r['variant']}-seed{r['seed']}")}
        for name, judged in r["judged"].items():
            row[name] = {m: judged["metrics"].get(m) for m in METRICS}
            row[name].update({f"{m}_ci": judged["metrics"].get(f"{m}_ci") for m in METRICS})
            row[name]["gain"] = paired_gain(base[name]["records"], judged["records"])
            row[name]["consistency_change"] = judged["metrics"]["consistency"] - base[name]["metrics"]["consistency"]
            row[name]["mean_p1"] = mean_p1(judged["records"])
        rows.append(row)
    return {"base": {name: {m: v["metrics"].get(m) for m in METRICS}
                     | {f"{m}_ci": v["metrics"].get(f"{m}_ci") for m in METRICS}
                     | {"mean_p1": mean_p1(v["records"])} for name, v in base.items()},
            "runs": rows}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def ci(x) -> str:
    return "" if not x else f" [{100 * x[0]:.1f}, {100 * x[1]:.1f}]"


def render(results: dict) -> str:
    meta, summary = results["meta"], results["summary"]
    base = summary["base"]
    commands = "; ".join(f"`{c}`" for c in meta.get("commands") or [meta["command"]])
    lines = [f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']}, "
             f"trl {meta['trl']}. Command{'s' if ';' in commands else ''}: {commands}.", "",
             f"Each run: one round of recipe `{RECIPE}` (variant conj, or rise = SFT warm-up on the base model's own "
             f"correct judgments, then the round) on {meta['n_train']} HH-RLHF harmless pairs; the base and each "
             f"trained judge then judge {meta['n_test']} held-out HH pairs and LLMBar Natural ({meta['n_llmbar']} "
             "pairs, transfer) in both orders, verdict mode, on the packaged Q4_1 GGUF (+ the run's LoRA as a GGUF "
             "LoRA). Accuracy is per order; intervals are 95% bootstrap over pairs; gain = after − before, paired "
             "bootstrap. Answer-1 rate = verdicts for the answer shown first; mean P(1) = the verdict token's "
             "probability of answer 1, over both orders.", "",
             "| judge | set | accuracy | gain (pts) | consistency | Δ consistency (pts) | answer-1 rate | mean P(1) "
             "| unparseable |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in base.items():
        lines.append(f"| base | {name} | {pct(m['accuracy'])}{ci(m['accuracy_ci'])} | – | {pct(m['consistency'])}"
                     f"{ci(m['consistency_ci'])} | – | {pct(m['position_bias'])} | {m['mean_p1']:.3f} | "
                     f"{pct(m['unparseable_rate'])} |")
    for r in summary["runs"]:
        for name in base:
            m, g = r[name], r[name]["gain"]
            lines.append(
                f"| {r['variant']} seed {r['seed']} | {name} | {pct(m['accuracy'])}{ci(m['accuracy_ci'])} | "
                f"{100 * g['gain']:+.1f} [{100 * g['ci'][0]:+.1f}, {100 * g['ci'][1]:+.1f}] | "
                f"{pct(m['consistency'])}{ci(m['consistency_ci'])} | {100 * m['consistency_change']:+.1f} | "
                f"{pct(m['position_bias'])} | {m['mean_p1']:.3f} | {pct(m['unparseable_rate'])} |")
    lines += ["", "| run | DPO pairs | steps | on its training pairs: pair accuracy, reward margin (before → after) | "
              "time per stage (s) |", "|---|---:|---:|---|---|"]
    for r in summary["runs"]:
        tr, t = r.get("train") or {}, r["times"]
        b, a = tr.get("before", {}), tr.get("after", {})
        fit = (f"{b.get('accuracy', float('nan')):.2f} → {a.get('accuracy', float('nan')):.2f}, "
               f"{b.get('margin', float('nan')):.3f} → {a.get('margin', float('nan')):.3f}") if tr else "–"
        stages = ", ".join(f"{k} {v:.0f}" for k, v in t.items())
        lines.append(f"| {r['variant']} seed {r['seed']} | {r['dpo_pairs']} | {tr.get('steps', '–')} | {fit} | "
                     f"{stages} |")
    for note in meta.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def merge(results: dict, old: dict, variants: list[str], source: str) -> dict:
    """`results` plus the runs of `old` (a results JSON) for variant/seeds not in
    `results`; refused unless both scored the base judge identically on the same sets."""
    new_base, old_base = results["summary"]["base"], old["summary"]["base"]
    sizes = ("n_train", "n_test", "n_llmbar")
    if new_base != old_base or any(results["meta"].get(k) != old["meta"].get(k) for k in sizes):
        differ = sorted(k for k in set(new_base) | set(old_base) if new_base.get(k) != old_base.get(k))
        raise SystemExit(f"{source}: made on other data or another base judge (base scores differ on "
                         f"{', '.join(differ) or 'nothing'}; sizes {[old['meta'].get(k) for k in sizes]} vs "
                         f"{[results['meta'].get(k) for k in sizes]}); not merged")
    have = {(r["variant"], r["seed"]) for r in results["summary"]["runs"]}
    kept = [r for r in old["summary"]["runs"] if (r["variant"], r["seed"]) not in have]
    order = {v: i for i, v in enumerate(dict.fromkeys([*(r["variant"] for r in old["summary"]["runs"]), *variants]))}
    runs = sorted([*kept, *results["summary"]["runs"]], key=lambda r: (order[r["variant"]], r["seed"]))
    meta = dict(results["meta"])
    meta["commands"] = [*(old["meta"].get("commands") or [old["meta"]["command"]]), meta.pop("command")]
    meta["merged"] = {"from": source, "runs": [f"{r['variant']} seed {r['seed']}" for r in kept]}
    meta["notes"] = [*old["meta"].get("notes", []), *meta.get("notes", [])]
    return {"meta": meta, "summary": {"base": new_base, "runs": runs}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/real-learnability")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["conj", "rise"])
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--max-chars", type=int, default=900, help="longest question + answers (characters)")
    parser.add_argument("--llmbar", type=int, default=100, help="LLMBar Natural pairs to judge (0: none)")
    parser.add_argument("--render", metavar="RESULTS_JSON", help="only render a results file into docs/benchmarks.md")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--merge", metavar="RESULTS_JSON",
                        help="keep this earlier results file's runs for the variant/seeds not run here")
    parser.add_argument("--note", action="append", default=[], help="a line printed under the tables (repeatable)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run (section.key=value)")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        print(f"wrote {write_section(TITLE, render(results), results, 'real_learnability.json')}")
        return 0
    import torch
    import transformers
    import trl

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hh = short_pairs(load_pairs(HH, skip_invalid=True, rejects_path=out / "hh-rejects.jsonl").pairs, args.max_chars)
    train, test = split(hh, args.train, args.test)
    train_file = write_pairs_jsonl(train, out / "train.jsonl")
    write_pairs_jsonl(test, out / "heldout.jsonl")  # for other benchmarks on the trained adapters (lora_agreement)
    sets = {"hh_heldout": test}
    if args.llmbar:
        sets["llmbar_natural"] = load_pairs(LLMBAR).pairs[: args.llmbar]
    probe = ConjRun.from_recipe(RECIPE, out / "base", [f"data.path={train_file}", "data.heldout=0", *args.overrides])
    base_path = out / "base" / "eval.json"
    if base_path.is_file():
        base = json.loads(base_path.read_text())
    else:
        base = judge_sets(Path(probe.base_model()) / BASE_GGUF, None, sets, out / "base",
                          template=recorded_template(probe.recipe))
        base_path.write_text(json.dumps(base, indent=1))
    runs = [run_one(v, s, train_file, sets, out, args.overrides) for v in args.variants for s in args.seeds]
    results = {
        "meta": {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {usable_cpus()} CPU cores, no GPU",
                 "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                 "command": "python benchmarks/real_learnability.py " + " ".join(argv or sys.argv[1:]),
                 "n_train": runs[0]["stats"]["labelled_pairs"] if runs else len(train), "n_test": len(test),
                 "n_llmbar": len(sets.get("llmbar_natural", []))},
        "summary": summarize(base, runs, out),
    }
    results["meta"]["notes"] = list(args.note)
    if args.merge:
        results = merge(results, json.loads(Path(args.merge).read_text()), args.variants, args.merge)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(render(results))
    if not args.no_docs:
        print(f"wrote {write_section(TITLE, render(results), results, 'real_learnability.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
