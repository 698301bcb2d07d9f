"""Batched vs one-at-a-time judgment sampling, side by side on the same model.

    python benchmarks/sampling.py                      # tiny local model on CPU
    python benchmarks/sampling.py --shape smollm2      # the embedded real model (packaged), CPU
    python benchmarks/sampling.py --shape qwen2.5-1.5b # real-shaped random init (GPU)
    python benchmarks/sampling.py --shape qwen2.5-1.5b --load-in-4bit   # 4-bit NF4, as the GPU recipes sample
    python benchmarks/sampling.py --engines            # transformers vs llama.cpp engine, SmolLM2, the demo's recipe
    python benchmarks/sampling.py --overhead           # the frame sampler's per-token cost, batch 32, 49k/152k vocab

`--engines` samples the demo's plan (recipe smollm2-135m_cpu: its pairs, repeats, hints,
temperature, 48 new tokens, batch 32) with each engine through `sample_judgments`, the
engines opened once and the runs alternated (--repeats times), and reports judgments/s
and the ratio. `--overhead` times one step of `FrameSampler` (grammar mask + draw for
a whole batch, as `generate` calls it) against the per-row sampler of commit 1ecf871
(read from git), on real SmolLM2 logits inside a rationale, padded with low logits to a
152k vocabulary.

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


def load_average() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


ENGINE_WORKLOAD = ("sampling.n_repeats=2", "sampling.max_new_tokens=48", "filtering.rationale=true")


def engines_benchmark(args) -> int:
    """transformers vs llama.cpp engine on SmolLM2, the demo's recipe, side by side."""
    import dataclasses
    import json
    import os

    from conj_lite.config import find_recipe, load_recipe
    from conj_lite.data import heldout_split
    from conj_lite.engines import open_engine
    from conj_lite.packaged import packaged_model_path
    from conj_lite.sampling import round_trip_texts, sample_judgments
    from conj_lite.system import usable_cpus

    # The demo's sampling settings with the paper's sampled judgments: the demo itself now writes its
    # verdict-only hint couples without the model (nothing for an engine to do), so the measured
    # workload keeps the rationale and 2 repeats per order.
    recipe = load_recipe(find_recipe("smollm2-135m_cpu"), list(ENGINE_WORKLOAD))
    torch.set_num_threads(usable_cpus())
    base = str(packaged_model_path("smollm2-135m"))
    template = dataclasses.replace(load_template(recipe.prompts.template), rationale=recipe.filtering.rationale)
    pairs, _ = heldout_split([p for p in load_pairs(REPO / recipe.data.path).pairs], recipe.data.heldout)
    pairs = [p for p in pairs if p.label != "tie"][: args.pairs or None]
    load_before = load_average()
    engines, opened = {}, {}
    for name in ("transformers", *(f"llama.cpp {kind}" for kind in args.gguf_types)):
        engine_recipe = recipe
        if name != "transformers":
            engine_recipe = dataclasses.replace(recipe, sampling=dataclasses.replace(
                recipe.sampling, gguf_type=name.split()[1]))
        start = time.perf_counter()
        engines[name] = open_engine(name.split()[0], base, None, engine_recipe)
        engines[name].prepare(template, recipe.prompts.date_string, round_trip_texts(template, pairs))
        opened[name] = round(time.perf_counter() - start, 2)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "conj-lite-bench-engines"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, list] = {name: [] for name in engines}
    verdicts: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            out = work / f"{name.replace(' ', '-')}.jsonl"
            out.unlink(missing_ok=True)
            summary = sample_judgments(engine, pairs, template, recipe.sampling, out)
            rows = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
            results[name].append({"judgments": summary.generated, "seconds": round(summary.seconds, 2),
                                  "per_s": round(summary.per_second, 3),
                                  "new_tokens": sum(r["new_tokens"] for r in rows)})
            verdicts[name] = [r["verdict"] for r in rows if r["kind"] == "repeat"]
            print(f"{name}: {summary.generated} judgments in {summary.seconds:.1f}s ({summary.per_second:.2f}/s), "
                  f"load {load_average()}", flush=True)
    for engine in engines.values():
        engine.close()
    best = {name: max(r["per_s"] for r in runs) for name, runs in results.items()}
    ratios = {name: best[name] / best["transformers"] for name in engines if name != "transformers"}
    rate1 = {name: round(v.count(1) / len(v), 3) for name, v in verdicts.items()}
    load_after = load_average()
    print(f"llama.cpp / transformers: {', '.join(f'{k} {v:.2f}x' for k, v in ratios.items())}; "
          f"answer-1 rate {rate1}; load {load_before} -> {load_after}")
    if args.no_write:
        return 0
    n = results["transformers"][0]["judgments"]
    types = "" if args.gguf_types == ["f32"] else " --gguf-types " + " ".join(args.gguf_types)
    rows = "\n".join(f"| {name} | {opened[name]} | {best[name]:.2f} | {results[name][0]['new_tokens']} | {rate1[name]} | "
                     + ("" if name == "transformers" else f"**{ratios[name]:.2f}×**") + " |" for name in engines)
    body = f"""
Date: {today()}. Machine: {machine()}, {usable_cpus()} threads. Versions: {versions('torch', 'transformers', 'llama_cpp_python', 'llguidance')}.
Command: `python benchmarks/sampling.py --engines{f' --pairs {args.pairs}' if args.pairs != 8 else ''} --repeats {args.repeats}{types}`. Load average {load_before} before, {load_after} after.

The demo's sampling settings (recipe `smollm2-135m_cpu` with {', '.join(ENGINE_WORKLOAD)}: judgments with a rationale,
{len(pairs)} labelled pairs × 2 orders × (2 repeats + 2 hints) = {n} judgments, frame grammar, temperature 0.8, top-p 0.95, ≤ 48 new tokens, batch 32) with each engine through
`sample_judgments`, best of {args.repeats} alternated runs. transformers: fp32 HF `generate`, the prompt's KV cache shared
by its repeats. llama.cpp: the packaged GGUF rewritten in the type named (`sampling.gguf_type`), an example's prompts
in one batch (its plain prompt evaluated once for its repeats and hinted prompts), flash attention. All engines use
the same frame sampler and per-judgment seeds. Goal: ≥ 5× transformers.

| engine | opened in (s) | judgments/s | new tokens | answer-1 rate (repeats) | ÷ transformers |
|---|---:|---:|---:|---:|---:|
{rows}
"""
    raw = {"date": today(), "machine": machine(), "threads": usable_cpus(), "load_before": load_before,
           "load_after": load_after, "pairs": len(pairs), "opened_s": opened, "runs": results, "ratios": ratios,
           "answer1_rate": rate1}
    print(f"wrote {write_section('Sampling engines: transformers vs llama.cpp (SmolLM2, CPU)', body, raw, 'sampling_engines.json')}")
    return 0


