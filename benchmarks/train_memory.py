"""Peak memory of Con-J training (QLoRA, DPO + SFT), and the longest sequence a 16 GB card fits.

    python benchmarks/train_memory.py                     # GPU: Qwen2.5-7B shape, 4-bit, fp16 as on a T4
    python benchmarks/train_memory.py --shape qwen2.5-0.5b --seqs 512,1024   # CPU-sized (no GPU)

Each measurement is one `benchmarks/training_worker.py` process training through
`conj_lite.training.train_adapter` (the path `conj-lite train` takes): a randomly
initialised model of the published shape (`shapes.random_checkpoint`, bf16 on disk,
quantized to NF4 by bitsandbytes at load time as a real checkpoint is), LoRA r=16 on all
projections, gradient checkpointing, paged 8-bit AdamW, batch 1 with gradient
accumulation, synthetic pairs that fill exactly `seq` tokens.

On a GPU:
  1. peak memory at --seq (default 2048): torch.cuda.max_memory_allocated / _reserved
     after reset_peak_memory_stats, next to the estimate of benchmarks/shapes.py;
  2. the longest sequence that fits a 16 GB card: --sweep lengths, each run with the CUDA
     caching allocator capped at --card-gib (default 14.6 GiB: a T4 shows 15.0 GiB, and the
     CUDA context takes ~0.4 of it), several runs side by side on a big GPU.
Without a GPU the same runs train full-precision LoRA on the CPU and report peak host
RAM (VmHWM) for --seqs: the CPU-sized record of this benchmark, not a GPU figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from report import machine, today, versions, write_section  # noqa: E402
from shapes import SHAPES, estimate, random_checkpoint  # noqa: E402
from training_worker import collect, launch  # noqa: E402

TARGET_GB = 14.0  # the target: seq 2048 fits a 16 GB T4


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def gpu_main(args) -> int:
    import torch

    total_gib = torch.cuda.get_device_properties(0).total_memory / 1024**3
    ckpt = random_checkpoint(args.shape, "bfloat16", device="cuda")
    shape = SHAPES[args.shape]
    est = estimate(shape, seq=args.seq)
    print(f"{args.shape}: seq {args.seq}, {args.dtype}, grad_accum {args.grad_accum} ...", flush=True)
    main = launch(ckpt, seq=args.seq, dtype=args.dtype, grad_accum=args.grad_accum, steps=args.steps)
    print(main, flush=True)
    if "error" in main:
        raise SystemExit(f"the {args.seq}-token run failed: {main}")

    sweep = [int(s) for s in args.sweep.split(",")]
    parallel = max(1, min(args.parallel, int(total_gib // (args.card_gib + 1))))
    results, pending = [], list(sweep)
    while pending:  # a few capped runs side by side; each is its own process with its own peak
        batch, pending = pending[:parallel], pending[parallel:]
        procs = [(s, launch(ckpt, seq=s, dtype=args.dtype, grad_accum=2, steps=1, memory_cap_gb=args.card_gib,
                            wait=False)) for s in batch]
        for s, proc in procs:
            r = collect(proc)
            r.setdefault("seq", s)
            print(r, flush=True)
            results.append(r)
    fitting = [r["seq"] for r in results if r.get("fits")]
    longest = max(fitting) if fitting else None
    shortest_failing = min((r["seq"] for r in results if r.get("fits") is False), default=None)

    if args.no_write:
        return 0
    rows = "\n".join(
        f"| {r['seq']} | {'yes' if r.get('fits') else ('no (out of memory)' if r.get('fits') is False else 'error')} | "
        f"{r.get('peak_allocated_gb', float('nan')):.2f} | {r.get('peak_reserved_gb', float('nan')):.2f} | "
        f"{estimate(shape, seq=r['seq']).train_gb:.1f} |"
        for r in sorted(results, key=lambda r: r["seq"]))
    verdict = "met" if main["peak_reserved_gb"] + 0.4 <= TARGET_GB else "NOT met"
    body = f"""
Date: {today()}. Machine: {machine()}. Versions: {versions('torch', 'transformers', 'trl', 'peft', 'bitsandbytes', 'unsloth')}.
Command: `python benchmarks/train_memory.py{'' if args.shape == 'qwen2.5-7b' else f' --shape {args.shape}'}`

