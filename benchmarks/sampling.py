"""Batched vs one-at-a-time judgment sampling, side by side on the same model.

    python benchmarks/sampling.py                      # tiny local model on CPU
    python benchmarks/sampling.py --shape smollm2      # the embedded real model (packaged), CPU
    python benchmarks/sampling.py --shape qwen2.5-1.5b # real-shaped random init (GPU)
    python benchmarks/sampling.py --shape qwen2.5-1.5b --load-in-4bit   # 4-bit NF4, as the GPU recipes sample

Every path samples the same Con-J plan (repeats + hints, both orders) with the same
settings; "one at a time" calls `generate` once per judgment, "batched" is what
`conj-lite sample` does (length-sorted batches, the repeats of a prompt together, KV
cache, left padding, each prompt evaluated once for its repeats), and "batched, prompt
per sample" is the same without that sharing (each repeat evaluates its own copy of
the prompt). Reports judgments/s of each and the ratios, and writes them to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from report import machine, today, versions, write_section  # noqa: E402

from conj_lite.config import SamplingConfig  # noqa: E402
from conj_lite.data import load_pairs  # noqa: E402
from conj_lite.frame import sample_seed  # noqa: E402
from conj_lite.models import load_tokenizer  # noqa: E402
from conj_lite.prompts import load_template, render_prompt  # noqa: E402
from conj_lite.sampling import generate, make_batches, plan_requests, split_requests  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Published shapes (hidden, intermediate, layers, heads, kv heads, vocab, tied).
SHAPES = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def real_shaped(shape: str, tokenizer):
    """A randomly initialised Qwen2-architecture model of a published size."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, i, layers, heads, kv, vocab, tied = SHAPES[shape]
    config = Qwen2Config(
        hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=max(vocab, len(tokenizer)), tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return Qwen2ForCausalLM(config).to(dtype).to("cuda" if torch.cuda.is_available() else "cpu").eval()


def four_bit(shape: str):
    """The real-shaped model saved as a checkpoint and loaded in 4-bit NF4 by conj_lite.models
    (bitsandbytes quantizes at load time, as with a real checkpoint)."""
    from shapes import random_checkpoint

    from conj_lite.config import ModelConfig
    from conj_lite.models import load_causal_lm, resolve_runtime

    path = str(random_checkpoint(shape, "bfloat16", device="cuda"))
    cfg = ModelConfig(name_or_path=path, load_in_4bit=True)
    return load_causal_lm(path, cfg, resolve_runtime(cfg)).eval()


def seed_of(request, k: int, cfg) -> int:
    """A judgment's own random stream, as `conj-lite sample` seeds it: every path then
    writes the same judgments (the same lengths, where a model stops by itself)."""
    return sample_seed(cfg.seed, request.pair_id, request.order, request.kind, k)


def run_batched(model, tokenizer, requests, prompts, cfg, share_prompts: bool = True) -> tuple[int, float]:
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    sync()
    start = time.perf_counter()
    count = 0
    for batch in make_batches(requests, lengths, cfg.batch_size):
        n = len(requests[batch[0]].samples)
        seeds = [seed_of(requests[i], k, cfg) for i in batch for k in requests[i].samples]
        out = generate(model, tokenizer, [prompts[i] for i in batch], n, cfg, seeds=seeds, share_prompts=share_prompts)
        count += sum(len(x) for x in out)
    sync()
    return count, time.perf_counter() - start


def run_unshared(model, tokenizer, requests, prompts, cfg) -> tuple[int, float]:
    return run_batched(model, tokenizer, requests, prompts, cfg, share_prompts=False)


def run_one_at_a_time(model, tokenizer, requests, prompts, cfg) -> tuple[int, float]:
    sync()
    start = time.perf_counter()
    count = 0
    for req, prompt in zip(requests, prompts):
        for k in req.samples:
            generate(model, tokenizer, [prompt], 1, cfg, seeds=[seed_of(req, k, cfg)])
            count += 1
    sync()
    return count, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "smollm2", *SHAPES], default="tiny",
                        help="smollm2: SmolLM2-135M-Instruct from the package (its own tokenizer), fp32")
    parser.add_argument("--pairs", type=int, default=6, help="labelled pairs from data/sample_prefs.jsonl")
    parser.add_argument("--n-repeats", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each path (median reported)")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="GPU, with --shape: load the model in 4-bit NF4 through conj_lite.models, as the recipes do")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch docs/")
    args = parser.parse_args(argv)
    if args.load_in_4bit and (args.shape in ("tiny", "smollm2") or not torch.cuda.is_available()):
        parser.error("--load-in-4bit needs a real --shape and a CUDA GPU (bitsandbytes)")

    from conj_lite.tiny import tiny_model_path

    torch.manual_seed(0)
    tiny = tiny_model_path()
    tokenizer = load_tokenizer(str(tiny))
    if args.shape in ("tiny", "smollm2"):
        from transformers import AutoModelForCausalLM

        if args.shape == "smollm2":
            from conj_lite.packaged import packaged_model_path

            tiny = packaged_model_path("smollm2-135m")  # the model directory built from the package
            tokenizer = load_tokenizer(str(tiny))
        model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    elif args.load_in_4bit:
        model = four_bit(args.shape)
    else:
        model = real_shaped(args.shape, tokenizer)
    template = load_template("en")
    pairs = [p for p in load_pairs(REPO / "data" / "sample_prefs.jsonl").pairs if p.label != "tie"][: args.pairs]
    # Every path seeds each judgment as `conj-lite sample` does, so all write the same
    # judgments of the same lengths: the comparison measures batching and sharing, not
    # when a model happens to stop (the tokenizer's EOS still ends a judgment).
    cfg = SamplingConfig(
        n_repeats=args.n_repeats, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        temperature=1.2, top_p=0.95, repetition_penalty=1.0,
    )
    model.generation_config.eos_token_id = None
    requests = split_requests(plan_requests(pairs, template, cfg), cfg.batch_size)
    prompts = [render_prompt(tokenizer, r.messages, r.prefix) for r in requests]

    run_batched(model, tokenizer, requests[:2], prompts[:2], cfg)  # warm-up
    results = {"batched": [], "unshared": [], "one_at_a_time": []}
    for _ in range(args.repeats):
        for name, fn in (("batched", run_batched), ("unshared", run_unshared), ("one_at_a_time", run_one_at_a_time)):
            count, seconds = fn(model, tokenizer, requests, prompts, cfg)
            results[name].append(count / seconds)
    batched = statistics.median(results["batched"])
    unshared = statistics.median(results["unshared"])
    single = statistics.median(results["one_at_a_time"])
    ratio, sharing = batched / single, batched / unshared
    judgments = sum(len(r.samples) for r in requests)
    print(f"{judgments} judgments of {args.max_new_tokens} tokens: batched {batched:.2f}/s, "
          f"batched with a prompt per sample {unshared:.2f}/s, one at a time {single:.2f}/s, "
          f"ratio {ratio:.1f}x, sharing {sharing:.2f}x")
    if args.no_write:
        return 0
    n_params = sum(p.numel() for p in model.parameters())
    device = "GPU" if torch.cuda.is_available() else "CPU"
    if args.load_in_4bit:  # packed 4-bit weights count half: report the published size
        from shapes import SHAPES as PUBLISHED

        n_params, device = PUBLISHED[args.shape].params(), "GPU, 4-bit NF4 via conj_lite.models"
    target = "≥ 8× (GPU)" if torch.cuda.is_available() else "≥ 2× (CPU)"
    command = "python benchmarks/sampling.py" + ("" if args.shape == "tiny" else f" --shape {args.shape}")
    command += " --load-in-4bit" if args.load_in_4bit else ""
    body = f"""
Date: {today()}. Machine: {machine()}. Versions: {versions('torch', 'transformers')}.
Command: `{command}`

Model: {args.shape} ({n_params / 1e6:.1f}M parameters, {device}). Plan: {len(pairs)} labelled pairs × 2 orders ×
({args.n_repeats} repeats + 1 true hint + 1 reversed hint) = {judgments} judgments of {args.max_new_tokens} new tokens each,
temperature 1.2, top-p 0.95; batched = up to {args.batch_size} sequences per `generate` call. Median of {args.repeats} runs.

| path | judgments/s |
|---|---:|
| one at a time | {single:.2f} |
| batched, each repeat evaluating its own copy of the prompt | {unshared:.2f} |
| batched (conj-lite sample: a prompt evaluated once for its repeats) | {batched:.2f} |
| **ratio** batched ÷ one at a time | **{ratio:.1f}×** (target {target}) |
| prompt sharing: batched ÷ batched with a prompt per sample | {sharing:.2f}× |
"""
    raw = {"date": today(), "machine": machine(), "args": vars(args), "judgments": judgments,
           "batched_per_s": results["batched"], "unshared_per_s": results["unshared"],
           "one_at_a_time_per_s": results["one_at_a_time"], "ratio": ratio, "sharing": sharing}
    title = "Sampling: batched vs one at a time" + ("" if args.shape == "tiny" else f" ({args.shape}, {device[:3]})")
    title = title.replace(", GPU)", ", 4-bit, GPU)") if args.load_in_4bit else title
    path = write_section(title, body, raw, f"sampling_{args.shape}{'_4bit' if args.load_in_4bit else ''}.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
