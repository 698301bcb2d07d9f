"""LoRA judge bundle agreement on the real default model (SmolLM2-135M-Instruct).

    python benchmarks/lora_agreement.py [--adapter RUN/adapter] [--pairs 100] [--data FILE]

The adapter (default: a LoRA made here on the packaged base, rank 8 on every
projection, random non-zero weights scaled by --scale, seed 0; pass a trained
adapter with --adapter) is exported as a GGUF LoRA with llama.cpp's
convert_lora_to_gguf.py and loaded on the packaged Q4_1 base.gguf at run time (no
merge, no second quantization; the packaged HF weights are that file dequantized).
Verdict-mode judgments of --pairs held-out pairs are compared with

  - transformers fp32, packaged base + the PEFT adapter (the reference), and
  - the merged-and-requantized judge (`conj-lite export`: merge, f16 GGUF, q4_k_m).

Writes docs/benchmarks/lora_agreement.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_adapter(base: Path, out: Path, scale: float) -> Path:
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / "conj_lite_train.json").write_text(json.dumps({"base_model": str(base), "template": "en",
                                                          "load_in_4bit": False}))
    return out


def agreement(a, b) -> dict:
    same = sum(x.verdict == y.verdict for x, y in zip(a, b))
    orders = sum(x.orders[o].slot == y.orders[o].slot for x, y in zip(a, b) for o in ("ab", "ba"))
    diff = [abs(x.p_a - y.p_a) for x, y in zip(a, b)]
    return {"verdicts": round(same / len(a), 4), "order_verdicts": round(orders / (2 * len(a)), 4),
            "p_a_mean_abs_diff": round(sum(diff) / len(diff), 5), "p_a_max_abs_diff": round(max(diff), 5)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="a trained PEFT adapter on the packaged SmolLM2 (default: made here)")
    parser.add_argument("--data", default=str(REPO / "data" / "sample_prefs.jsonl"))
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--scale", type=float, default=0.05, help="factor on the made adapter's lora_B weights")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "conj-lite" / "bench" / "lora-agreement"))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-merged", action="store_true", help="skip the merged-and-requantized q4_k_m judge")
    args = parser.parse_args(argv)

    import torch

    from conj_lite.data import load_pairs
    from conj_lite.export import convert_lora_to_gguf, export_gguf
    from conj_lite.judging import Judge
    from conj_lite.packaged import BASE_GGUF, packaged_model_path

    torch.set_num_threads(args.threads)
    base_dir = packaged_model_path("smollm2-135m")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    adapter = Path(args.adapter) if args.adapter else make_adapter(base_dir, work / "adapter", args.scale)
    pairs = load_pairs(args.data).pairs[: args.pairs]
    items = [(p.question, p.answer_a, p.answer_b) for p in pairs]
    report = {"adapter": str(adapter) if args.adapter else f"made here (rank 8, lora_B x {args.scale}, seed 0)",
              "data": Path(args.data).name, "pairs": len(items), "threads": args.threads,
              "load_before": round(os.getloadavg()[0], 2), "seconds": {}}

    start = time.perf_counter()
    lora = convert_lora_to_gguf(adapter, work / "judge-lora-f16.gguf", base_dir)
    report["seconds"]["convert_lora"] = round(time.perf_counter() - start, 1)
    report["lora_bytes"] = lora.stat().st_size

    start = time.perf_counter()
    with Judge.from_gguf(base_dir / BASE_GGUF, lora_path=lora, n_threads=args.threads, warn=None) as judge:
        bundle = judge.compare_many(items, mode="verdict")
    report["seconds"]["gguf_q4_1_plus_lora"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    with Judge.from_hf(base_dir, adapter=adapter, n_threads=args.threads, warn=None) as judge:
        reference = [judge.compare(*item, mode="verdict") for item in items]
    report["seconds"]["hf_fp32_plus_adapter"] = round(time.perf_counter() - start, 1)

    with Judge.from_gguf(base_dir / BASE_GGUF, n_threads=args.threads, warn=None) as judge:
        untouched = judge.compare_many(items, mode="verdict")

    report["bundle_vs_hf"] = agreement(bundle, reference)
    report["base_without_adapter_vs_hf"] = agreement(untouched, reference)
    if not args.no_merged:
        start = time.perf_counter()
        export = export_gguf(adapter, work / "merged-run", quant_types=("q4_k_m",), threads=args.threads,
                             base=str(base_dir))
        report["seconds"]["merge_export"] = round(time.perf_counter() - start, 1)
        with Judge.from_gguf(export.gguf_paths["q4_k_m"], n_threads=args.threads, warn=None) as judge:
            merged = judge.compare_many(items, mode="verdict")
        report["merged_q4_k_m_vs_hf"] = agreement(merged, reference)
        report["bundle_vs_merged_q4_k_m"] = agreement(bundle, merged)
    report["load_after"] = round(os.getloadavg()[0], 2)
    from importlib import metadata

    report["made_by"] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                         "command": "python benchmarks/lora_agreement.py " + " ".join(sys.argv[1:]),
                         "versions": {n: metadata.version(n) for n in ("torch", "transformers", "peft", "llama_cpp_python")}}
    out = REPO / "docs" / "benchmarks" / "lora_agreement.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    rows = [("GGUF Q4_1 base + GGUF LoRA", "transformers fp32 base + adapter", report["bundle_vs_hf"]),
            ("GGUF Q4_1 base, no adapter (control)", "transformers fp32 base + adapter",
             report["base_without_adapter_vs_hf"])]
    if "merged_q4_k_m_vs_hf" in report:
        rows += [("merged + requantized q4_k_m", "transformers fp32 base + adapter", report["merged_q4_k_m_vs_hf"]),
                 ("GGUF Q4_1 base + GGUF LoRA", "merged + requantized q4_k_m", report["bundle_vs_merged_q4_k_m"])]
    print("\n| judge | against | verdict agreement | per-order agreement | mean abs ΔP(A) | max abs ΔP(A) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, against, r in rows:
        print(f"| {name} | {against} | {100 * r['verdicts']:.1f}% | {100 * r['order_verdicts']:.1f}% | "
              f"{r['p_a_mean_abs_diff']:.4f} | {r['p_a_max_abs_diff']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
