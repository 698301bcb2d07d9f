"""Verdict mode in llama.cpp: the prompts of several pairs together in one batch, with one
unified KV cache or one KV stream per sequence, against one prompt at a time (the main
context, reusing the KV cache of the prefix it shares with the prompt before).

    python benchmarks/kv_layout.py [--model FILE.gguf] [--pairs 8] [--threads N] [--rounds 3]

Every variant evaluates the same token lists (the judge prompt + the verdict prefix, both
orders of every pair) and shares prefixes the same way (the prefix common to all prompts
once, then each pair's common prefix once, copied with llama_memory_seq_cp as full
copies, which both cache layouts accept). Prints the best of --rounds per variant; the
parallel judge uses the unified layout (ParallelDecoder)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conj_lite.data import load_pairs  # noqa: E402
from conj_lite.judging import Judge  # noqa: E402
from conj_lite.judging.backends import shared_prefix  # noqa: E402
from conj_lite.judging.verdicts import verdict_prefix  # noqa: E402
from conj_lite.prompts import ordered_answers  # noqa: E402
from conj_lite.system import usable_cpus  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a GGUF judge (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--data", default=str(REPO / "data" / "sample_prefs.jsonl"))
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    import llama_cpp

    if args.model:
        model = Path(args.model)
    else:
        from conj_lite.packaged import BASE_GGUF, packaged_model_path

        model = packaged_model_path("smollm2-135m") / BASE_GGUF
    pairs = load_pairs(args.data).pairs[: args.pairs]
    with Judge.from_gguf(model, template="en", n_threads=args.threads, warn=None) as judge:
        llm, lib = judge.backend.llm, llama_cpp
        groups = [[judge.backend.tokenize(judge.prompt(p.question, *ordered_answers(p.answer_a, p.answer_b, o))
                                          + verdict_prefix(judge.template, "")) for o in ("ab", "ba")] for p in pairs]
        n_seq = 2 * len(groups)
        longest = max(len(ids) for group in groups for ids in group)

        def context(unified: bool, n_ctx: int):
            params = lib.llama_context_params.from_buffer_copy(llm.context_params)
            params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx, n_seq, unified
            params.n_batch, params.n_ubatch = 2048, 512
            ctx = lib.llama_init_from_model(llm._model.model, params)
            if not ctx:
                raise SystemExit(f"llama.cpp could not make a {n_seq}-sequence context of {n_ctx} cells")
            return ctx

        batch = lib.llama_batch_init(2048, 0, 1)

        def decode(ctx, entries) -> None:
            for start in range(0, len(entries), 2048):
                chunk = entries[start:start + 2048]
                for i, (seq, pos, token, want) in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                    batch.seq_id[i][0], batch.logits[i] = seq, want
                batch.n_tokens = len(chunk)
                if lib.llama_decode(ctx, batch) != 0:
                    raise SystemExit("llama_decode failed")

        def together(ctx) -> None:
            memory = lib.llama_get_memory(ctx)
            lib.llama_memory_clear(memory, True)
            every = [ids for group in groups for ids in group]
            top = shared_prefix(every)
            decode(ctx, [(0, pos, token, False) for pos, token in enumerate(every[0][:top])])
            for g in range(1, len(groups)):
                lib.llama_memory_seq_cp(memory, 0, 2 * g, -1, -1)
            commons = [max(shared_prefix(group), top) for group in groups]
            decode(ctx, [(2 * g, pos, group[0][pos], False) for g, group in enumerate(groups)
                         for pos in range(top, commons[g])])
            for g in range(len(groups)):
                lib.llama_memory_seq_cp(memory, 2 * g, 2 * g + 1, -1, -1)
            decode(ctx, [(2 * g + k, pos, ids[pos], pos == len(ids) - 1) for g, group in enumerate(groups)
                         for k, ids in enumerate(group) for pos in range(commons[g], len(ids))])

        def alone() -> None:
            for group in groups:
                for ids in group:
                    judge.backend.next_logits(ids)

        per_seq = ((longest + 255) // 256) * 256
        unified, streams = context(True, 2 * per_seq * n_seq // 2), context(False, per_seq * n_seq)
        variants = {"one prompt at a time (prefix reuse)": alone,
                    "together, one unified KV cache": lambda: together(unified),
                    "together, one KV stream per sequence": lambda: together(streams)}
        best = {name: float("inf") for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        lib.llama_batch_free(batch)
        for ctx in (unified, streams):
            lib.llama_free(ctx)
    print(f"{model.name}, {len(groups)} pairs x 2 orders ({sum(map(len, every_prompt(groups)))} prompt tokens), "
          f"{args.threads} threads, best of {args.rounds}:")
    for name, seconds in best.items():
        print(f"  {name:38s} {seconds:6.3f} s  ({60 * len(groups) / seconds:6.1f} pairs/min)")
    return 0


def every_prompt(groups):
    return [ids for group in groups for ids in group]


if __name__ == "__main__":
    raise SystemExit(main())
