"""Where does the real model learn? Learning curves of SmolLM2-135M-Instruct.

Held-out accuracy, consistency and the answer-1 rate against the training examples
seen (an example = one pair in one answer order), both orders, 95% intervals, for:

  conj   the Con-J round as `conj-lite run` trains it: sample (hint-driven and repeated
         judgments) -> filter -> DPO + alpha*SFT (conj_lite.training, TRL)
  sft    the supervised ceiling on the same pairs: `training.objective=sft` on the
         correct verdicts (the chosen side of the same DPO pairs), same steps
  rise   RISE's two stages in the same budget: the SFT warm-up for half the examples,
         then DPO + alpha*SFT continuing that adapter for the other half

on two tasks built from real data:

  relevance  each question's own reply against a reply to another question
             (data.task=relevance on the shipped HH harmless single-turn file)
  hh         HH-RLHF harmless preferences (../shared, the chosen vs the rejected reply)

Every trained judge is judged on the relevance held-out pairs, the HH held-out pairs and
LLMBar Natural (transfer, never trained on), verdict mode, both orders, on the packaged
Q4_1 GGUF with the run's LoRA as a GGUF LoRA (the same weights training saw).

Per task and seed, the base model samples judgments once for the largest budget's pairs
(the pool); each budget trains a fresh adapter for `budget` examples on the pool's first
pairs in the seeded training order (conj_lite.training.training_order), with the full
learning-rate schedule of a run of that length. Finished runs are kept (their eval.json)
and skipped when the command is run again.

    python benchmarks/learning_curve.py --task relevance --budgets 64 256 1024 --seeds 0 \\
        --out runs/curve [section.key=value ...]
    python benchmarks/learning_curve.py --render runs/curve/results.json   # docs + PNG
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from conj_lite.config import load_recipe  # noqa: E402
from conj_lite.data import load_pairs, write_pairs_jsonl  # noqa: E402
from conj_lite.export import convert_lora_to_gguf  # noqa: E402
from conj_lite.jsonio import read_jsonl, write_jsonl  # noqa: E402
from conj_lite.packaged import BASE_GGUF  # noqa: E402
from conj_lite.pipeline import PAIRS, ConjRun  # noqa: E402
from conj_lite.prompts import load_template  # noqa: E402
from conj_lite.relevance import pair_chars, relevance_split  # noqa: E402
from conj_lite.system import peak_rss_bytes, release_memory, reset_peak_rss, usable_cpus  # noqa: E402
from conj_lite.training import recorded_template, train_adapter  # noqa: E402
from conj_lite.warmup import sft_from_pairs  # noqa: E402
from real_learnability import LLMBAR, hh_split, judge_sets, mean_p1, paired_gain, split  # noqa: E402
from report import cpu_name, today, versions, write_section  # noqa: E402

RECIPE = "smollm2-135m_cpu"
HH_SINGLE = REPO / "data" / "hh_harmless_single_turn.jsonl.gz"
TITLE = "Learning curves: where SmolLM2-135M learns to judge (benchmarks/learning_curve.py)"
METHODS = ("conj", "sft", "rise")
METRICS = ("accuracy", "accuracy_prob", "consistency", "position_bias")
SET_NAMES = {"relevance": "relevance held-out", "hh": "HH held-out", "llmbar_natural": "LLMBar Natural"}


def task_data(task: str, n_test: int, max_chars: int, pool: int, seed: int) -> tuple[list, dict]:
    """(training pool, evaluation sets): the task's own held-out pairs, plus the other
    task's and LLMBar Natural for transfer. Held-out questions are never in a pool. A pool
    asked larger than the task's training pairs is all of them: a budget beyond them
    trains more than one pass (conj_lite.training.training_order, each pass in its own order)."""
    rel_train, rel_test = relevance_split(load_pairs(HH_SINGLE).pairs, n_test, seed=0, per_question=8,
                                          max_chars=max_chars)
    hh_train, hh_test = hh_split(n_test, max_chars)
    sets = {"relevance": rel_test, "hh": hh_test, "llmbar_natural": load_pairs(LLMBAR).pairs}
    train = rel_train if task == "relevance" else hh_train
    # a seeded order of the pool, so that each seed trains on its own draw of pairs
    train = sorted(train, key=lambda p: _rank(seed, p.id))
    return train[:pool], sets


def _rank(seed: int, pair_id: str) -> bytes:
    import hashlib

    return hashlib.blake2b(f"{seed}|{pair_id}".encode(), digest_size=8).digest()


def sample_pool(task: str, seed: int, pool: list, out: Path, overrides: list[str]) -> ConjRun:
    """The base model's judgments and the DPO pairs of the whole pool (one sampling)."""
    work = out / task / f"seed{seed}" / "pool"
    train_file = write_pairs_jsonl(pool, work.parent / "pool.jsonl")
    run = ConjRun.from_recipe(RECIPE, work, [f"data.path={train_file}", "data.heldout=0", "data.task=preference",
                                             "data.max_chars=null", f"sampling.seed={seed}", f"filtering.seed={seed}",
                                             f"training.seed={seed}", "export.enabled=false", *overrides])
    with run.cost("sample"):
        run.sample()
    if not run.filter_is_current():
        run.filter()
    return run


