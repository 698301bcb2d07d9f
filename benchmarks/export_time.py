"""Export cost: merge + convert + quantize time and peak host RAM, on a real-shaped model.

    python benchmarks/export_time.py                          # Qwen2.5-1.5B shape (the recorded run)
    python benchmarks/export_time.py --shape qwen2.5-0.5b     # quicker

Export runs on the CPU whatever trained the adapter (a QLoRA adapter is merged into
the 16-bit base weights), so this benchmark is the real figure on any machine; what
changes between machines is the time, not the memory.

Setup (not timed, cached): a randomly initialised bf16 checkpoint of the published shape
(`shapes.random_checkpoint`) and a LoRA adapter on it (r=16 on every projection, random
non-zero weights, marked as trained in 4-bit as a QLoRA run marks it). Then
`conj_lite.export.export_gguf` runs three times, each in a fresh process so that each
phase's peak resident memory is its own:

  1. merge (peft, in-process) + convert (llama.cpp's converter, a child process) -> f16
  2. quantize f16 -> q8_0 (llama_model_quantize, in-process; merge and convert are up to date)
  3. quantize f16 -> q4_k_m

Peak RAM is the exporting process's high-water resident set (`VmHWM`, merge and
quantize run in-process) and the largest resident set any child reached (the converter,
gguf-py's metadata copy), sampled every 20 ms. (`getrusage` is no use here: a child
inherits its parent's high-water mark across fork and exec.) Results: the "Export"
section of docs/benchmarks.md and docs/benchmarks/export_<shape>.json.

    python benchmarks/export_time.py --ram                    # host RAM of export, 1.5B and 3B shapes

`--ram` runs merge + convert (the phases that hold the model; quantizing holds about half)
once per shape, each in a fresh process, and writes the "Export host RAM" section and
docs/benchmarks/export_ram.json: peak RSS over the 16-bit checkpoint size, the factor
`benchmarks/shapes.py` (EXPORT_RAM_FACTOR) turns into each recipe header's export RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from report import machine, today, versions, write_section  # noqa: E402
from shapes import SHAPES, checkpoint_dir, random_checkpoint  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RAM_SHAPES = "qwen2.5-1.5b,qwen2.5-3b"


def make_adapter(base: Path, out: Path, r: int) -> Path:
    """A LoRA adapter with non-zero weights, saved as conj_lite.training saves one."""
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, init_lora_weights=False)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    get_peft_model(model, config).save_pretrained(str(staging))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(staging))
    meta = {"base_model": str(base), "load_in_4bit": True, "dtype": "bf16", "template": "en"}
    (staging / "conj_lite_train.json").write_text(json.dumps(meta))
    staging.rename(out)
    return out


def high_water_gb() -> float:
    """This process's peak resident set since its exec (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024**2, 2)
    raise RuntimeError("no VmHWM in /proc/self/status")


class ChildMemory(threading.Thread):
    """Samples the resident set of this process's children; keeps the largest."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        import psutil

        self.me, self.interval, self.peak, self.done = psutil.Process(), interval, 0, threading.Event()

    def run(self):
        import psutil

        while not self.done.is_set():
            for child in self.me.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(self.interval)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return round(self.peak / 1024**3, 2)


class AnonMemory(threading.Thread):
    """Samples this process's anonymous resident memory (RssAnon: what the kernel cannot
    drop, unlike pages of mapped files); keeps the largest."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.peak, self.done = interval, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(self.interval)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return round(self.peak / 1024**3, 2)