BASELINE_COMMIT = "1ecf871"  # the per-row FrameSampler that issue 21 measured


def baseline_frame_module():
    """conj_lite/frame.py as of BASELINE_COMMIT, imported from git as conj_lite._frame_baseline."""
    import subprocess
    import types

    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:conj_lite/frame.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("conj_lite._frame_baseline")
    module.__package__ = "conj_lite"
    exec(compile(source, f"{BASELINE_COMMIT}:conj_lite/frame.py", "exec"), module.__dict__)
    return module


def rationale_logits(batch: int):
    """Real SmolLM2 logits (batch, 49152) at positions inside a judgment's rationale."""
    from transformers import AutoModelForCausalLM

    from conj_lite.packaged import packaged_model_path
    from conj_lite.prompts import build_messages

    path = str(packaged_model_path("smollm2-135m"))
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    template = load_template("en")
    text = render_prompt(tokenizer, build_messages(template, "What is 7 + 5?", "12", "13")) + (
        '{"rationale": "Answer 1 is better because it gives the right sum, twelve, while answer 2 is off by one and '
        'does not explain how it was found, so a reader would be misled by it and learn nothing from it at all')
    ids = tokenizer(text, add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -batch:].float()
    return tokenizer, logits


def overhead_benchmark(args) -> int:
    """One FrameSampler step for a batch of 32 inside a rationale: today's vs 1ecf871's."""
    from conj_lite.frame import FrameSampler, judgment_grammar, judgment_lark

    torch.set_num_threads(1)  # what the sampler costs on one core, the model aside
    batch, steps = 32, args.steps
    old_module = baseline_frame_module()
    tokenizer, logits = rationale_logits(batch)
    template = load_template("en")
    # what each sampled with: 1ecf871 the GBNF, today the Lark form (the rationale one lexeme)
    grammars = {"per-row (1ecf871)": judgment_grammar(template), "batched": judgment_lark(template)}
    head = tokenizer('{"rationale": "Answer', add_special_tokens=False).input_ids
    load_before = load_average()
    rows = {}
    for vocab in (49152, 151936):
        scores = logits
        if vocab > logits.shape[1]:  # a larger vocabulary: the extra tokens far below the real ones
            low = logits.min(dim=1, keepdim=True).values - 10
            scores = torch.cat([logits, low.expand(-1, vocab - logits.shape[1])], dim=1)
        timing = {"per-row (1ecf871)": float("inf"), "batched": float("inf")}
        for _ in range(args.repeats):  # alternated, so that load on the machine hits both alike
            for name, cls in (("per-row (1ecf871)", old_module.FrameSampler), ("batched", FrameSampler)):
                sampler = cls(tokenizer, [grammars[name]] * batch, list(range(batch)), temperature=0.8, top_p=0.95,
                              max_new_tokens=64, eos_ids=[tokenizer.eos_token_id], closing_tokens=10)
                ids = torch.full((batch, 1), tokenizer.eos_token_id)  # a one-token "prompt"
                out = sampler(ids, scores)
                for token in head:  # into the rationale
                    ids = torch.cat([ids, torch.full((batch, 1), token)], dim=1)
                    out = sampler(ids, scores)
                spent = 0.0
                for _ in range(steps):  # then the sampler's own tokens, as generate feeds them back
                    ids = torch.cat([ids, out.argmax(-1, keepdim=True)], dim=1)
                    start = time.perf_counter()
                    out = sampler(ids, scores)
                    spent += time.perf_counter() - start
                timing[name] = min(timing[name], spent / steps)
        rows[vocab] = timing
        print(f"vocab {vocab}: " + ", ".join(f"{k} {1000 * v / batch:.3f} ms/row" for k, v in timing.items())
              + f", ratio {timing['per-row (1ecf871)'] / timing['batched']:.1f}x", flush=True)
    load_after = load_average()
    if args.no_write:
        return 0
    lines = "\n".join(
        f"| {vocab:,} | {1000 * t['per-row (1ecf871)'] / batch:.3f} | {1000 * t['batched'] / batch:.3f} | "
        f"**{t['per-row (1ecf871)'] / t['batched']:.1f}×** |" for vocab, t in rows.items())
    body = f"""
Date: {today()}. Machine: {machine()}, 1 torch thread. Versions: {versions('torch', 'llguidance')}.
Command: `python benchmarks/sampling.py --overhead --steps {steps} --repeats {args.repeats}`. Load average {load_before} before, {load_after} after.

One step of the frame sampler (`FrameSampler.__call__` as `generate` calls it: grammar mask, temperature 0.8,
top-p 0.95, one draw per row) for a batch of 32 rows inside a rationale, on real SmolLM2 logits (the 152k rows are
the same logits padded with tokens 10 below the lowest), best of {args.repeats} × {steps} steps, per row. Per-row
(1ecf871): for every row, the logits copied to the CPU, a softmax, a full sort for top-p, the bitmask unpacked, the
GBNF grammar. Batched: one llguidance fill for the batch from the Lark form of the same grammar (the rationale one
lexeme), the mask, top-p on the nucleus candidates (`topk`), inverse-CDF draws with one uniform per row from the row's
own generator, on the logits' device.

| vocabulary | per-row (1ecf871), ms/row | batched, ms/row | per-row ÷ batched (goal ≥ 5×) |
|---:|---:|---:|---:|
{lines}
"""
    raw = {"date": today(), "machine": machine(), "batch": batch, "steps": steps, "load_before": load_before,
           "load_after": load_after, "seconds_per_step": {str(k): v for k, v in rows.items()}}
    print(f"wrote {write_section('Frame sampler overhead per token (CPU, batch 32)', body, raw, 'sampling_overhead.json')}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "smollm2", *SHAPES], default="tiny",
                        help="smollm2: SmolLM2-135M-Instruct from the package (its own tokenizer), fp32")
    parser.add_argument("--pairs", type=int, default=None,
                        help="labelled pairs from data/sample_prefs.jsonl (default 6; --engines: 8; 0 = all)")
    parser.add_argument("--n-repeats", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each path (median reported)")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="GPU, with --shape: load the model in 4-bit NF4 through conj_lite.models, as the recipes do")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch docs/")
    parser.add_argument("--gguf-types", nargs="+", default=["f32"], choices=("f32", "f16", "q8_0"),
                        help="--engines: the llama.cpp engine on each of these GGUF types (sampling.gguf_type)")
    parser.add_argument("--engines", action="store_true",
                        help="transformers vs llama.cpp engine on SmolLM2 with the demo's recipe (--pairs: default 8, 0 = all)")
    parser.add_argument("--overhead", action="store_true", help="the frame sampler's per-token cost, batch 32")
    parser.add_argument("--steps", type=int, default=20, help="--overhead: timed sampler steps")
    args = parser.parse_args(argv)
    if args.engines:
        # The demo's whole plan is 446 pairs (3,568 sampled judgments, about an hour per engine on 2
        # cores): the default takes its first 8 (64 judgments), --pairs 0 all of them.
        args.pairs = 8 if args.pairs is None else args.pairs
        return engines_benchmark(args)
    if args.overhead:
        return overhead_benchmark(args)
    args.pairs = 6 if args.pairs is None else args.pairs
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
