"""rich progress bars shared by the long stages."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second in this run; pass `resumed=N` to add_task to leave out
    items that an earlier run finished."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        done = task.completed - task.fields.get("resumed", 0)
        rate = done / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:.2f} {self.unit}/s", style="progress.data.speed")


class StatusColumn(ProgressColumn):
    """A short live status (loss, margin) set with progress.update(task, status=...)."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("status", "")), style="dim")


def quiet_libraries() -> None:
    """transformers' and datasets' own tqdm bars would fight with rich's."""
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


_console = None


def get_console() -> Console:
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


@contextmanager
def stage_progress(stage: str, console: Console | None = None, unit: str = "judgments"):
    progress = Progress(
        TextColumn(f"[bold]{stage}[/] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        StatusColumn(),
        console=console or get_console(),
        transient=False,
    )
    with progress:
        yield progress
