"""`conj-lite judge`: judge one pair, or every pair of a data file into a JSONL."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..artifacts import fingerprint_id
from ..data import load_pairs, text_problem
from ..errors import InputError
from ..jsonio import JudgmentFile
from ..judging import selective
from ..judging.backends import BACKENDS
from ..judging.batch import judge_file, judge_provenance
from ..judging.judge import open_judge
from ..progress import get_console
from .options import add_data_args, add_risk_args, add_runtime_args, data_options, describe_loaded, runtime_options


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "judge",
        help="judge pairs locally: a GGUF file via llama-cpp-python (default) or a transformers model",
        description="Judge one pair (--question/--answer-a/--answer-b) or every pair of a data file (--data) "
        "in both answer orders. Prints the verdict (A, B or inconsistent) and P(A better); "
        "with --data, writes one JSONL record per pair to --output and resumes an interrupted run.",
    )
    p.add_argument("--model", required=True, help="a .gguf file, or a transformers model / LoRA adapter directory")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="auto: gguf for a file, hf for a directory")
    p.add_argument("--adapter", help="hf backend: a LoRA adapter to put on --model (the base)")
    p.add_argument("--base", help="hf backend: the base model of an adapter given as --model")
    p.add_argument("--question", help="the question of a single pair")
    p.add_argument("--answer-a", help="answer A of a single pair")
    p.add_argument("--answer-b", help="answer B of a single pair")
    add_data_args(p, required=False)
    p.add_argument("--output", help="JSONL output (required with --data; optional for a single pair: appended)")
    p.add_argument("--fresh", action="store_true",
                   help="judge --data again from scratch: an existing --output (made by another judge setup or "
                   "not) is kept as OUTPUT.stale-<time>, not resumed")
    add_runtime_args(p)
    add_risk_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    console = get_console()
    single = [args.question, args.answer_a, args.answer_b]
    if args.path and any(x is not None for x in single):
        raise InputError("give either --data or --question/--answer-a/--answer-b, not both")
    if not args.path and any(x is None for x in single):
        raise InputError("give --question, --answer-a and --answer-b (or --data FILE)")
    if args.path and not args.output:
        raise InputError("--data needs --output FILE.jsonl for the judgments")
    for flag, value in (("--question", args.question), ("--answer-a", args.answer_a), ("--answer-b", args.answer_b)):
        problem = value is not None and text_problem(value, answer=flag != "--question")
        if problem:  # the rule of the data loader and the judge service
            raise InputError(f"{flag} {problem}")
    selective.check_risk_args(args)  # bad options and data fail before a model loads
    if args.path:
        options = data_options(args)
        loaded = load_pairs(args.path, rejects_path=Path(str(args.output) + ".rejects.jsonl"), **options)
    judge = open_judge(args.model, backend=args.backend, adapter=args.adapter, base=args.base,
                       **runtime_options(args))
    try:
        threshold = selective.threshold_from_args(args, judge, console)
        if args.path:
            console.print(describe_loaded(loaded, args.path), highlight=False, markup=False)
            summary = judge_file(judge, loaded.pairs, args.output, mode=args.mode, console=console,
                                 model_name=str(args.model), fresh=args.fresh, limit=options["limit"])
            selective.mark_file(summary.path, threshold, console)
            acc = "n/a" if summary.accuracy is None else f"{100 * summary.accuracy:.1f}%"
            cons = "n/a" if summary.consistency is None else f"{100 * summary.consistency:.1f}%"
            console.print(
                f"judge: {summary.judged} pairs judged ({summary.resumed} already done) in {summary.seconds:.1f}s "
                f"({summary.per_minute:.1f}/min) into {summary.path}; accuracy {acc}, consistent {cons}",
                highlight=False, markup=False,
            )
            return 0
        result = judge.compare(args.question, args.answer_a, args.answer_b, mode=args.mode)
        record = selective.mark_record(result.to_record(), threshold)
        if args.output:
            JudgmentFile(args.output).append([{"id": f"cli-{int(time.time() * 1000)}", **record,
                                               "fingerprint": fingerprint_id(judge_provenance(judge, args.mode))}])
        ab, ba = result.orders["ab"], result.orders["ba"]
        console.print(
            f"[bold]verdict: {result.verdict}[/]  P(A better) = {result.p_a:.3f}  "
            f"(order ab: {ab.label}, order ba: {ba.label})",
            highlight=False,
        )
        if threshold is not None:
            console.print(f"selective verdict: {record['selective_verdict']} (confidence {record['confidence']}, "
                          f"threshold {threshold.threshold})", highlight=False, markup=False)
        for o in (ab, ba):
            if o.rationale:
                console.print(f"  {o.order}: {o.rationale}", highlight=False, markup=False)
        print(json.dumps(record, ensure_ascii=False))
        return 0
    finally:
        judge.close()
