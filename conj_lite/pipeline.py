"""The Python API of a Con-J run, shared by the CLI and the notebooks.

    from conj_lite.pipeline import ConjRun
    run = ConjRun.from_recipe("conj_lite/recipes/tiny-cpu.yaml", out_dir="runs/tiny")
    run.sample(); run.filter(); run.train(); run.export()   # or run.run_all()

Everything lands in `out_dir`: judgments.jsonl, pairs.jsonl, stats.json, adapter/,
(merged/, gguf/). A stage whose outputs are complete is skipped, and sampling and
training resume where they stopped.

Each stage records its inputs next to its outputs and is skipped or resumed only while
they are the same (issue 12): sampled_from.json (base model, adapter, template, data
identity, sampling settings), filtered_from.json (filtering settings, the judgments
file's identity), trained_from.json (the pairs file's identity, training settings, the
adapter it continues). A stage whose inputs changed is run again: it says which inputs
and why, and first moves its old outputs to `stale-<time>/` (kept, not deleted); the
stages after it then see their own inputs change and follow.

The variants are switches of the same path (see conj_lite.variants): a RISE warm-up
works in `warmup/` before round 1; with `rounds: N` round k > 1 works in `round-k/`
and samples from and continues round k-1's adapter; `rounds.json` sums them up.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import export as export_mod
from .artifacts import TRAIN_META, identity_changes, path_identity
from .config import POLICY_GGUF_TYPE, WARMUP_SOURCES, Recipe, find_recipe, load_recipe, save_recipe
from .data import heldout_split, load_pairs
from .errors import InputError
from .filtering import build_pairs
from .jsonio import read_json, write_json, write_jsonl
from .judging import Judge, evaluate
from .judging.evaluation import paired_gain
from .engines import choose_engine, engine_inputs, gguf_engine, open_engine, policy_gguf
from .models import import_unsloth_early, resolve_model_path, resolve_runtime, set_cpu_threads
from .packaged import PACKAGED
from .progress import get_console, quiet_libraries, stage_progress
from .prompts import load_template
from .relevance import pair_chars, relevance_split
from .sampling import TOO_LONG, JudgmentFile, load_too_long, plan_requests, round_trip_texts, row_key, sample_judgments
from .system import children_peak_rss_bytes, network_switches, peak_rss_bytes, release_memory, reset_peak_rss
from .training import kept_text, train_adapter
from .warmup import SFT_FILE, read_warmup_file, sft_from_pairs, warmup_from_judgments, warmup_stats, write_sft_file

JUDGMENTS = "judgments.jsonl"
PAIRS = "pairs.jsonl"
STATS = "stats.json"
ADAPTER = "adapter"
WARMUP = "warmup"
ROUNDS = "rounds.json"
SAMPLED_FROM = "sampled_from.json"
FILTERED_FROM = "filtered_from.json"
TRAINED_FROM = "trained_from.json"
STALE = "stale"
# What each stage writes into its work directory (moved aside together when stale).
SAMPLE_OUTPUTS = (JUDGMENTS, TOO_LONG, SAMPLED_FROM)
FILTER_OUTPUTS = (PAIRS, STATS, SFT_FILE, FILTERED_FROM)
TRAIN_OUTPUTS = (ADAPTER, "adapter.partial", "checkpoints", TRAINED_FROM)
HELDOUT = "heldout.json"
HELDOUT_DIR = "heldout"
COSTS = "costs.json"


def _plain(value):
    """`value` as it reads back from JSON (tuples as lists, paths as text)."""
    return json.loads(json.dumps(value, default=str))


def resolve_data_path(path: str, recipe_file: str | Path | None) -> str:
    """Relative data paths are read from the working directory, else next to the
    recipe or above it (so a shipped recipe, conj_lite/recipes/*.yaml, finds the
    repository's data/ from anywhere)."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists() or recipe_file is None:
        return path
    base = Path(recipe_file).resolve().parent
    for root in (base, base.parent, base.parent.parent):
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
    _heldout: list = field(default_factory=list, repr=False)
    _stale_dir: Path | None = field(default=None, repr=False)
    costs: list = field(default_factory=list, repr=False)

    @classmethod
    def from_recipe(cls, recipe: str | Path | Recipe | None, out_dir: str | Path, overrides=(), console=None,
                    offline_when_local: bool = False) -> "ConjRun":
        """A run of `recipe` into `out_dir`. Hugging Face telemetry is switched off; with
        `offline_when_local` (the command line: one run per process) the hub is set offline
        too when the model, data and warm-up source are all local (see system.network_switches)."""
        if isinstance(recipe, Recipe):
            loaded, source = recipe, None
        else:
            recipe = find_recipe(recipe)  # a path, or the name of a shipped recipe
            loaded, source = load_recipe(recipe, overrides), (str(recipe) if recipe else None)
        run = cls(loaded, Path(out_dir), source, console or get_console())
        run.out_dir.mkdir(parents=True, exist_ok=True)
        # Before the Hugging Face libraries are imported (unsloth, quiet_libraries): they read the switches once.
        r = run.recipe
        inputs = [r.model.name_or_path, resolve_data_path(r.data.path, run.recipe_file), r.warmup.source]
        network_switches(inputs if offline_when_local else None, local_names=("tiny", *PACKAGED, *WARMUP_SOURCES))
        import_unsloth_early(loaded.model)  # before quiet_libraries imports transformers
        quiet_libraries()
        save_recipe(run.recipe, run.out_dir / "recipe.yaml")
        return run

    # ------------------------------------------------------------------ inputs

    @property
    def template(self):
        """The judge template in the format this run trains: with `filtering.rationale:
        false` the judge writes the verdict alone, so it is sampled and judged that way too
        (sampling a rationale that training throws away would only cost time)."""
        return replace(load_template(self.recipe.prompts.template), rationale=self.recipe.filtering.rationale)

    def data(self):
        """The preference pairs (cached), ties included."""
        if self._data is None:
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
            if d.task == "relevance":
                sources = len(result.pairs)
                result.pairs, self._heldout = relevance_split(result.pairs, d.heldout, seed=d.seed,
                                                              per_question=d.pairs_per_question, max_chars=d.max_chars)
                msg = (f"data: {len(result.pairs)} relevance pairs (each question's own reply against another "
                       f"question's) built from {sources} pairs of {d.path}")
            else:
                if d.max_chars is not None:
                    result.pairs = [p for p in result.pairs if pair_chars(p) <= d.max_chars]
                result.pairs, self._heldout = heldout_split(result.pairs, d.heldout)
                msg = f"data: {len(result.pairs)} pairs from {d.path}"
            if self._heldout:
                msg += f" (+{len(self._heldout)} held out for the before/after check)"
            if result.n_ties:
                msg += f", {result.n_ties} ties (kept out of training)"
            if result.n_rejected:
                msg += f", {result.n_rejected} rejected rows in {result.rejects_path}"
            self.console.print(msg)
        return self._data

    def base_model(self) -> str:
        """The base model path; builds the tiny local model on first use."""
        if self._base is None:
            if self.recipe.model.name_or_path == "tiny":
                self.console.print("model: tiny local Llama (built once, then cached)")
            self._base = resolve_model_path(self.recipe, progress=self._build_progress(), console=self.console)
        return self._base

    def _build_progress(self):
        state = {}

        def report(step, total, loss):
            if "ctx" not in state:
                state["ctx"] = stage_progress("tiny model", self.console, unit="steps")
                state["bar"] = state["ctx"].__enter__()
                state["task"] = state["bar"].add_task("format warm-up", total=total)
            state["bar"].update(state["task"], completed=step, status=f"loss {loss:.3f}")
            if step == total:
                state.pop("ctx").__exit__(None, None, None)

        return report

    # ------------------------------------------------------------------ provenance

    def data_identity(self) -> dict:
        """The data file (path, size, digest) and the settings that read it."""
        d = self.recipe.data
        return {"file": path_identity(resolve_data_path(d.path, self.recipe_file)), "settings": asdict(d)}

    def model_identity(self) -> dict:
        r = self.recipe
        local = Path(r.model.name_or_path)
        return {"settings": asdict(r.model),
                "files": path_identity(local) if local.is_dir() else None,
                "template": self.template.to_dict(), "date_string": r.prompts.date_string}

    def sampling_inputs(self, adapter: Path | None) -> dict:
        sampling = asdict(self.recipe.sampling)
        sampling.pop("batch_size", None)  # judgments are seeded per judgment, not per batch
        sampling.pop("engine", None)  # recorded as the engine auto picks, with the files it runs
        kind = sampling.pop("gguf_type")  # the same: llama.cpp's GGUF "as" this type; nothing for transformers
        engine = choose_engine(self.recipe.sampling.engine, self.base_model())
        return _plain({"model": self.model_identity(), "adapter": path_identity(adapter),
                       "data": self.data_identity(), "sampling": sampling,
                       "engine": engine_inputs(engine, self.base_model(), adapter, kind)})

    def filter_inputs(self, work: Path) -> dict:
        return _plain({"judgments": path_identity(work / JUDGMENTS), "filtering": asdict(self.recipe.filtering),
                       "template": self.template.to_dict(), "objective": self.recipe.training.objective,
                       "data": self.data_identity()})

    def train_inputs(self, data: Path, recipe: Recipe, init_adapter: Path | None) -> dict:
        return _plain({"data": path_identity(data), "training": asdict(recipe.training),
                       "init_adapter": path_identity(init_adapter), "model": self.model_identity()})

    def stale_dir(self) -> Path:
        """Where this run moves outdated outputs: out_dir/stale-<time>/ (one per run)."""
        if self._stale_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target, n = self.out_dir / f"{STALE}-{stamp}", 1
            while target.exists():
                n += 1
                target = self.out_dir / f"{STALE}-{stamp}-{n}"
            self._stale_dir = target
        return self._stale_dir

    def set_aside(self, work: Path, names) -> Path | None:
        """Move the outputs `names` of `work` under stale-<time>/ (same relative layout)."""
        present = [work / name for name in names if (work / name).exists()]
        if not present:
            return None
        target = self.stale_dir() / work.relative_to(self.out_dir)
        target.mkdir(parents=True, exist_ok=True)
        for path in present:
            path.rename(target / path.name)
        return target

    def stage_changes(self, work: Path, record: str, inputs: dict) -> list[str] | None:
        """Why a stage's recorded inputs differ from `inputs` (None: no record at all)."""
        path = work / record
        if not path.is_file():
            return None
        before = read_json(path).get("inputs")
        if before is None:
            return [f"{record} does not record the inputs (written by an older conj-lite)"]
        return identity_changes(before, inputs)

    def redo_if_changed(self, work: Path, record: str, inputs: dict, names, stage: str, label: str,
                        has_outputs: bool) -> bool:
        """Set a stage's outputs aside when its inputs changed; True when it did."""
        if not has_outputs:
            return False
        changes = self.stage_changes(work, record, inputs)
        if changes == []:
            return False
        why = changes if changes is not None else [f"no {record} says what made them"]
        moved = self.set_aside(work, names)
        self.console.print(f"{stage} ({label}): inputs changed: {'; '.join(why)}; running it again "
                           f"(the old outputs are kept in {moved})", highlight=False)
        return True

    # ------------------------------------------------------------------ layout

    def round_dir(self, round: int = 1) -> Path:
        """Round 1 works in out_dir itself (the layout of a one-round run), round N in out_dir/round-N."""
        if round < 1:
            raise ValueError(f"rounds count from 1, got {round}")
        return self.out_dir if round == 1 else self.out_dir / f"round-{round}"

    def policy(self, round: int = 1) -> Path | None:
        """The adapter that round `round` samples from and continues training: the
        previous round's, the warm-up's for round 1, or None (the base model)."""
        if round > 1:
            return self.round_dir(round - 1) / ADAPTER
        if self.recipe.warmup.enabled:
            return self.out_dir / WARMUP / ADAPTER
        return None

    def final_adapter(self) -> Path | None:
        """The judge this recipe trains (None for the untrained judge, `rounds: 0`)."""
        if self.recipe.rounds >= 1:
            return self.round_dir(self.recipe.rounds) / ADAPTER
        return self.policy(1)

    # ------------------------------------------------------------------ stages

    def sample(self, round: int = 1):
        """S1: judgments.jsonl of a round (resumable), from the round's policy."""
        return self._sample(self.round_dir(round), self.policy(round), f"round {round}")

    def _sample(self, work: Path, adapter: Path | None, label: str):
        work.mkdir(parents=True, exist_ok=True)
        path = work / JUDGMENTS
        pairs = self.data().pairs
        inputs = self.sampling_inputs(adapter)
        done = {row_key(r) for r in JudgmentFile(path).load()}
        if self.redo_if_changed(work, SAMPLED_FROM, inputs, SAMPLE_OUTPUTS, "sample", label, bool(done)):
            done = set()
        max_prompt_tokens = self.recipe.model.max_seq_length - self.recipe.sampling.max_new_tokens
        if max_prompt_tokens < 1:
            raise InputError(f"sampling.max_new_tokens ({self.recipe.sampling.max_new_tokens}) leaves no room for a "
                             f"prompt in model.max_seq_length ({self.recipe.model.max_seq_length})")
        if not plan_requests(pairs, self.template, self.recipe.sampling, done, load_too_long(path, max_prompt_tokens)):
            self.console.print(f"sample ({label}): {len(done)} judgments already in {path}, skipping")
            return None
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise InputError(f"{adapter}: the adapter to sample from is missing; train the previous stage first")
        set_cpu_threads()
        base = self.base_model()
        record = {"model": base, "adapter": adapter and str(adapter), "inputs": inputs}
        write_json(work / SAMPLED_FROM, record)
        engine = open_engine(self.recipe.sampling.engine, base, adapter, self.recipe, console=self.console)
        try:
            write_json(work / SAMPLED_FROM, {**record, "policy": engine.policy()})  # the files it really runs
            engine.prepare(self.template, self.recipe.prompts.date_string, round_trip_texts(self.template, pairs))
            self.console.print(f"sample ({label}): from {engine.source} on {engine.name}", highlight=False)
            summary = sample_judgments(engine, pairs, self.template, self.recipe.sampling, path, self.console,
                                       max_prompt_tokens=max_prompt_tokens)
        finally:
            engine.close()  # nothing of sampling stays alive into training
        self.console.print(
            f"sample ({label}): {summary.generated} new judgments in {summary.seconds:.1f}s "
            f"({summary.per_second:.2f}/s), {summary.total} in {path}"
        )
        return summary

    def filter(self, round: int = 1):
        """S2: pairs.jsonl + stats.json of a round from its judgments (and sft.jsonl for
        the SFT-only objective)."""
        return self._filter(self.round_dir(round), f"round {round}")

    def _filter(self, work: Path, label: str):
        pairs = self.data().pairs  # bad data is reported before anything else
        judgments = JudgmentFile(work / JUDGMENTS).load()
        if not judgments:
            raise InputError(f"{work / JUDGMENTS}: no judgments; run `conj-lite sample` first")
        inputs = self.filter_inputs(work)
        self.redo_if_changed(work, FILTERED_FROM, inputs, FILTER_OUTPUTS, "filter", label, (work / PAIRS).is_file())
        result = build_pairs(pairs, judgments, self.template, self.recipe.filtering)
        write_jsonl(work / PAIRS, result.pairs)
        if self.recipe.training.objective == "sft":
            write_sft_file(sft_from_pairs(result.pairs), work / SFT_FILE)
        (work / STATS).write_text(json.dumps(result.stats, indent=2))
        write_json(work / FILTERED_FROM, {"inputs": inputs})
        print_stats(result.stats, self.console, f"Con-J filtering ({label})")
        return result

    def filter_is_current(self, round: int = 1) -> bool:
        """pairs.jsonl and stats.json exist and were made from today's judgments file with
        today's filtering settings (filtered_from.json); file times do not count."""
        work = self.round_dir(round)
        if not ((work / STATS).is_file() and (work / PAIRS).is_file() and (work / JUDGMENTS).is_file()):
            return False
        return self.stage_changes(work, FILTERED_FROM, self.filter_inputs(work)) == []

    def train(self, round: int = 1):
        """S3: a round's adapter/ (resumes from checkpoints), continuing from its policy."""
        work = self.round_dir(round)
        data = work / (SFT_FILE if self.recipe.training.objective == "sft" else PAIRS)
        return self._train(work, data, self.recipe, self.policy(round), f"round {round}")

    def _train(self, work: Path, data: Path, recipe: Recipe, init_adapter: Path | None, label: str):
        inputs = self.train_inputs(data, recipe, init_adapter)
        started = any((work / name).exists() for name in (ADAPTER, "adapter.partial", "checkpoints"))
        self.redo_if_changed(work, TRAINED_FROM, inputs, TRAIN_OUTPUTS, "train", label, started)
        record = work / TRAINED_FROM
        if (work / ADAPTER / TRAIN_META).is_file() and record.is_file() and read_json(record).get("complete"):
            self.console.print(f"train ({label}): adapter already in {work / ADAPTER}, skipping")
            return None
        set_cpu_threads()
        write_json(record, {"inputs": inputs, "complete": False})  # checkpoints resume only onto the same inputs
        summary = train_adapter(recipe, self.base_model(), data, work, self.console, init_adapter=init_adapter)
        write_json(record, {"inputs": inputs, "complete": True})
        b, a = summary.before, summary.after
        if summary.objective == "sft":
            measures = (f"SFT loss {b.get('loss', float('nan')):.4f} -> {a.get('loss', float('nan')):.4f}, "
                        f"token accuracy {b.get('token_accuracy', float('nan')):.2f} -> "
                        f"{a.get('token_accuracy', float('nan')):.2f}")
        else:
            measures = (f"reward margin {b.get('margin', float('nan')):.4f} -> {a.get('margin', float('nan')):.4f}, "
                        f"pair accuracy {b.get('accuracy', float('nan')):.2f} -> {a.get('accuracy', float('nan')):.2f}")
        if not (b or a):  # training.eval_pairs: 0
            measures = "last 8 steps: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.last_steps.items())
        self.console.print(
            f"train ({label}, {summary.objective}): {summary.steps} steps in {summary.seconds:.1f}s "
            f"({summary.path}); {measures}{kept_text(summary.kept)}; adapter in {summary.adapter_dir}",
            highlight=False,
        )
        return summary

    def warmup(self):
        """RISE stage 1: warmup/sft.jsonl of correct judgments (both orders), then an
        SFT-only adapter in warmup/adapter that round 1 samples from and continues."""
        w, f = self.recipe.warmup, self.recipe.filtering
        work = self.out_dir / WARMUP
        work.mkdir(parents=True, exist_ok=True)
        options = dict(max_chars=f.max_rationale_chars, rationale=f.rationale, swap_positions=w.swap_positions,
                       max_examples=w.max_examples, seed=f.seed)
        if w.source == "positives":
            self._sample(work, None, "warm-up")
            result = self._filter(work, "warm-up")
            examples = warmup_from_judgments(self.data().pairs, result.labelled, self.template, **options)
        else:
            examples = read_warmup_file(resolve_data_path(w.source, self.recipe_file), self.template, **options)
        write_sft_file(examples, work / SFT_FILE)
        stats = warmup_stats(examples)
        (work / "warmup.json").write_text(json.dumps(stats, indent=2))
        self.console.print(
            f"warm-up: {stats['examples']} correct judgments ({stats['verdict_1']} for answer 1, "
            f"{stats['verdict_2']} for answer 2) in {work / SFT_FILE}",
            highlight=False,
        )
        t = self.recipe.training
        recipe = replace(self.recipe, training=replace(
            t, objective="sft", epochs=w.epochs, max_steps=w.max_steps,
            learning_rate=t.learning_rate if w.learning_rate is None else w.learning_rate))
        return self._train(work, work / SFT_FILE, recipe, None, "warm-up")

    def export(self):
        """S4: merged/ and gguf/ of the final adapter (see conj_lite.export); with
        `rounds: 0` and no warm-up, of the untrained base model."""
        e = self.recipe.export
        source = self.final_adapter() or self.base_model()
        return export_mod.export_gguf(
            source,
            self.out_dir,
            outtype=e.outtype,
            quant_types=tuple(e.quant_types),
            llama_cpp_dir=e.llama_cpp_dir,
            verify=e.verify,
            ollama_modelfile=e.ollama_modelfile,
            # an adapter's own record (wording and judgment format) wins; the base gets the recipe's
            template=None if self.final_adapter() else self.recipe.prompts.template,
            console=self.console,
        )

    def heldout(self) -> list:
        """The pairs `data.heldout` keeps out of sampling and training."""
        self.data()
        return self._heldout

    def before_after(self) -> dict | None:
        """Judge the held-out pairs with the base model and with the final adapter (same
        weights, transformers, verdict mode, both orders) and write heldout.json."""
        pairs, adapter = self.heldout(), self.final_adapter()
        if not pairs or adapter is None:
            return None
        engine = gguf_engine(self.recipe.data.heldout_engine, self.base_model())
        # transformers: in the precision training used (bf16 on a CPU reads 2x faster than fp32)
        dtype = POLICY_GGUF_TYPE if engine == "llama.cpp" else (
            "bfloat16" if resolve_runtime(self.recipe.model).dtype == "bf16" else "float32")
        out = {"pairs": len(pairs), "mode": "verdict", "base": self.base_model(), "adapter": str(adapter),
               "engine": engine, "dtype": dtype}
        records = {}
        for name, with_adapter in (("before", None), ("after", adapter)):
            judge = self._heldout_judge(engine, with_adapter, dtype)
            try:
                report = evaluate(judge, pairs, mode="verdict", bootstrap=1000, name=name, console=self.console,
                                  records_path=self.out_dir / HELDOUT_DIR / f"{name}.jsonl")
            finally:
                judge.close()
            out[name], records[name] = report.metrics, report.records
        # the change with a paired interval: both judges scored on the same resampled pairs
        out["gain"] = {metric: paired_gain(records["before"], records["after"], metric, n_resamples=2000)
                       for metric in ("accuracy", "accuracy_prob")}
        write_json(self.out_dir / HELDOUT, out)
        print_before_after(out, self.console)
        return out

    def _heldout_judge(self, engine: str, adapter, dtype: str) -> Judge:
        """The verdict-mode judge of the held-out pairs: the base (+ adapter) through
        transformers, or on llama.cpp an f32 GGUF of the base with the adapter as a GGUF
        LoRA applied at run time (engines.policy_gguf: made once, cached)."""
        options = dict(template=self.template, mode="verdict", n_ctx=self.recipe.model.max_seq_length,
                       chat_date=self.recipe.prompts.date_string)
        if engine == "llama.cpp":
            gguf, lora, _ = policy_gguf(self.base_model(), Path(adapter) if adapter else None, self.recipe,
                                        self.console, setting="data.heldout_engine",
                                        instead="judge the held-out pairs with transformers")
            return Judge.from_gguf(gguf, lora_path=lora, **options)
        return Judge.from_hf(self.base_model(), adapter=adapter, dtype=dtype, **options)

    @contextmanager
    def cost(self, stage: str):
        """Record a stage's wall time and peak resident memory into `costs` (and
        costs.json); what the stage leaves behind is freed before the next one."""
        release_memory()
        windowed = reset_peak_rss()
        children = children_peak_rss_bytes()
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            peak = peak_rss_bytes()
            child = children_peak_rss_bytes()
            self.costs.append({"stage": stage, "seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2),
                               "child_peak_rss_gb": round(child / 1e9, 2) if child > children else None,
                               "peak_is_per_stage": windowed})
            write_json(self.out_dir / COSTS, {"stages": self.costs})
            release_memory()

    def run_all(self, export: bool | None = None):
        """All stages in order, skipping the complete ones: the warm-up (RISE), then
        `rounds` rounds of sample -> filter -> train, then export; ends with what each
        stage cost (time, peak memory)."""
        r = self.recipe
        self.costs = []
        if r.rounds == 0 and not r.warmup.enabled:
            self.console.print("rounds: 0, the untrained judge: nothing to sample or train")
        with self.cost("model + data"):
            self.base_model()
            self.data()
        if r.warmup.enabled:
            with self.cost("warm-up"):
                self.warmup()
        for n in range(1, r.rounds + 1):
            suffix = f" (round {n})" if r.rounds > 1 else ""
            with self.cost("sample" + suffix):
                self.sample(n)
            with self.cost("filter" + suffix):
                if self.filter_is_current(n):
                    self.console.print(f"filter (round {n}): {self.round_dir(n) / PAIRS} is up to date, skipping")
                else:
                    self.filter(n)
            with self.cost("train" + suffix):
                self.train(n)
        if r.rounds > 1 or r.warmup.enabled:
            print_rounds(self.round_summaries(), self.console)
        result = None
        if r.data.heldout:
            with self.cost("judge held-out"):
                self.before_after()
        if r.export.enabled if export is None else export:
            with self.cost("export"):
                result = self.export()
        print_costs(self.costs, self.console)
        return result

    def round_summaries(self) -> list[dict]:
        """Per stage (warm-up, round 1..N): where it sampled from, its filtering stats and
        its training summary, as far as they exist; also written to rounds.json."""
        stages = [("warm-up", self.out_dir / WARMUP)] if self.recipe.warmup.enabled else []
        stages += [(f"round {n}", self.round_dir(n)) for n in range(1, self.recipe.rounds + 1)]
        out = []
        for name, work in stages:
            entry = {"stage": name, "dir": str(work)}
            for key, path in (("sampled_from", work / SAMPLED_FROM), ("stats", work / STATS),
                              ("warmup", work / "warmup.json"), ("train", work / ADAPTER / TRAIN_META)):
                if path.is_file():
                    value = json.loads(path.read_text("utf-8"))
                    entry[key] = value.get("summary", value) if key == "train" else value
            out.append(entry)
        (self.out_dir / ROUNDS).write_text(json.dumps(out, indent=2))
        return out


def final_adapter_of(out_dir: str | Path) -> Path | None:
    """The adapter a finished run in `out_dir` trained last, read from its recipe.yaml:
    round-N/adapter for `rounds: N`, warmup/adapter for `rounds: 0` with a warm-up;
    None when out_dir holds no recipe (then out_dir/adapter is the one)."""
    out_dir = Path(out_dir)
    if not (out_dir / "recipe.yaml").is_file():
        return None
    recipe = load_recipe(out_dir / "recipe.yaml")
    if recipe.rounds >= 1:
        return (out_dir if recipe.rounds == 1 else out_dir / f"round-{recipe.rounds}") / ADAPTER
    return out_dir / WARMUP / ADAPTER if recipe.warmup.enabled else None


def print_rounds(summaries: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="Con-J stages", show_header=True, header_style="bold")
    for name in ("stage", "sampled from", "agreement", "unknown", "train examples", "steps", "after"):
        table.add_column(name, justify="left" if name in ("stage", "sampled from") else "right")

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    previous = None
    for entry in summaries:
        stats, train = entry.get("stats", {}), entry.get("train") or {}
        sampled = entry.get("sampled_from")
        source = "-" if sampled is None else (previous if sampled.get("adapter") else "base model")
        previous = entry["stage"]
        after = train.get("after", {})
        measure = (f"margin {after['margin']:.3f}" if "margin" in after
                   else f"loss {after['loss']:.3f}" if "loss" in after else "-")
        examples = entry.get("warmup", {}).get("examples", stats.get("dpo_pairs", "-"))
        table.add_row(entry["stage"], source, pct(stats.get("base_agreement")), pct(stats.get("unknown_rate")),
                      str(examples), str(train.get("steps", "-")), measure)
    console.print(table)


def print_costs(costs: list[dict], console) -> None:
    """The closing table of `conj-lite run`: wall time and peak memory per stage."""
    from rich.table import Table

    table = Table(title="what each stage cost")
    for column in ("stage", "wall time", "peak RSS"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for c in costs:
        peak = f"{c['peak_rss_gb']:.2f} GB"
        if c.get("child_peak_rss_gb"):
            peak += f" (converter {c['child_peak_rss_gb']:.2f} GB)"
        table.add_row(c["stage"], f"{c['seconds']:.0f} s", peak)
    total = sum(c["seconds"] for c in costs)
    table.add_row("[bold]total[/]", f"[bold]{total // 60:.0f} min {total % 60:.0f} s[/]",
                  f"[bold]{max((c['peak_rss_gb'] for c in costs), default=0):.2f} GB[/]")
    console.print(table)
    if costs and not all(c["peak_is_per_stage"] for c in costs):
        console.print("peak RSS: this system cannot reset the peak, so each row is the peak of the run so far")


def print_stats(stats: dict, console, title: str = "Con-J filtering") -> None:
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
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


def print_before_after(result: dict, console) -> None:
    """The closing table: what training changed on the held-out pairs."""
    from rich.table import Table

    def cell(metrics: dict, name: str) -> str:
        value, ci = metrics.get(name), metrics.get(f"{name}_ci")
        if value is None:
            return "-"
        text = f"{100 * value:.1f}%"
        return text + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")

    table = Table(title=f"held-out pairs ({result['pairs']}, both orders, verdict mode): before vs after training")
    for column in ("metric", "before (base model)", "after (base + adapter)", "change"):
        table.add_column(column)
    for name in ("accuracy", "consistency", "position_bias", "accuracy_prob"):
        before, after = result["before"].get(name), result["after"].get(name)
        change = f"{100 * (after - before):+.1f} pts" if before is not None and after is not None else "-"
        gain = result.get("gain", {}).get(name)
        if gain and gain["ci"]:
            change += f" [{100 * gain['ci'][0]:+.0f}, {100 * gain['ci'][1]:+.0f}]"
        table.add_row(name, cell(result["before"], name), cell(result["after"], name), change)
    console.print(table)
    console.print("accuracy: per-order verdicts; accuracy_prob: the both-order decision (P(A) averaged over the "
                  "orders); position_bias: the share of verdicts for answer 1 (0.5 = none). Intervals: 95% bootstrap "
                  "over pairs; the change's is paired (both judges on the same resampled pairs).")