def worker(args) -> int:
    """One export_gguf call; prints its timings and peak resident memory as JSON."""
    from conj_lite.export import export_gguf

    quants = [q for q in args.quants.split(",") if q]
    children, anon = ChildMemory(), AnonMemory()
    children.start()
    anon.start()
    start = time.perf_counter()
    result = export_gguf(args.adapter, args.run_dir, quant_types=quants, threads=args.threads)
    wall = time.perf_counter() - start
    out = {
        "wall_s": round(wall, 2),
        "merge_s": None if result.merge_skipped else round(result.merge_seconds, 2),
        "files": {f.type: {"seconds": None if f.skipped else round(f.seconds, 2), "bytes": f.size} for f in result.files},
        "peak_rss_self_gb": high_water_gb(),
        "peak_anon_self_gb": anon.stop(),
        "peak_rss_children_gb": children.stop(),
    }
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def run_phase(adapter: Path, run_dir: Path, quants: list[str], threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--adapter", str(adapter), "--run-dir", str(run_dir),
           "--quants", ",".join(quants), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"export phase {quants or 'merge+convert'} failed")
    line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def baseline_rss_gb() -> float:
    """Peak RSS of a process that only imports what the exporting process imports."""
    code = ("import torch, transformers, peft, llama_cpp, conj_lite.export, pathlib;"
            "print([l for l in pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), check=True)
    return round(int(out.stdout.split()[-2]) / 1024**2, 2)


def gb(n: int) -> str:
    return f"{n / 1024**3:.2f} GB"


RAM_TITLE = "Export host RAM (benchmarks/export_time.py --ram)"


def ram(args) -> int:
    """Merge + convert of each shape in a fresh process: peak RSS over the 16-bit size."""
    from shapes import EXPORT_RAM_FACTOR, recipe_export_ram

    import report

    previous = report.DOCS / "benchmarks" / "export_ram.json"
    # Shapes measured before (another run) stay in the table unless measured again now.
    raw = json.loads(previous.read_text()) if previous.is_file() and not args.no_write else {"shapes": {}}
    baseline = baseline_rss_gb() if args.shapes else max(e["baseline_rss_gb"] for e in raw["shapes"].values())
    for shape in filter(None, args.shapes.split(",")):  # --shapes "": only write the section again
        before = [round(x, 2) for x in os.getloadavg()]
        base = random_checkpoint(shape, "bfloat16")
        bench = checkpoint_dir(shape, "bfloat16").parent / f"export-{shape}"
        adapter = make_adapter(base, bench / "adapter", args.lora_r)
        run_dir = bench / "run-ram"
        shutil.rmtree(run_dir, ignore_errors=True)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        phase = run_phase(adapter, run_dir, [], args.threads)
        peak = max(phase["peak_rss_self_gb"], phase["peak_rss_children_gb"])
        entry = {"date": today(), "machine": machine(), "load_before": before,
                 "load_after": [round(x, 2) for x in os.getloadavg()], "baseline_rss_gb": baseline,
                 "command": f"python benchmarks/export_time.py --ram --shapes {shape}",
                 "params": SHAPES[shape].params(), "checkpoint_bytes": size, **phase,
                 "peak_gb": peak, "factor": round(peak / (size / 1024**3), 3),
                 "merge_factor": round(phase["peak_rss_self_gb"] / (size / 1024**3), 3),
                 "merge_anon_factor": round(phase["peak_anon_self_gb"] / (size / 1024**3), 3),
                 "convert_factor": round(phase["peak_rss_children_gb"] / (size / 1024**3), 3)}
        raw["shapes"][shape] = entry
        print(f"{shape}: {json.dumps(entry)}", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    factor = max(e["factor"] for e in raw["shapes"].values())
    raw["factor"] = factor
    if args.no_write:
        print(json.dumps(raw, indent=2))
        return 0
    rows = []
    for shape, e in sorted(raw["shapes"].items(), key=lambda kv: kv[1]["params"]):
        rows.append(f"| {shape} | {e['params'] / 1e9:.2f}B | {e['checkpoint_bytes'] / 1024**3:.2f} | {e['merge_s']:.0f} | "
                    f"{e['peak_rss_self_gb']:.2f} ({e['merge_factor']:.2f}×) | "
                    f"{e['peak_anon_self_gb']:.2f} ({e['merge_anon_factor']:.2f}×) | {e['files']['f16']['seconds']:.0f} | "
                    f"{e['peak_rss_children_gb']:.2f} ({e['convert_factor']:.2f}×) | {e['date']}, "
                    f"{', '.join(map(str, e['load_before']))} / {', '.join(map(str, e['load_after']))} |")
    from conj_lite.config import load_recipe

    recipes = sorted((REPO / "conj_lite" / "recipes").glob("*_*.yaml"))
    recipe_rows = []
    for path in recipes:
        stated = recipe_export_ram(load_recipe(path))
        if stated:
            recipe_rows.append(f"`{path.stem}` {stated[0]:.1f} GB")
    body = f"""
Machine: {machine()}. Versions: {versions('torch', 'transformers', 'peft', 'safetensors', 'llama_cpp_python', 'gguf')}.
Command: `python benchmarks/export_time.py --ram --shapes SHAPE`, one shape at a time (other work shared the
cores: load average before / after in the table).

Each shape: a random bf16 checkpoint (`shapes.random_checkpoint`) and a LoRA adapter (r={args.lora_r}, all seven projections,
marked as trained in 4-bit), then `conj_lite.export.export_gguf` merge + convert to f16 in a fresh process. The merge
reads the base into float16 (pread, tensor by tensor) and adds each LoRA delta in float32. Peak RSS is the exporting
process's VmHWM (merge) and the converter child's largest resident set (sampled every 20 ms); anonymous is the merge's
RssAnon peak (sampled), the part the kernel cannot drop. Both include the libraries (a process that only imports
them peaks at {baseline:.2f} GB). Factors are over the 16-bit checkpoint size; GB are 2^30 bytes. The converter reads the
merged files through mmap, so its resident set shrinks when the kernel reclaims those pages for other processes (this
machine's 23 GB were shared with other jobs): its figure is a floor; the merge's is the peak.

| shape | parameters | 16-bit checkpoint, GB | merge, s | merge peak RSS, GB | merge peak anonymous, GB | convert, s | converter peak RSS, GB | date, load average |
|---|---:|---:|---:|---:|---:|---:|---:|---|
{chr(10).join(rows)}

Export needs **{factor:.2f}×** the 16-bit size of host RAM (the largest factor above); `benchmarks/shapes.py`
(`EXPORT_RAM_FACTOR = {EXPORT_RAM_FACTOR}`) states each recipe's export RAM from it: {', '.join(recipe_rows)}.
(Before, the merge loaded the base in float32: 2× the 16-bit size for the weights alone; on the 100 MiB model
of tests/test_export.py that path peaked at 3.1× against 1.6× now.)
"""
    path = write_section(RAM_TITLE, body, raw, "export_ram.json")
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--quants", default="q8_0,q4_k_m")
    parser.add_argument("--threads", type=int, default=0, help="quantization threads (0: all cores)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch docs/")
    parser.add_argument("--ram", action="store_true", help="host RAM of merge + convert, per shape (--shapes)")
    parser.add_argument("--shapes", default=RAM_SHAPES, help="with --ram: comma-separated shapes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.ram:
        return ram(args)

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = random_checkpoint(args.shape, "bfloat16")
    bench = checkpoint_dir(args.shape, "bfloat16").parent / f"export-{args.shape}"
    adapter = make_adapter(base, bench / "adapter", args.lora_r)
    run_dir = bench / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    quants = [q for q in args.quants.split(",") if q]

    before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    phases = {"merge+convert": run_phase(adapter, run_dir, [], args.threads)}
    for i, q in enumerate(quants):
        phases[q] = run_phase(adapter, run_dir, quants[: i + 1], args.threads)
    after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    baseline = baseline_rss_gb()
    first = phases["merge+convert"]
    merge_s, convert_s = first["merge_s"], first["files"]["f16"]["seconds"]
    quant_s = {q: phases[q]["files"][q]["seconds"] for q in quants}
    total = merge_s + convert_s + sum(quant_s.values())
    params = SHAPES[args.shape].params()
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    merged_bytes = sum(p.stat().st_size for p in (run_dir / "merged").glob("*.safetensors"))
    sizes = {t: v["bytes"] for t, v in phases[quants[-1]]["files"].items()} if quants else first["files"]
    peak = max(first["peak_rss_self_gb"], first["peak_rss_children_gb"],
               *(phases[q]["peak_rss_self_gb"] for q in quants))
    print(json.dumps(phases, indent=2))
    print(f"total {total:.1f}s; peak RSS {peak:.2f} GB")
    if args.no_write:
        return 0

    command = "python benchmarks/export_time.py" + ("" if args.shape == "qwen2.5-1.5b" else f" --shape {args.shape}")
    rows = [f"| merge (peft, bf16) | {merge_s:.1f} | {first['peak_rss_self_gb']:.2f} (exporting process) |",
            f"| convert → f16 (llama.cpp converter) | {convert_s:.1f} | {first['peak_rss_children_gb']:.2f} (converter process) |"]
    rows += [f"| quantize f16 → {q} | {quant_s[q]:.1f} | {phases[q]['peak_rss_self_gb']:.2f} |" for q in quants]
    size_list = ", ".join(f"{t} {gb(b)}" for t, b in sizes.items())
    body = f"""
Date: {today()}. Machine: {machine()}. Versions: {versions('torch', 'transformers', 'peft', 'llama_cpp_python', 'gguf')}.
Command: `{command}`

Model: {args.shape} shape ({params / 1e9:.2f}B parameters, random init, bf16 checkpoint {gb(base_bytes)}), LoRA r={args.lora_r}
on all seven projections, marked as trained in 4-bit (merged into the 16-bit base, as after QLoRA).
Each phase runs `conj_lite.export.export_gguf` in a fresh process; peak RAM is that process's high-water
resident set (VmHWM), for the convert row the converter's (sampled every 20 ms). A process that only imports
the libraries peaks at {baseline:.2f} GB. Load average {before} before, {after} after (other work shared the cores).

| phase | seconds | peak host RAM, GB |
|---|---:|---:|
{chr(10).join(rows)}
| **total** | **{total:.1f}** | **{peak:.2f}** |

Files: merged safetensors {gb(merged_bytes)}; {size_list}.
Peak host RAM is {peak / (base_bytes / 1024**3):.2f}× the 16-bit checkpoint size: scale by model size for
other shapes. Export is CPU work on any machine (a GPU does not change it); times depend on the cores
(this machine: {machine().split(', ')[1]}).
"""
    raw = {"date": today(), "machine": machine(), "shape": args.shape, "params": params, "lora_r": args.lora_r,
           "base_checkpoint_bytes": base_bytes, "merged_bytes": merged_bytes, "baseline_rss_gb": baseline,
           "phases": phases, "total_s": round(total, 2), "peak_rss_gb": peak, "load_before": before, "load_after": after}
    path = write_section("Export: merge + convert + quantize", body, raw, f"export_{args.shape}.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