Model: {args.shape} shape ({shape.params() / 1e9:.2f}B parameters, random init), 4-bit NF4 (bitsandbytes, double
quantization), {args.dtype} compute, LoRA r=16 on all seven projections (peft), gradient checkpointing, paged 8-bit
AdamW, TRL DPO + SFT (`loss_type=["sigmoid","sft"]`), batch 1, gradient accumulation {args.grad_accum}, {args.steps}
optimizer steps, every sequence exactly {args.seq} tokens (chosen and rejected). Path: `conj_lite.training.train_adapter`
({main.get('path')}).

| seq | peak allocated, GB | peak reserved, GB | estimate (benchmarks/shapes.py), GB |
|---:|---:|---:|---:|
| {args.seq} | **{main['peak_allocated_gb']:.2f}** | **{main['peak_reserved_gb']:.2f}** | {est.train_gb:.1f} |

Target ≤ {TARGET_GB:.0f} GB on the card (reserved + ~0.4 GB CUDA context): **{verdict}**.

Longest sequence that fits a 16 GB card (allocator capped at {args.card_gib} GiB, batch 1, one optimizer step):
**{longest if longest else 'none of those tried'}** tokens{f' (the next length tried, {shortest_failing}, ran out of memory)' if shortest_failing else ''}.

| seq | fits | peak allocated, GB | peak reserved, GB | estimate, GB |
|---:|---|---:|---:|---:|
{rows}
"""
    raw = {"date": today(), "machine": machine(), "args": vars(args), "main": main, "sweep": results,
           "longest_fitting_seq": longest, "estimate": est.parts_gb}
    path = write_section(f"Training memory: QLoRA DPO+SFT ({args.shape}, GPU)", body, raw,
                         f"train_memory_{args.shape}.json")
    print(f"wrote {path}")
    return 0


def cpu_main(args) -> int:
    ckpt = random_checkpoint(args.shape, "bfloat16")
    shape = SHAPES[args.shape]
    before = load()
    results = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        start = time.perf_counter()
        r = launch(ckpt, seq=seq, grad_accum=1, steps=1, cpu=True)
        r["wall_s"] = round(time.perf_counter() - start, 1)
        print(r, flush=True)
        results.append(r)
    after = load()
    if args.no_write:
        return 0
    rows = "\n".join(f"| {r['seq']} | {r.get('peak_rss_gb', float('nan')):.2f} | {r['wall_s']:.0f} |" for r in results)
    body = f"""
Date: {today()}. Machine: {machine()} ({before} before, {after} after; other work shared the cores).
Versions: {versions('torch', 'transformers', 'trl', 'peft')}.
Command: `python benchmarks/train_memory.py --shape {args.shape} --seqs {args.seqs}` (no GPU: the CPU-sized run)

Model: {args.shape} shape ({shape.params() / 1e9:.2f}B parameters, random init) trained by
`conj_lite.training.train_adapter` on the CPU: fp32 LoRA r=16 on all projections (no 4-bit: bitsandbytes
needs CUDA), gradient checkpointing, DPO + SFT, batch 1, one optimizer step, sequences of exactly `seq` tokens.
Peak host RAM is the worker's VmHWM (model load, training, the pair metrics before and after).

| seq | peak host RAM, GB | wall, s |
|---:|---:|---:|
{rows}

These are not GPU figures. **Owed** (needs a GPU): `python benchmarks/train_memory.py`, the
Qwen2.5-7B-shaped 4-bit run at sequence 2048 (target ≤ 14 GB) and the longest sequence that fits 16 GB.
"""
    raw = {"date": today(), "machine": machine(), "load_before": before, "load_after": after, "args": vars(args),
           "runs": results}
    path = write_section("Training memory (CPU-sized; GPU figures owed)", body, raw, f"train_memory_cpu_{args.shape}.json")
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="default: qwen2.5-7b on a GPU, qwen2.5-0.5b on the CPU")
    parser.add_argument("--seq", type=int, default=2048, help="GPU: the sequence length of the main measurement")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="GPU compute dtype (T4: fp16)")
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of the main measurement")
    parser.add_argument("--sweep", default="2048,3072,4096,5120,6144,8192",
                        help="GPU: sequence lengths tried under the 16 GB cap")
    parser.add_argument("--card-gib", type=float, default=14.6, help="GPU: allocator cap emulating a 16 GB card")
    parser.add_argument("--parallel", type=int, default=4, help="GPU: capped runs side by side")
    parser.add_argument("--seqs", default="512,1024", help="CPU: sequence lengths measured")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch docs/")
    args = parser.parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    args.shape = args.shape or ("qwen2.5-7b" if on_gpu else "qwen2.5-0.5b")
    return gpu_main(args) if on_gpu else cpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
