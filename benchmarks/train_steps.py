"""What a training step of the embedded demo costs on the CPU, and what makes it cheaper.

The demo's own pairs (recipe `smollm2-135m_cpu` as shipped: sampled and filtered once,
cached in --work), trained through `conj_lite.training.train_adapter` for the same
optimizer steps under each configuration, side by side, each in a fresh process:

  fp32            the model in fp32, TRL's DPO step (chosen and rejected as two rows)
  bf16            bf16 weights and autocast on the CPU (model.dtype=bf16), LoRA in fp32
  bf16+precompute the reference log-probabilities computed once, in batches of 16, before
                  training (training.precompute_ref), not in every step
  bf16+shared     the shared-prompt step (training.shared_prompt, conj_lite/shared_prompt.py):
                  one row per pair, the prompt once, logits only where a judgment token is
                  predicted
  bf16+shared+pad64  and each batch padded up to a multiple of 64 tokens
                  (training.pad_to_multiple_of, the CPU default): recurring shapes, so
                  oneDNN's matmul primitives and glibc's freed buffers are reused;
                  the demo's default on a CPU. The rows above it are unpadded.
  demo ref ...    the demo's step (fp32, 2 rows x 4) with the DPO reference's log-probabilities
                  from TRL's forward in every step (transformers) or from llama.cpp, once before
                  training (training.ref_engine, conj_lite/reference.py); pad8: padded to 8

Each row: training examples per second (examples = pair rows, chosen + rejected), the
wall time of the stage (model load, TRL's data preparation, the steps, the before/after
measurement on `eval_pairs` rows), peak RSS, and the per-step losses, compared with the
first row's (same seed, same rows, same order): a faster path must leave the loss curve
within noise.

    python benchmarks/train_steps.py --steps 16            # writes its section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import cpu_name, today, versions, write_section  # noqa: E402

RECIPE = "smollm2-135m_cpu"
TITLE = "Training steps of the embedded demo on the CPU (benchmarks/train_steps.py)"
UNPADDED = "training.pad_to_multiple_of=1"
# the demo's step: fp32, the shared-prompt step, micro-batches of one pair in both orders x 4
DEMO_STEP = ["model.dtype=fp32", "training.shared_prompt=true", "training.batch_size=2", "training.grad_accum=4"]
TRL_REFERENCE = "training.ref_engine=transformers"  # TRL's reference forward in every step
CONFIGS = {
    "fp32": ["model.dtype=fp32", "training.shared_prompt=false", UNPADDED],
    "bf16": ["model.dtype=bf16", "training.shared_prompt=false", UNPADDED, "training.base_dtype=bf16"],
    "bf16+precompute": ["model.dtype=bf16", "training.shared_prompt=false", "training.precompute_ref=true", UNPADDED,
                        "training.base_dtype=bf16"],
    "bf16+shared": [TRL_REFERENCE, "model.dtype=bf16", "training.shared_prompt=true", UNPADDED,
                    "training.base_dtype=bf16"],
    "bf16+shared+pad64": [TRL_REFERENCE, "model.dtype=bf16", "training.shared_prompt=true",
                          "training.pad_to_multiple_of=64", "training.base_dtype=bf16"],
    "fp32+shared+pad64": [TRL_REFERENCE, "model.dtype=fp32", "training.shared_prompt=true",
                          "training.pad_to_multiple_of=64"],
    "fp32+shared+pad64 2x4": [*DEMO_STEP, "training.pad_to_multiple_of=64", TRL_REFERENCE],
    # bf16 autocast on fp32 base weights (training.base_dtype=auto on the CPU)
    "amp+shared+pad64": [TRL_REFERENCE, "model.dtype=bf16", "training.shared_prompt=true",
                         "training.pad_to_multiple_of=64", "training.base_dtype=fp32"],
    # the demo's step with the reference's log-probabilities from llama.cpp, computed once before
    # training (training.ref_engine, conj_lite/reference.py), against TRL's forward in every step;
    # and with batches padded to a multiple of 8 instead of 64
    "demo ref transformers": [*DEMO_STEP, "training.pad_to_multiple_of=64", TRL_REFERENCE],  # = fp32+shared+pad64 2x4
    "demo ref llama.cpp": [*DEMO_STEP, "training.pad_to_multiple_of=64", "training.ref_engine=llama.cpp"],
    "demo ref llama.cpp pad8": [*DEMO_STEP, "training.pad_to_multiple_of=8", "training.ref_engine=llama.cpp"],
    # and LoRA in the top N of SmolLM2's 30 layers only (training.lora_layers): the backward pass stops there
    **{f"demo top{n}": [*DEMO_STEP, "training.pad_to_multiple_of=8", "training.ref_engine=llama.cpp",
                        f"training.lora_layers={n}"] for n in (20, 15, 10)},
    # the supervised ceiling (training.objective=sft) on the chosen side of the same pairs:
    # TRL's SFTTrainer against the shared-prompt step with the sft term alone
    "sft SFTTrainer 2x4": ["model.dtype=fp32", "training.objective=sft", "training.shared_prompt=false",
                           "training.pad_to_multiple_of=64", "training.batch_size=2", "training.grad_accum=4"],
    "sft shared 2x4": ["model.dtype=fp32", "training.objective=sft", "training.shared_prompt=true",
                       "training.pad_to_multiple_of=64", "training.batch_size=2", "training.grad_accum=4"],
}


def pool(work: Path, overrides: list[str]) -> Path:
    """pairs.jsonl of the demo recipe (sampled once)."""
    from conj_lite.pipeline import PAIRS, ConjRun

    run = ConjRun.from_recipe(RECIPE, work / "pool", ["export.enabled=false", *overrides])
    run.sample()
    if not run.filter_is_current():
        run.filter()
    return run.out_dir / PAIRS


def worker(config: str, pairs: str, out: str, steps: int, eval_pairs: int, overrides: list[str]) -> dict:
    from conj_lite.config import find_recipe, load_recipe
    from conj_lite.models import resolve_model_path, set_cpu_threads
    from conj_lite.system import peak_rss_bytes
    from conj_lite.training import train_adapter

    set_cpu_threads()
    recipe = load_recipe(find_recipe(RECIPE), [*overrides, *CONFIGS[config], f"training.max_steps={steps}",
                                               f"training.eval_pairs={eval_pairs}", "training.logging_steps=1",
                                               f"training.save_steps={10 * steps}"])
    base = resolve_model_path(recipe)
    if recipe.training.objective == "sft":  # prompt -> chosen judgment rows, as the no-DPO ablation trains
        from conj_lite.jsonio import read_jsonl
        from conj_lite.warmup import sft_from_pairs, write_sft_file

        pairs = str(write_sft_file(sft_from_pairs(read_jsonl(pairs)), Path(out).parent / f"{Path(out).name}.sft.jsonl"))
    start = time.perf_counter()
    summary = train_adapter(recipe, base, pairs, out)
    wall = time.perf_counter() - start
    meta = json.loads((Path(out) / "adapter" / "conj_lite_train.json").read_text())
    t = recipe.training
    return {"config": config, "steps": summary.steps, "train_seconds": summary.seconds, "stage_seconds": wall,
            "examples": summary.steps * t.batch_size * t.grad_accum, "peak_rss_gb": peak_rss_bytes() / 1e9,
            "losses": [h["loss"] for h in meta["history"]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eval-pairs", type=int, default=0, help="training.eval_pairs in every configuration")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--work", default="runs/train-steps")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "PAIRS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every configuration")
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(*args.worker, args.steps, args.eval_pairs, args.overrides)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    work = Path(args.work)
    pairs = pool(work, args.overrides)
    load_before = os.getloadavg()
    results = []
    for config in args.configs:
        out = work / config
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--eval-pairs", str(args.eval_pairs),
               "--worker", config, str(pairs), str(out), *args.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        r = results[-1]
        print(f"{config}: {r['examples'] / r['train_seconds']:.2f} examples/s, {r['train_seconds']:.0f} s training, "
              f"{r['stage_seconds']:.0f} s stage, peak {r['peak_rss_gb']:.2f} GB", flush=True)
    load_after = os.getloadavg()
    base = results[0]
    rows = []
    for r in results:
        speed = r["examples"] / r["train_seconds"]
        diff = max((abs(a - b) for a, b in zip(r["losses"], base["losses"])), default=0.0)
        rows.append(f"| {r['config']} | {speed:.2f} | {speed / (base['examples'] / base['train_seconds']):.2f}× | "
                    f"{r['train_seconds']:.0f} | {r['stage_seconds']:.0f} | {r['peak_rss_gb']:.2f} | "
                    f"{r['losses'][0]:.4f} → {r['losses'][-1]:.4f} | {diff:.4f} |")
    command = "python benchmarks/train_steps.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        f"{today()}, {cpu_name()}, {os.cpu_count()} cores, no GPU; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after. {versions('torch', 'transformers', 'trl', 'peft')}. Command: `{command}`.", "",
        f"The demo recipe's own DPO pairs (`{RECIPE}`, sampled and filtered once), {args.steps} optimizer steps of "
        f"{base['examples'] // max(1, base['steps'])} examples in every configuration, the same seed and order; "
        f"training.eval_pairs={args.eval_pairs}.", "",
        "| configuration | examples/s | vs first | training s | stage s | peak RSS GB | loss, first → last step | "
        "largest loss difference from the first row |", "|---|---:|---:|---:|---:|---:|---|---:|", *rows])
    print(body)
    if not args.no_docs:
        print(f"wrote {write_section(TITLE, body, {'results': results, 'command': command}, 'train_steps.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
