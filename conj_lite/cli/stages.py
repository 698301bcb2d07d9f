"""`conj-lite run|sample|filter|train` (the stages of a recipe) and `conj-lite recipes`."""

from __future__ import annotations

import yaml
from rich.table import Table

from ..config import shipped_recipes
from ..errors import InputError
from ..pipeline import ConjRun
from ..progress import get_console
from ..variants import VARIANTS, variant_overrides

STAGES = (
    ("sample", "S1: sample judgments (plain and hint-driven, both orders) into judgments.jsonl"),
    ("filter", "S2: label judgments and build DPO pairs into pairs.jsonl and stats.json"),
    ("train", "S3: train the LoRA adapter with DPO + alpha*SFT into adapter/"),
)


def _stage_parser(sub, name: str, help: str, recipe_positional: bool = False):
    p = sub.add_parser(name, help=help, description=help)
    if recipe_positional:
        p.add_argument("recipe", help="recipe YAML, or the name of a shipped one (see `conj-lite recipes`)")
    else:
        p.add_argument("--recipe", help="recipe YAML or a shipped recipe's name (default: all defaults)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--variant", help="a named variant applied before the overrides (see `conj-lite recipes`)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides, e.g. sampling.n_repeats=4")
    return p


def add_commands(sub) -> None:
    run = _stage_parser(sub, "run", "run every stage of a recipe into --out (skips complete stages)", True)
    run.add_argument("--no-export", action="store_true", help="stop after training")
    run.set_defaults(func=run_stage)
    for name, help in STAGES:
        stage = _stage_parser(sub, name, help)
        stage.add_argument("--round", type=int, default=1, help="which round of an iterative recipe (default 1)")
        stage.set_defaults(func=run_stage)
    sub.add_parser("recipes", help="list the shipped recipes and the variants").set_defaults(func=list_recipes)


def list_recipes(args) -> int:
    table = Table(title="conj-lite recipes (conj-lite run NAME --out DIR)")
    table.add_column("recipe")
    table.add_column("description")
    for path in shipped_recipes():
        raw = yaml.safe_load(path.read_text("utf-8")) or {}
        table.add_row(path.stem, str(raw.get("description", "")))
    console = get_console()
    console.print(table)
    variants = Table(title="variants (conj-lite run RECIPE --variant NAME)")
    for column in ("variant", "overrides", "what it does"):
        variants.add_column(column)
    for v in VARIANTS.values():
        variants.add_row(v.name, " ".join(v.overrides) or "-", v.summary)
    console.print(variants)
    return 0


def run_stage(args) -> int:
    recipe = getattr(args, "recipe", None)
    run = ConjRun.from_recipe(recipe, args.out, [*variant_overrides(args.variant), *args.overrides],
                              offline_when_local=True)  # this process runs this one recipe
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
