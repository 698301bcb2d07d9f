"""JSON and JSONL files of our own making: one reader, one atomic writer, one append log.

    rows = read_jsonl(path)                    # every object; a bad line is an InputError naming it
    write_jsonl(path, rows)                    # written under a temporary name, then renamed
    log = JudgmentFile(path); log.append(rows); log.load()   # resumable: survives a kill mid-write

User data files (any format, with presets and rejects) are read by `conj_lite.data`;
this module is for the files conj-lite writes itself (judgments, pairs, warm-up sets,
manifests).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError


def dumps_line(row, default=None) -> str:
    """One JSONL line. Text keeps its characters (ensure_ascii=False); a lone surrogate
    (a model can write the escape `\\ud83d` in a JSON string, and json.loads accepts it)
    stays an escape, so the file is valid UTF-8 and reads back to the same string."""
    text = json.dumps(row, ensure_ascii=False, default=default)
    return text.encode("utf-8", "backslashreplace").decode("utf-8") + "\n"


def json_error(exc: json.JSONDecodeError) -> str:
    """A JSON syntax error in words: "Unterminated string starting at column 5" (json's
    own messages for some errors end in "at", so "{msg} at column" would say "at at")."""
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


# Errors that mean the file system is full (or this file may grow no more): the message
# says so and names the file instead of a chain of OSError tracebacks.
NO_SPACE = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached"}


def no_space_error(path: str | Path, exc: OSError) -> InputError | None:
    """An InputError "disk full while writing FILE" for an OSError that means no space; else None."""
    what = NO_SPACE.get(exc.errno)
    if what is None:
        return None
    return InputError(f"{what} while writing {path}; free some space and run the same command again "
                      "(finished work is kept and resumed)")


def iter_jsonl_objects(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(`file:line`, row) for every non-blank line of a JSONL file of our own making
    (pairs, warm-up judgments); the first bad line is an InputError naming it."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: invalid JSON: {json_error(exc)}") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: expected a JSON object")
            yield where, row


def read_jsonl(path: str | Path) -> list[dict]:
    """Every row of a JSONL file of our own making (see iter_jsonl_objects)."""
    return [row for _, row in iter_jsonl_objects(path)]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as JSONL atomically: a temporary file renamed into place, so a
    reader never sees half a file."""
    path = Path(path)
    _replace_atomically(path, "".join(dumps_line(row) for row in rows))
    return path


def write_json(path: str | Path, data) -> Path:
    """Write one JSON document atomically (indented)."""
    path = Path(path)
    _replace_atomically(
        path, json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8"))
    return path


def _replace_atomically(path: Path, text: str) -> None:
    """Write text under a temporary name of this writer's own, then rename it into place.
    Several writers of one file (every rank under `accelerate launch`) never share the
    temporary file, so none renames away another's; the last rename wins whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = no_space_error(path, exc) if isinstance(exc, OSError) else None
        if full is not None:
            raise full from None
        raise


@contextlib.contextmanager
def staged_dir(dest: str | Path) -> Iterator[Path]:
    """An empty directory, `dest` with `.partial` appended, that replaces `dest` whole when
    the block ends without error; on an error it is removed and `dest` stays as it was.
    A reader finds `dest` complete or absent; a killed writer leaves at most the
    `.partial`, which the next writer clears."""
    dest = Path(dest)
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)


def read_json(path: str | Path) -> dict:
    """One JSON document; an unreadable file is an InputError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read JSON: {exc}") from None


class JudgmentFile:
    """An append-only JSONL of judgments that survives being killed mid-write."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> list[dict]:
        """All complete rows; a torn last line is cut off the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        rows, offset, good_end = [], 0, 0
        lines = data.split(b"\n")
        for number, line in enumerate(lines, 1):
            end = offset + len(line) + 1
            is_last = number == len(lines)
            if line.strip():
                try:
                    rows.append(json.loads(line.decode("utf-8")))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    if is_last or not any(x.strip() for x in lines[number:]):
                        break  # a torn tail: drop it below
                    raise InputError(f"{self.path}:{number}: not a valid judgment row; fix or remove the line") from None
                good_end = min(end, len(data))
            elif not is_last:
                good_end = end
            offset = end
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
        elif data and not data.endswith(b"\n"):
            with open(self.path, "ab") as f:  # a complete last row that lost its newline
                f.write(b"\n")
        return rows

    def append(self, rows: list[dict]) -> None:
        """Append whole lines: a write that fails (a full disk) is cut back off the file,
        so it never ends in a torn line, and the rows are judged again on resume."""
        data = "".join(dumps_line(r) for r in rows).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:  # os.write may write part of the bytes
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, start)
                full = no_space_error(self.path, exc)
                if full is not None:
                    raise full from None
                raise
        finally:
            os.close(fd)
