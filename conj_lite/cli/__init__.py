"""The `conj-lite` command: a thin shell over the library (`conj_lite.pipeline`,
`conj_lite.export`, `conj_lite.judging`), one module per command group:

    conj-lite run tiny-cpu --out runs/tiny [--variant NAME] [section.key=value ...]   (stages)
    conj-lite sample|filter|train --recipe R --out DIR [--round N] [section.key=value ...]
    conj-lite recipes                     the shipped recipes and the variants          (stages)
    conj-lite export ...                  S4 on its own                                 (export)
    conj-lite judge ...                   judge a pair or a data file                   (judge)
    conj-lite eval ...                    evaluate judges side by side                  (eval)
    conj-lite serve ...                   the judge as a local HTTP service             (serve)

Flags that are recipe fields are generated from the config dataclasses (`options`).
"""

from __future__ import annotations

import argparse

from rich.text import Text

from .. import __version__
from ..config import shipped_recipes  # noqa: F401  (what `conj-lite recipes` lists)
from ..errors import InputError
from ..jsonio import no_space_error
from ..progress import get_console
from ..system import network_switches
from . import eval as eval_command
from . import export as export_command
from . import judge as judge_command
from . import serve as serve_command
from . import stages

EXIT_INPUT = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conj-lite",
        description="Train a small LLM into a pairwise judge with Con-J and run it locally as GGUF.",
    )
    parser.add_argument("--version", action="version", version=f"conj-lite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    stages.add_commands(sub)
    for command in (export_command, judge_command, eval_command, serve_command):
        command.add_command(sub)
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
    console = get_console()
    network_switches()  # no telemetry; a run whose inputs are all local also goes offline (ConjRun)
    try:
        return args.func(args) or 0
    except (InputError, OSError) as exc:
        # A full disk met outside conj-lite's own writers (a library's file) reads the same.
        error = exc if isinstance(exc, InputError) else no_space_error(exc.filename or "a file", exc)
        if error is None:
            raise
        # Plain text: a path or label may hold "[bold]" or "[/x]", which rich would read as markup.
        console.print(Text.assemble(("error:", "bold red"), " ", str(error)), highlight=False, soft_wrap=True)
        return EXIT_INPUT
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: completed work is saved; run the same command again to resume")
        return EXIT_INTERRUPTED