def train_one(run: ConjRun, method: str, budget: int, work: Path) -> dict:
    """One adapter: `budget` training examples (steps x batch x accumulation) of the pool.
    RISE spends the same budget in two stages: an SFT warm-up on the correct verdicts for
    half of it (work/warmup), then DPO + alpha*SFT continuing that adapter for the other
    half, on the same examples (the pool's judgments need no model: nothing to resample)."""
    if method == "rise":
        first = _train(run, "sft", budget // 2, work / "warmup")
        second = _train(run, run.recipe.training.objective, budget - budget // 2, work,
                        init_adapter=work / "warmup" / "adapter")
        return {**second, "seconds": first["seconds"] + second["seconds"],
                "peak_rss_gb": max(first["peak_rss_gb"], second["peak_rss_gb"]), "warmup": first}
    objective = {"conj": run.recipe.training.objective, "sft": "sft"}[method]
    return _train(run, objective, budget, work)


def _train(run: ConjRun, objective: str, budget: int, work: Path, init_adapter: Path | None = None) -> dict:
    t = run.recipe.training
    per_step = t.batch_size * t.grad_accum
    recipe = replace(run.recipe, training=replace(t, objective=objective, max_steps=max(1, budget // per_step)))
    data = run.out_dir / PAIRS
    if objective == "sft":
        data = write_jsonl(work / "sft.jsonl", sft_from_pairs(list(read_jsonl(run.out_dir / PAIRS))))
    release_memory()
    reset_peak_rss()
    start = time.perf_counter()
    summary = train_adapter(recipe, run.base_model(), data, work, init_adapter=init_adapter)
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": round(peak_rss_bytes() / 1e9, 2),
            "steps": summary.steps, "before": summary.before, "after": summary.after, "kept": summary.kept}


def run_one(run: ConjRun, method: str, budget: int, sets: dict, work: Path) -> dict:
    result_path = work / "eval.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    work.mkdir(parents=True, exist_ok=True)
    trained = train_one(run, method, budget, work)
    lora = convert_lora_to_gguf(work / "adapter", work / "adapter.gguf", run.base_model())
    start = time.perf_counter()
    judged = judge_sets(Path(run.base_model()) / BASE_GGUF, lora, sets, work, n_ctx=2048)
    result = {"method": method, "budget": budget, "train": trained, "judge_seconds": time.perf_counter() - start,
              "judged": judged}
    result_path.write_text(json.dumps(result, indent=1))
    return result


def base_scores(run: ConjRun, sets: dict, out: Path) -> dict:
    path = out / "base.json"
    if path.is_file():
        return json.loads(path.read_text())
    judged = judge_sets(Path(run.base_model()) / BASE_GGUF, None, sets, out / "base",
                        template=recorded_template(run.recipe), n_ctx=2048)
    path.write_text(json.dumps(judged, indent=1))
    return judged


def summarize(task: str, seed: int, base: dict, results: list[dict], stats: dict) -> list[dict]:
    rows = []
    for r in results:
        row = {"task": task, "seed": seed, "method": r["method"], "budget": r["budget"], "train": r["train"],
               "dpo_pairs_in_pool": stats.get("dpo_pairs")}
        for name, judged in r["judged"].items():
            m = judged["metrics"]
            row[name] = {k: m.get(k) for k in METRICS} | {f"{k}_ci": m.get(f"{k}_ci") for k in METRICS}
            row[name]["gain"] = paired_gain(base[name]["records"], judged["records"])
            row[name]["mean_p1"] = mean_p1(judged["records"])
        rows.append(row)
    return rows


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def ci(x) -> str:
    return "" if not x else f" [{100 * x[0]:.1f}, {100 * x[1]:.1f}]"


def kept_cell(train: dict) -> str:
    """Which step's adapter was judged: training.keep's choice (best: a window's last step)."""
    kept = train.get("kept") or {"step": train["steps"], "rule": "last"}
    return f"{kept['step']} ({'best window' if kept['rule'] == 'best' else 'last'})"


def render(results: dict) -> str:
    meta = results["meta"]
    lines = [f"{meta['date']}, {meta['machine']}, {meta['versions']}.", "",
             "Commands: " + "; ".join(f"`{c}`" for c in meta["commands"]) + ".", "",
             meta["setup"], "", "Base judge (untrained), verdict mode, both orders:", "",
             "| set | accuracy | both-order decision | consistency | answer-1 rate |", "|---|---|---|---|---|"]
    for name, m in results["base"].items():
        lines.append(f"| {SET_NAMES[name]} | {pct(m['accuracy'])}{ci(m['accuracy_ci'])} | "
                     f"{pct(m['accuracy_prob'])}{ci(m['accuracy_prob_ci'])} | {pct(m['consistency'])} | "
                     f"{pct(m['position_bias'])} |")
    lines += ["", "Trained judges (gain = after − before in per-order accuracy, paired bootstrap 95% interval):", "",
              "| task | method | examples seen | seed | set | accuracy | gain (pts) | both-order | consistency | "
              "answer-1 rate | adapter of step | train s | peak RSS GB |",
              "|---|---|---:|---:|---|---|---|---|---:|---:|---|---:|---:|"]
    for r in sorted(results["rows"], key=lambda r: (r["task"], r["method"], r["budget"], r["seed"])):
        for name in results["base"]:
            if name not in r:  # judged on fewer sets (--sets)
                continue
            m, g = r[name], r[name]["gain"]
            lines.append(
                f"| {r['task']} | {r['method']} | {r['budget']} | {r['seed']} | {SET_NAMES[name]} | "
                f"{pct(m['accuracy'])}{ci(m['accuracy_ci'])} | {100 * g['gain']:+.1f} [{100 * g['ci'][0]:+.1f}, "
                f"{100 * g['ci'][1]:+.1f}] | {pct(m['accuracy_prob'])} | {pct(m['consistency'])} | "
                f"{pct(m['position_bias'])} | {kept_cell(r['train'])} | {r['train']['seconds']:.0f} | "
                f"{r['train']['peak_rss_gb']:.2f} |")
    if meta.get("plot"):
        lines += ["", f"![learning curves]({meta['plot']})"]
    notes = [line for note in meta.get("notes", []) for line in ("", note)]  # a paragraph each
    return "\n".join(lines + notes) + "\n"


def plot(results: dict, path: Path) -> None:
    """Held-out accuracy against examples seen: one panel per evaluation set, a line per
    (task, method), the mean over seeds with each seed's point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in results["base"] if any(name in r for r in results["rows"])]  # the sets judged (--sets)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, name in zip(axes, names):
        ax.axhline(100 * results["base"][name]["accuracy"], color="grey", ls="--", lw=1, label="untrained")
        ax.axhline(50, color="grey", lw=0.5)
        lines = {}
        for r in (r for r in results["rows"] if name in r):
            lines.setdefault((r["task"], r["method"]), {}).setdefault(r["budget"], []).append(100 * r[name]["accuracy"])
        for (task, method), points in sorted(lines.items()):
            xs = sorted(points)
            means = [sum(points[x]) / len(points[x]) for x in xs]
            line, = ax.plot(xs, means, marker="o", label=f"trained on {task}: {method}")
            for x in xs:
                ax.scatter([x] * len(points[x]), points[x], color=line.get_color(), s=8, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_title(SET_NAMES[name])
        ax.set_xlabel("training examples seen (pair x order)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy, per order (%)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge_results(old: dict | None, new: dict) -> dict:
    """New rows replace old rows of the same (task, method, budget, seed); the base
    scores must be the same (the same sets and base judge)."""
    if old is None:
        return new
    if old["base"] != new["base"]:
        raise SystemExit("the earlier results scored the base judge differently (other sets or judge): not merged")
    key = lambda r: (r["task"], r["method"], r["budget"], r["seed"])  # noqa: E731
    fresh = {key(r) for r in new["rows"]}
    rows = [r for r in old["rows"] if key(r) not in fresh] + new["rows"]
    commands = list(dict.fromkeys(old["meta"]["commands"] + new["meta"]["commands"]))
    notes = list(dict.fromkeys(old["meta"].get("notes", []) + new["meta"].get("notes", [])))
    return {"meta": {**new["meta"], "commands": commands, "notes": notes}, "base": new["base"], "rows": rows}


def gpu_curve(model_dir: str, *, budget_s: float, work: Path, dry_run: bool, record) -> dict:
    """The curve at GPU budgets (issue 20, item 4; benchmarks/gpu_check.py --sections
    learning_curve): conj and the sft ceiling on the relevance task and on the HH
    single-turn preferences of the shipped file (the data that travels with the repo),
    judged by the transformers judge (no llama.cpp on the GPU machine), verdict mode, both
    orders, 100 held-out pairs per task. Larger budgets start only while the time left
    covers twice the last run's time; every point is recorded as soon as it exists."""
    from conj_lite.judging import Judge, evaluate

    start = time.perf_counter()
    budgets = (32, 64) if dry_run else (256, 1024, 4096)
    n_test = 8 if dry_run else 100
    sources = load_pairs(HH_SINGLE).pairs
    rel_train, rel_test = relevance_split(sources, n_test, seed=0, per_question=8, max_chars=600)
    hh = [p for p in sources if p.answer_a.strip() and p.answer_b.strip() and pair_chars(p) <= 600]
    hh_train, hh_test = split(hh, len(hh) - n_test, n_test)
    tasks = {"relevance": (rel_train, rel_test), "hh_single": (hh_train, hh_test)}
    overrides = [f"model.name_or_path={model_dir}", "filtering.rationale=false", "sampling.n_repeats=0",
                 "training.eval_pairs=0", "training.save_steps=100000", "export.enabled=false"]
    points, last = [], 0.0

    def judged(adapter, pairs, where: Path) -> dict:
        judge = Judge.from_hf(model_dir, adapter=adapter, mode="verdict",
                              template=replace(load_template("en"), rationale=False))
        try:
            report = evaluate(judge, pairs, mode="verdict", bootstrap=1000, records_path=where)
        finally:
            judge.close()
        return {k: report.metrics.get(k) for k in METRICS} | {f"{k}_ci": report.metrics.get(f"{k}_ci") for k in METRICS}

    for task, (train, test) in tasks.items():
        pool = write_pairs_jsonl(train[: (max(budgets) + 1) // 2], work / task / "pool.jsonl")
        run = ConjRun.from_recipe(RECIPE, work / task / "pool", [f"data.path={pool}", "data.heldout=0",
                                                                  "data.task=preference", *overrides])
        run.sample()
        run.filter()
        base = judged(None, test, work / task / "base.jsonl")
        record(**{f"{task}_base": base})
        for budget in budgets:
            for method in ("sft", "conj"):
                left = budget_s - (time.perf_counter() - start)
                if left < 2 * last:
                    record(stopped=f"{task} {method} {budget}: {left:.0f} s left, the last run took {last:.0f} s")
                    return {"points": points}
                t = time.perf_counter()
                dest = work / task / f"{method}-{budget}"
                trained = train_one(run, method, budget, dest)
                point = {"task": task, "method": method, "budget": budget, "train": trained,
                         "heldout": judged(dest / "adapter", test, dest / "heldout.jsonl")}
                last = time.perf_counter() - t
                point["seconds"] = round(last, 1)
                points.append(point)
                record(points=points)
    return {"points": points}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("relevance", "hh"), default="relevance")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["conj", "sft"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 256, 1024],
                        help="training examples seen (pair x order) per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--test", type=int, default=100, help="held-out pairs of each task")
    parser.add_argument("--max-chars", type=int, default=600, help="longest question + answers (characters)")
    parser.add_argument("--sets", nargs="+", choices=tuple(SET_NAMES), default=list(SET_NAMES),
                        help="the sets each trained judge is judged on (the base judge: all of them)")
    parser.add_argument("--out", default="runs/curve")
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--render", metavar="RESULTS_JSON", help="write docs/benchmarks.md and the PNG from a results file")
    parser.add_argument("--part", help="with --render: a section of its own, titled with this name (e.g. 'HH harmless')")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run (section.key=value)")
    args = parser.parse_args(argv)
    if args.render:
        # a part (say "HH harmless") is its own section and files beside the main curve's
        slug = "".join(c if c.isalnum() else "_" for c in args.part.lower()) if args.part else ""
        stem = "learning_curve" + (f"_{slug}" if slug else "")
        docs_png = REPO / "docs" / "benchmarks" / f"{stem}.png"
        results = json.loads(Path(args.render).read_text())
        results["meta"]["notes"] = list(dict.fromkeys(results["meta"].get("notes", []) + args.note))
        plot(results, docs_png)
        results["meta"]["plot"] = f"benchmarks/{stem}.png"
        title = f"{TITLE}: {args.part}" if args.part else TITLE
        print(f"wrote {docs_png} and {write_section(title, render(results), results, f'{stem}.json')}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(REPO / "conj_lite" / "recipes" / f"{RECIPE}.yaml", args.overrides)
    rows, base = [], None
    for seed in args.seeds:
        pool, sets = task_data(args.task, args.test, args.max_chars, (max(args.budgets) + 1) // 2, seed)
        run = sample_pool(args.task, seed, pool, out, args.overrides)
        base = base or base_scores(run, sets, out)
        stats = json.loads((run.out_dir / "stats.json").read_text())
        judged_sets = {name: pairs for name, pairs in sets.items() if name in args.sets}
        results = [run_one(run, method, budget, judged_sets, out / args.task / f"seed{seed}" / f"{method}-{budget}")
                   for budget in sorted(args.budgets) for method in args.methods]
        rows += summarize(args.task, seed, base, results, stats)
    t = recipe.training
    setup = (f"Recipe `{RECIPE}` with {' '.join(args.overrides) or 'no overrides'}: LoRA r={t.lora_r} on "
             f"{', '.join(t.target_modules)}, lr {t.learning_rate:g} ({t.lr_scheduler}), β {t.beta:g}, "
             f"α {t.alpha:g}, "
             f"{t.batch_size}×{t.grad_accum} examples per step, both orders of a pair in the same step: "
             f"{t.orders_together}; {recipe.model.dtype}, seeded LoRA start, adapter kept: {t.keep}"
             + (f" (best {t.keep_window} steps' pair accuracy, when beyond chance at {t.keep_level:g})" if t.keep == "best" else "")
             + f"; questions + answers ≤ {args.max_chars} characters; {args.test} held-out pairs "
             "per task (questions never trained on), LLMBar Natural (100) never trained on.")
    new = {"meta": {"date": today(), "machine": f"{cpu_name()}, {usable_cpus()} cores, no GPU",
                    "versions": versions("torch", "transformers", "trl", "peft", "llama_cpp_python"),
                    "commands": ["python benchmarks/learning_curve.py " + " ".join(argv if argv is not None else sys.argv[1:])],
                    "setup": setup, "notes": args.note},
           "base": {name: {k: v["metrics"].get(k) for k in METRICS} | {f"{k}_ci": v["metrics"].get(f"{k}_ci") for k in METRICS}
                    for name, v in base.items()},
           "rows": rows}
    results_path = out / "results.json"
    results = merge_results(json.loads(results_path.read_text()) if results_path.is_file() else None, new)
    results_path.write_text(json.dumps(results, indent=1))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
