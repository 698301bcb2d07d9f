"""The Python API of a Con-J run, shared by the CLI and the notebooks.

    from conj_lite.pipeline import ConjRun
    run = ConjRun.from_recipe("recipes/tiny-cpu.yaml", out_dir="runs/tiny")
    run.sample(); run.filter(); run.train(); run.export()   # or run.run_all()

Everything lands in `out_dir`: judgments.jsonl, pairs.jsonl, stats.json, adapter/,
(merged/, gguf/). A stage whose outputs are complete is skipped, and sampling and
training resume where they stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import Recipe, load_recipe, save_recipe
from .errors import InputError
from .progress import get_console, quiet_libraries

JUDGMENTS = "judgments.jsonl"
PAIRS = "pairs.jsonl"
STATS = "stats.json"
ADAPTER = "adapter"


def resolve_data_path(path: str, recipe_file: str | Path | None) -> str:
    """Relative data paths are read from the working directory, else next to the
    recipe or its parent (so a repo recipe finds the repo's data/ from anywhere)."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists() or recipe_file is None:
        return path
    base = Path(recipe_file).resolve().parent
    for root in (base, base.parent):
        if (root / candidate).exists():
            return str(root / candidate)
    return path


@dataclass
class ConjRun:
    recipe: Recipe
    out_dir: Path
    recipe_file: str | None = None
    console: object = field(default_factory=get_console)
    _data: object = field(default=None, repr=False)
    _base: str | None = field(default=None, repr=False)

    @classmethod
    def from_recipe(cls, recipe: str | Path | Recipe | None, out_dir: str | Path, overrides=(), console=None) -> "ConjRun":
        if isinstance(recipe, Recipe):
            loaded, source = recipe, None
        else:
            loaded, source = load_recipe(recipe, overrides), (str(recipe) if recipe else None)
        run = cls(loaded, Path(out_dir), source, console or get_console())
        run.out_dir.mkdir(parents=True, exist_ok=True)
        quiet_libraries()
        save_recipe(run.recipe, run.out_dir / "recipe.yaml")
        return run

    # ------------------------------------------------------------------ inputs

    @property
    def template(self):
        from .prompts import load_template

        return load_template(self.recipe.prompts.template)

    def data(self):
        """The preference pairs (cached), ties included."""
        if self._data is None:
            from .data import load_pairs

            d = self.recipe.data
            self._data = load_pairs(
                resolve_data_path(d.path, self.recipe_file),
                preset="fields" if d.fields else d.preset,
                fields=d.fields or None,
                label_map=d.label_map or None,
                split=d.split,
                skip_invalid=d.skip_invalid,
                rejects_path=self.out_dir / "rejects.jsonl",
                limit=d.limit,
            )
            result = self._data
            msg = f"data: {len(result.pairs)} pairs from {d.path}"
            if result.n_ties:
                msg += f", {result.n_ties} ties (kept out of training)"
            if result.n_rejected:
                msg += f", {result.n_rejected} rejected rows in {result.rejects_path}"
            self.console.print(msg)
        return self._data

    def base_model(self) -> str:
        """The base model path; builds the tiny local model on first use."""
        if self._base is None:
            from .models import resolve_model_path

            if self.recipe.model.name_or_path == "tiny":
                self.console.print("model: tiny local Llama (built once, then cached)")
            self._base = resolve_model_path(self.recipe, progress=self._build_progress())
        return self._base

    def _build_progress(self):
        state = {}

        def report(step, total, loss):
            if "ctx" not in state:
                from .progress import stage_progress

                state["ctx"] = stage_progress("tiny model", self.console, unit="steps")
                state["bar"] = state["ctx"].__enter__()
                state["task"] = state["bar"].add_task("format warm-up", total=total)
            state["bar"].update(state["task"], completed=step, status=f"loss {loss:.3f}")
            if step == total:
                state.pop("ctx").__exit__(None, None, None)

        return report

    # ------------------------------------------------------------------ stages

    def sample(self):
        """S1: judgments.jsonl (resumable)."""
        from .sampling import JudgmentFile, plan_requests, row_key

        path = self.out_dir / JUDGMENTS
        pairs = self.data().pairs
        done = {row_key(r) for r in JudgmentFile(path).load()}
        if not plan_requests(pairs, self.template, self.recipe.sampling, done):
            self.console.print(f"sample: {len(done)} judgments already in {path}, skipping")
            return None
        from .models import load_for_sampling, resolve_runtime, set_cpu_threads
        from .sampling import sample_judgments

        set_cpu_threads()
        runtime = resolve_runtime(self.recipe.model)
        model, tokenizer = load_for_sampling(self.base_model(), self.recipe.model, runtime)
        summary = sample_judgments(model, tokenizer, pairs, self.template, self.recipe.sampling, path, self.console)
        self.console.print(
            f"sample: {summary.generated} new judgments in {summary.seconds:.1f}s "
            f"({summary.per_second:.2f}/s), {summary.total} in {path}"
        )
        return summary

    def filter(self):
        """S2: pairs.jsonl + stats.json from the judgments."""
        from .filtering import build_pairs
        from .sampling import JudgmentFile

        pairs = self.data().pairs  # bad data is reported before anything else
        judgments = JudgmentFile(self.out_dir / JUDGMENTS).load()
        if not judgments:
            raise InputError(f"{self.out_dir / JUDGMENTS}: no judgments; run `conj-lite sample` first")
        result = build_pairs(pairs, judgments, self.template, self.recipe.filtering)
        pairs_path = self.out_dir / PAIRS
        tmp = pairs_path.with_suffix(".jsonl.partial")
        tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.pairs), "utf-8")
        tmp.replace(pairs_path)
        (self.out_dir / STATS).write_text(json.dumps(result.stats, indent=2))
        print_stats(result.stats, self.console)
        return result

    def filter_is_current(self) -> bool:
        stats, judgments = self.out_dir / STATS, self.out_dir / JUDGMENTS
        return (
            stats.is_file()
            and (self.out_dir / PAIRS).is_file()
            and judgments.is_file()
            and stats.stat().st_mtime >= judgments.stat().st_mtime
        )

    def train(self):
        """S3: adapter/ (resumes from checkpoints)."""
        from .models import set_cpu_threads
        from .training import TRAIN_META, train_adapter

        if (self.out_dir / ADAPTER / TRAIN_META).is_file():
            self.console.print(f"train: adapter already in {self.out_dir / ADAPTER}, skipping")
            return None
        set_cpu_threads()
        summary = train_adapter(self.recipe, self.base_model(), self.out_dir / PAIRS, self.out_dir, self.console)
        b, a = summary.before, summary.after
        self.console.print(
            f"train: {summary.steps} steps in {summary.seconds:.1f}s ({summary.path}); "
            f"reward margin {b.get('margin', float('nan')):.4f} -> {a.get('margin', float('nan')):.4f}, "
            f"pair accuracy {b.get('accuracy', float('nan')):.2f} -> {a.get('accuracy', float('nan')):.2f}; "
            f"adapter in {summary.adapter_dir}"
        )
        return summary

    def export(self):
        """S4: merged/ and gguf/ (see conj_lite.export)."""
        from . import export as export_mod

        e = self.recipe.export
        return export_mod.export_gguf(
            self.out_dir / ADAPTER,
            self.out_dir,
            outtype=e.outtype,
            quant_types=tuple(e.quant_types),
            llama_cpp_dir=e.llama_cpp_dir,
            verify=e.verify,
            ollama_modelfile=e.ollama_modelfile,
            console=self.console,
        )

    def run_all(self, export: bool | None = None):
        """All stages in order, skipping the complete ones."""
        self.sample()
        if self.filter_is_current():
            self.console.print(f"filter: {self.out_dir / PAIRS} is up to date, skipping")
        else:
            self.filter()
        self.train()
        if self.recipe.export.enabled if export is None else export:
            return self.export()
        return None


def print_stats(stats: dict, console) -> None:
    from rich.table import Table

    table = Table(title="Con-J filtering", show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    rows = [
        ("pairs in data", stats["pairs_in_data"]),
        ("ties excluded", stats["ties_excluded"]),
        ("judgments", stats["judgments"]),
        ("unknown-verdict rate", pct(stats["unknown_rate"])),
        ("base agreement with labels", pct(stats["base_agreement"])),
        ("  among parsed verdicts", pct(stats["base_agreement_parsed"])),
        *[(f"  order {o}", pct(v)) for o, v in stats["base_agreement_by_order"].items()],
        *[(f"hint followed ({k})", pct(v)) for k, v in stats["hint_follow_rate"].items()],
        ("examples (pair x order)", stats["examples"]),
        ("examples without a DPO pair", stats["examples_without_pair"]),
        ("DPO pairs", stats["dpo_pairs"]),
        *[(f"  {k}", v) for k, v in stats["dpo_pairs_by_kind"].items()],
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
