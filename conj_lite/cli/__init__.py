"""The `conj-lite` command: a thin shell over `conj_lite.pipeline`.

    conj-lite run recipes/tiny-cpu.yaml --out runs/tiny [--variant NAME] [section.key=value ...]
    conj-lite sample|filter|train --recipe R --out DIR [--round N] [section.key=value ...]
    conj-lite export ... / conj-lite judge ...      (see --help of each)
    conj-lite recipes                                (the shipped recipes and the variants)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import InputError

EXIT_INPUT = 2
EXIT_INTERRUPTED = 130


def _stage_parser(sub, name: str, help: str, recipe_positional: bool = False):
    p = sub.add_parser(name, help=help, description=help)
    if recipe_positional:
        p.add_argument("recipe", help="recipe YAML (see `conj-lite recipes`)")
    else:
        p.add_argument("--recipe", help="recipe YAML (default: all defaults)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--variant", help="a named variant applied before the overrides (see `conj-lite recipes`)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides, e.g. sampling.n_repeats=4")
    return p


def shipped_recipes() -> list[Path]:
    root = Path(__file__).resolve().parent.parent / "recipes"
    return sorted(root.glob("*.yaml")) if root.is_dir() else []


def cmd_recipes(args) -> int:
    from rich.table import Table

    from .progress import get_console

    table = Table(title="conj-lite recipes")
    table.add_column("recipe")
    table.add_column("description")
    for path in shipped_recipes():
        import yaml

        raw = yaml.safe_load(path.read_text("utf-8")) or {}
        table.add_row(str(path), str(raw.get("description", "")))
    console = get_console()
    console.print(table)
    from .variants import VARIANTS

    variants = Table(title="variants (conj-lite run RECIPE --variant NAME)")
    for column in ("variant", "overrides", "what it does"):
        variants.add_column(column)
    for v in VARIANTS.values():
        variants.add_row(v.name, " ".join(v.overrides) or "-", v.summary)
    console.print(variants)
    return 0


def cmd_stage(args) -> int:
    from .pipeline import ConjRun

    from .variants import variant_overrides

    recipe = getattr(args, "recipe", None)
    run = ConjRun.from_recipe(recipe, args.out, [*variant_overrides(args.variant), *args.overrides])
    n = getattr(args, "round", 1)
    if n < 1 or n > max(run.recipe.rounds, 1):
        raise InputError(f"--round {n}: this recipe has rounds 1..{max(run.recipe.rounds, 1)}")
    if args.command == "sample":
        run.sample(n)
    elif args.command == "filter":
        run.filter(n)
    elif args.command == "train":
        run.train(n)
    elif args.command == "run":
        run.run_all(export=False if args.no_export else None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conj-lite",
        description="Train a small LLM into a pairwise judge with Con-J and run it locally as GGUF.",
    )
    parser.add_argument("--version", action="version", version=f"conj-lite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = _stage_parser(sub, "run", "run every stage of a recipe into --out (skips complete stages)", True)
    run.add_argument("--no-export", action="store_true", help="stop after training")
    run.set_defaults(func=cmd_stage)
    for name, help in (
        ("sample", "S1: sample judgments (plain and hint-driven, both orders) into judgments.jsonl"),
        ("filter", "S2: label judgments and build DPO pairs into pairs.jsonl and stats.json"),
        ("train", "S3: train the LoRA adapter with DPO + alpha*SFT into adapter/"),
    ):
        stage = _stage_parser(sub, name, help)
        stage.add_argument("--round", type=int, default=1, help="which round of an iterative recipe (default 1)")
        stage.set_defaults(func=cmd_stage)
    sub.add_parser("recipes", help="list the shipped recipes and the variants").set_defaults(func=cmd_recipes)
    for module in ("export", "judge", "evaluation"):
        try:
            mod = __import__(f"conj_lite.{module}", fromlist=["add_cli"])
        except ImportError:  # optional stages not present in this build
            continue
        if hasattr(mod, "add_cli"):
            mod.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse cannot take positional overrides after --out; collect them by hand.
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from .progress import get_console

    console = get_console()
    try:
        return args.func(args) or 0
    except InputError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return EXIT_INPUT
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: completed work is saved; run the same command again to resume")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
