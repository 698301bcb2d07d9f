"""Which GGUF type llama.cpp's CPU kernels run fastest for the work on the policy's own
weights (sampling, the DPO reference, the held-out pairs): the packaged SmolLM2-135M base
as f32, f16, q8_0 and the shipped Q4_1, side by side.

    python benchmarks/gguf_types.py [--prompts 24] [--rounds 3] [--threads N] [--write]

Prompt evaluation: the demo's judge prompts (template en-brief, relevance pairs of
data/hh_harmless_single_turn.jsonl.gz, both orders, with the verdict prefix), each
evaluated from an empty cache; tokens/s over all of them. Decoding: 32 tokens one at a
time after a prompt. The types take turns within every round; best of --rounds.
--write puts the table into docs/benchmarks.md (raw figures beside it)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from conj_lite.data import load_pairs  # noqa: E402
from conj_lite.export import quantize_gguf  # noqa: E402
from conj_lite.judging import Judge  # noqa: E402
from conj_lite.judging.backends import load_llama  # noqa: E402
from conj_lite.judging.verdicts import verdict_prefix  # noqa: E402
from conj_lite.packaged import BASE_GGUF, packaged_model_path  # noqa: E402
from conj_lite.prompts import ordered_answers  # noqa: E402
from conj_lite.relevance import relevance_split  # noqa: E402
from conj_lite.system import usable_cpus  # noqa: E402
from report import machine, today, versions, write_section  # noqa: E402

TITLE = "GGUF types for llama.cpp's work on the policy (benchmarks/gguf_types.py)"


def prompts(shipped: Path, n: int) -> list[list[int]]:
    """Token ids of the demo's judge prompts: n pairs' first order, then their second."""
    _, test = relevance_split(load_pairs(REPO / "data" / "hh_harmless_single_turn.jsonl.gz").pairs, 100, seed=0,
                              per_question=8, max_chars=600)
    with Judge.from_gguf(shipped, template="en-brief", mode="verdict", warn=None) as judge:
        return [judge.backend.tokenize(judge.prompt(p.question, *ordered_answers(p.answer_a, p.answer_b, order))
                                       + verdict_prefix(judge.template, ""))
                for order in ("ab", "ba") for p in test[: (n + 1) // 2]][:n]


def measure(path: Path, ids: list[list[int]], threads: int) -> tuple[float, float]:
    """(prompt tokens/s, decoded tokens/s) of one GGUF."""
    llm, _ = load_llama(path, n_ctx=1024, n_threads=threads)
    try:
        start = time.perf_counter()
        for prompt in ids:
            llm.reset()
            llm.eval(prompt)
        prefill = sum(map(len, ids)) / (time.perf_counter() - start)
        llm.reset()
        llm.eval(ids[0])
        start = time.perf_counter()
        for token in ids[1][:32]:
            llm.eval([token])
        decode = min(32, len(ids[1])) / (time.perf_counter() - start)
        return prefill, decode
    finally:
        llm.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    shipped = packaged_model_path("smollm2-135m") / BASE_GGUF
    ids = prompts(shipped, args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        files = {kind: quantize_gguf(shipped, Path(tmp) / f"{kind}.gguf", kind, threads=args.threads,
                                     allow_requantize=True) for kind in ("f32", "f16", "q8_0")}
        files["q4_1 (shipped)"] = shipped
        best: dict[str, list[float]] = {name: [0.0, 0.0] for name in files}
        for _ in range(args.rounds):
            for name, path in files.items():
                prefill, decode = measure(path, ids, args.threads)
                best[name] = [max(best[name][0], prefill), max(best[name][1], decode)]
    f16 = best["f16"][0]
    rows = [f"| {name} | {p:.0f} | {p / f16:.2f}× | {d:.1f} |" for name, (p, d) in best.items()]
    body = "\n".join([
        f"Run {today()} on {machine()}, {args.threads} threads. Versions: {versions('llama_cpp_python')}.",
        f"Command: `python benchmarks/gguf_types.py --prompts {args.prompts} --rounds {args.rounds}`.", "",
        f"{len(ids)} of the demo's judge prompts ({sum(map(len, ids)) / len(ids):.0f} tokens on average), each "
        "evaluated from an empty cache; decoding: 32 tokens one at a time. Best of "
        f"{args.rounds} rounds, the types in turn.", "",
        "| GGUF | prompt tokens/s | × f16 | decoded tokens/s |", "|---|---:|---:|---:|", *rows])
    print(body)
    if args.write:
        print(write_section(TITLE, body, {"best": best, "prompts": len(ids), "threads": args.threads},
                            "gguf_types.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
