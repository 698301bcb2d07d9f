"""`conj-lite eval`: evaluate one or more judges on labelled pairs, side by side."""

from __future__ import annotations

from pathlib import Path

from ..data import load_pairs
from ..artifacts import fingerprint_id
from ..errors import InputError
from ..judging.batch import judge_provenance, meta_path
from ..judging.evaluation import TIE_POLICIES, default_name, evaluate, file_name, print_report, split_name, write_report
from ..judging.judge import open_judge
from ..progress import get_console
from .options import add_data_args, add_risk_args, add_runtime_args, data_options, describe_loaded, runtime_options


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate one or more judges on labelled pairs: accuracy both ways, consistency, bias, calibration",
        description="Judge every pair of --data in both answer orders with each --judge and write report.json, "
        "report.md, plots/*.png and judgments/<judge>.jsonl to --out. Several judges (e.g. before and after "
        "training) are reported side by side. A judge is a .gguf file, a merged model directory, a LoRA adapter "
        "directory, an untrained base model (directory or hub id), or 'tiny'; name it with NAME=SPEC.",
    )
    p.add_argument("--judge", action="append", default=[], metavar="[NAME=]SPEC",
                   help="a judge to evaluate (repeat for several)")
    p.add_argument("--compare", nargs="+", default=[], metavar="[NAME=]SPEC",
                   help="judges to put side by side (same as repeating --judge)")
    add_data_args(p, required=True)
    p.add_argument("--out", required=True, help="output directory for the report")
    p.add_argument("--ties", default="drop", choices=TIE_POLICIES,
                   help="tie-labelled pairs: drop (default), count-half (any verdict half right), "
                   "as-class (tie = the two orders disagree)")
    p.add_argument("--probes", action="store_true", help="also run the verbosity and injection bias probes")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the calibration split")
    add_runtime_args(p)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_risk_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    console = get_console()
    specs = list(args.judge) + list(args.compare)
    if not specs:
        raise InputError("give at least one --judge SPEC (a .gguf file, a model or adapter directory, or 'tiny')")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be a positive integer, got {args.limit}")
    if args.bootstrap < 0:
        raise InputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.calibration is not None and args.risk is None:
        raise InputError("--calibration needs --risk ALPHA (the largest acceptable error rate, e.g. 0.1)")
    out = Path(args.out)
    loaded = load_pairs(args.path, rejects_path=out / "rejects.jsonl", **data_options(args))
    pairs = loaded.pairs
    msg = f"eval: {len(pairs)} pairs from {args.path}"
    if loaded.n_ties:
        msg += f", {loaded.n_ties} ties ({args.ties})"
    console.print(msg, highlight=False, markup=False)
    console.print(describe_loaded(loaded, args.path), highlight=False, markup=False)
    reports, used, partials = {}, set(), []
    for spec in specs:
        name, spec = split_name(spec)
        name = name or default_name(spec)
        while name in used:
            name += "'"
        used.add(name)
        judge = open_judge(spec, **runtime_options(args))
        try:
            # the judge's fingerprint is in the name of its resumable records: another judge
            # (or the same file rebuilt) under the same name never resumes from them
            fid = fingerprint_id(judge_provenance(judge, args.mode))
            partials.append(out / "judgments" / f"{file_name(name)}.{fid}.partial.jsonl")
            reports[name] = evaluate(
                judge, pairs, mode=args.mode, ties=args.ties, bootstrap=args.bootstrap, seed=args.seed,
                probes=args.probes, risk=args.risk, calibration=args.calibration, delta=args.delta, name=name,
                records_path=partials[-1], data=str(args.path), console=console,
            )
            reports[name].judge = str(spec)
        finally:
            judge.close()
    paths = write_report(reports, out, plots=not args.no_plots)
    for partial in partials:
        for done in (partial, meta_path(partial)):
            if done.exists():
                done.unlink()  # the finished records are in judgments/<name>.jsonl (+ .meta.json)
    print_report(reports, console)
    console.print(f"eval: report in {paths['report.md']} and {paths['report.json']}", highlight=False, markup=False)
    return 0
