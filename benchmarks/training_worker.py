"""One measured training run, in its own process: the helper of train_memory.py and train_speed.py.

    python benchmarks/training_worker.py --checkpoint DIR --seq 2048 [--dtype fp16] [--unsloth yes|no]
        [--grad-accum 4] [--steps 3] [--memory-cap-gb 15] [--cpu]

It writes synthetic Con-J pairs whose prompt + judgment fill exactly `--seq` tokens
(TRL truncates to `model.max_seq_length`), then trains through the real entry point,
`conj_lite.training.train_adapter`, with the recipe schema's defaults for everything not
set here: 4-bit NF4 + peft LoRA on CUDA (unsloth with `--unsloth yes`), gradient
checkpointing, paged 8-bit AdamW, DPO + SFT. The only addition is a timestamp at every
optimizer step (the progress-bar callback is wrapped, not replaced).

Prints one line `RESULT {json}`: peak GPU memory (allocated and reserved, after
`reset_peak_memory_stats`) or, on CPU, the process's peak RSS; step times; tokens/s.
`--memory-cap-gb` caps the CUDA caching allocator (`set_per_process_memory_fraction`)
to emulate a smaller card; running out of it is reported as `"fits": false`.
Each run is a fresh process so that peaks and unsloth's patches never leak between runs.

What the figures see. `max_memory_allocated` counts PyTorch's tensors; `max_memory_reserved`
adds what its caching allocator holds (the card must have that). Neither sees the CUDA
context and library workspaces (cuBLAS, about 0.5 GB, `shapes.CUDA_CONTEXT_GB`), nor
memory allocated outside PyTorch's allocator: bitsandbytes' paged optimizers
(`paged_adamw_8bit`) keep their states in CUDA managed memory, which the driver pages
between host and card and which the allocator cap does not limit either (for LoRA r=16
on a 7B, about 80 MB). `peak_process_gb` is what the driver reports for this process
(NVML, sampled every 50 ms: context, allocator pool, other device allocations).
Also recorded: the loaded model's weights by dtype (what the training path really holds)
and the dtypes of the trainable parameters when training starts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

WORDS = ("the answer gives a clear and correct account of the question while the other one misses "
         "an important detail and adds a claim that is not supported by the text so a careful reader "
         "would prefer the first response for its accuracy and focus").split()


def filler(tokenizer, n_tokens: int) -> str:
    """Text of about n_tokens tokens."""
    words = (WORDS * (n_tokens // len(WORDS) + 2))[: max(1, n_tokens)]
    text = " ".join(words)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    while len(ids) < n_tokens:
        text += " " + text
        ids = tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer.decode(ids[:n_tokens])


def synthetic_pairs(tokenizer, seq: int, n: int, completion_tokens: int = 256) -> list[dict]:
    """pairs.jsonl rows whose rendered prompt is seq - completion_tokens tokens and whose
    judgments are longer than completion_tokens, so every sequence is exactly `seq` after
    truncation."""
    from conj_lite.prompts import build_messages, load_template

    template = load_template("en")
    target = seq - completion_tokens
    question = filler(tokenizer, max(8, target // 2))
    answer = filler(tokenizer, 16)
    for _ in range(3):  # adjust the question until the rendered prompt has `target` tokens
        messages = build_messages(template, question, answer, answer)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        length = len(tokenizer(text, add_special_tokens=False).input_ids)
        if length == target:
            break
        question = filler(tokenizer, max(8, len(tokenizer(question, add_special_tokens=False).input_ids) + target - length))
    rationale = filler(tokenizer, completion_tokens + 64)
    rows = []
    for i in range(n):
        chosen = json.dumps({"rationale": rationale, "better_answer": 1 + i % 2})
        rejected = json.dumps({"rationale": rationale[::-1], "better_answer": 2 - i % 2})
        rows.append({"id": f"bench-{i}", "order": "ab", "kind": "repeat", "prompt": messages,
                     "chosen": chosen, "rejected": rejected})
    return rows


def high_water_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024**2, 3)
    return float("nan")


def timed_progress(times: list[float], sync, seen: dict):
    """Wrap conj_lite.training's progress-bar callback so each optimizer step is timestamped
    (and the trainable parameters' dtypes are recorded in `seen` when training starts)."""
    from conj_lite import training

    original = training.rich_callback

    def make(console=None):
        callback = original(console)
        on_train_begin, on_step_end = callback.on_train_begin, callback.on_step_end

        def begin(args, state, control, **kwargs):
            sync()
            times.append(time.perf_counter())
            model = kwargs.get("model")
            if model is not None:
                seen["trainable_dtypes"] = dtype_counts(p for p in model.parameters() if p.requires_grad)
            return on_train_begin(args, state, control, **kwargs)

        def step(args, state, control, **kwargs):
            sync()
            times.append(time.perf_counter())
            return on_step_end(args, state, control, **kwargs)

        callback.on_train_begin, callback.on_step_end = begin, step
        return callback

    training.rich_callback = make


def dtype_counts(params) -> dict:
    out: dict[str, int] = {}
    for p in params:
        out[str(p.dtype).replace("torch.", "")] = out.get(str(p.dtype).replace("torch.", ""), 0) + p.numel()
    return out


def record_loaded_weights(seen: dict):
    """Wrap conj_lite.training.load_for_training: the loaded model's weights, GB by dtype
    (4-bit weights are uint8 storage), as training holds them."""
    from conj_lite import training

    original = training.load_for_training

    def load(*args, **kwargs):
        model, *rest = original(*args, **kwargs)
        by_dtype: dict[str, float] = {}
        for p in model.parameters():
            key = str(p.dtype).replace("torch.", "")
            by_dtype[key] = by_dtype.get(key, 0.0) + p.numel() * p.element_size() / 1024**3
        seen["weights_gb_by_dtype"] = {k: round(v, 3) for k, v in by_dtype.items()}
        return (model, *rest)

    training.load_for_training = load


class ProcessMemory(threading.Thread):
    """This process's GPU memory as the driver reports it (NVML), sampled; keeps the largest."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval, self.peak, self.done, self.error = interval, 0, threading.Event(), None

    def run(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("LOCAL_RANK", 0)))
            pid = os.getpid()
            while not self.done.is_set():
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == pid and proc.usedGpuMemory:
                        self.peak = max(self.peak, proc.usedGpuMemory)
                time.sleep(self.interval)
        except Exception as exc:  # noqa: BLE001 - no NVML (or pid namespaces): the figure is missing
            self.error = f"{type(exc).__name__}: {exc}"[:200]

    def stop(self) -> float | None:
        self.done.set()
        self.join(timeout=2)
        return round(self.peak / 1024**3, 3) if self.peak else None


def run(args) -> dict:
    if args.unsloth == "yes" and not args.cpu:
        import unsloth  # noqa: F401  (first: unsloth patches transformers, trl and peft when imported)
    import torch

    from conj_lite.config import recipe_from_dict
    from conj_lite.models import load_tokenizer

    cuda = torch.cuda.is_available() and not args.cpu
    if cuda and args.memory_cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 1024**3 / total))
    if not cuda:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    work = Path(tempfile.mkdtemp(prefix="conj-train-bench-"))
    tokenizer = load_tokenizer(args.checkpoint)
    n_pairs = args.grad_accum * args.steps
    pairs = synthetic_pairs(tokenizer, args.seq, n_pairs)
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    recipe = recipe_from_dict({
        "name": "train-bench",
        "model": {"name_or_path": args.checkpoint, "max_seq_length": args.seq, "dtype": args.dtype,
                  "load_in_4bit": cuda, "use_unsloth": args.unsloth},
        "training": {"batch_size": 1, "grad_accum": args.grad_accum, "max_steps": args.steps,
                     "gradient_checkpointing": True, "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r,
                     "save_steps": 10_000, "logging_steps": 1, "warmup_ratio": 0.0},
        "export": {"enabled": False},
    })
    times: list[float] = []
    seen: dict = {}
    timed_progress(times, sync, seen)
    record_loaded_weights(seen)
    from conj_lite.training import train_adapter

    process_memory = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        process_memory = ProcessMemory()
        process_memory.start()
    result = {"seq": args.seq, "dtype": args.dtype, "unsloth": args.unsloth, "grad_accum": args.grad_accum,
              "steps": args.steps, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "memory_cap_gb": args.memory_cap_gb if cuda else None}
    try:
        summary = train_adapter(recipe, args.checkpoint, work / "pairs.jsonl", work)
        result.update(fits=True, path=summary.path, trained_steps=summary.steps)
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # some kernels report OOM as a RuntimeError
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc).lower():
            raise
        result.update(fits=False, error=str(exc).splitlines()[0][:300])
    if cuda:
        result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1024**3, 3)
        result["peak_process_gb"] = process_memory.stop()
        if process_memory.error:
            result["peak_process_error"] = process_memory.error
    result.update(seen)
    result["peak_rss_gb"] = high_water_gb()  # host RAM: VmHWM, since exec (getrusage would count the parent)
    steps = [b - a for a, b in zip(times, times[1:])]
    result["step_seconds"] = [round(s, 4) for s in steps]
    if len(steps) >= 2:
        tokens_per_step = args.grad_accum * 2 * args.seq  # batch 1: chosen + rejected sequences
        median = statistics.median(steps[1:])  # the first step warms up (allocations, autotuning)
        result.update(tokens_per_step=tokens_per_step, median_step_s=round(median, 4),
                      tokens_per_s=round(tokens_per_step / median, 1))
    return result


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a model directory with a chat-template tokenizer")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--unsloth", default="no", choices=["no", "yes", "auto"])
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--memory-cap-gb", type=float, default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if CUDA is there")
    return parser.parse_args(argv)


def launch(checkpoint, *, seq: int, dtype: str = "auto", unsloth: str = "no", grad_accum: int = 4, steps: int = 3,
           lora_r: int = 16, memory_cap_gb: float | None = None, cpu: bool = False, wait: bool = True):
    """Start a worker process; with wait=True return its RESULT dict (or {"error": ...})."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--checkpoint", str(checkpoint), "--seq", str(seq),
           "--dtype", dtype, "--unsloth", unsloth, "--grad-accum", str(grad_accum), "--steps", str(steps),
           "--lora-r", str(lora_r)]
    if memory_cap_gb:
        cmd += ["--memory-cap-gb", str(memory_cap_gb)]
    if cpu:
        cmd.append("--cpu")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # stderr (progress bars, warnings) goes to a file: runs side by side never block on a full pipe
    log = tempfile.NamedTemporaryFile("w+", prefix="conj-train-bench-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    proc.log_path = log.name
    return collect(proc) if wait else proc


def collect(proc) -> dict:
    proc.wait()
    text = Path(proc.log_path).read_text(errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            Path(proc.log_path).unlink(missing_ok=True)
            return json.loads(line[len("RESULT "):])
    return {"error": f"worker exited with {proc.returncode}", "log": proc.log_path,
            "log_tail": text.strip().splitlines()[-15:]}


if __name__ == "__main__":
    print("RESULT " + json.dumps(run(parse())), flush=True)
