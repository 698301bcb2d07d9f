"""Judge a whole data set: the one resumable loop behind `conj-lite judge --data`,
`conj-lite eval`, calibration splits and the learnability check.

    records = judge_pairs(judge, pairs, "verdict", records_path="out.jsonl")

One record per pair (both orders): {"id", "label", "subset", "key", verdict, p_a, ...}
plus "correct" for a pair labelled A or B. With `records_path` the records are appended
as they come (a kill loses at most the last batch) and a re-run skips the pairs already
there. A pair is recognised by `key`, a hash of the mode and the pair's texts, so a
pair whose texts changed is judged again.

Provenance: a stored judgments file knows what made it. `judge_provenance(judge, mode)`
records the judge (a GGUF file's size, mtime and digest of its header, tensor index
and weight slices; a model/adapter directory's files), the template, mode, context
size, max_new_tokens (rationale mode) and the chat-template date. It is written once,
next to the file, as `<file>.meta.json` ({"fingerprint": id, "provenance": {...}}),
and every record carries the short `fingerprint` id. A re-run reuses rows only when
the fingerprints match; otherwise it stops with an InputError naming the fields that
differ (`on_mismatch="error"`, `conj-lite judge --output`), or sets the old file aside
as `<file>.stale-<time>` and judges afresh (`on_mismatch="replace"`: `--fresh`, the
calibration cache). Never a silent mix.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import fingerprint_id, identity_changes, path_identity
from ..data import load_pairs
from ..errors import InputError
from ..jsonio import JudgmentFile, read_json, write_json
from ..progress import stage_progress
from ..prompts import CHAT_FORMAT_ATTR, DEFAULT_CHAT_DATE

BATCH = 8  # records appended per write
META_SUFFIX = ".meta.json"


# ---------------------------------------------------------------- provenance


def judge_provenance(judge, mode: str | None = None) -> dict:
    """What a judge is, as far as it decides its judgments (see the module docstring)."""
    mode = mode or getattr(judge, "mode", None)
    backend = getattr(judge, "backend", None)
    opened = getattr(judge, "opened", None) or {}
    ident: dict = {}
    if backend is not None and getattr(backend, "path", None) is not None:  # gguf
        ident["model"] = path_identity(backend.path)
        lora = getattr(backend, "lora_path", None) or opened.get("lora_path")
        if lora:
            ident["lora"] = path_identity(lora)
    elif opened.get("spec") is not None:
        ident["model"] = path_identity(opened["spec"])
        for key in ("adapter", "base"):
            if opened.get(key):
                ident[key] = path_identity(opened[key])
    elif backend is not None and getattr(backend, "source", None):
        ident["model"] = path_identity(backend.source)
    else:  # a judge object without a model (scripted, remote): its class and name
        ident["model"] = {"kind": "name", "name": getattr(judge, "name", None) or type(judge).__name__}
    template = getattr(judge, "template", None)
    tokenizer = getattr(backend, "tokenizer", None)
    chat = getattr(tokenizer, CHAT_FORMAT_ATTR, None) if tokenizer is not None else None
    return {
        "judge": ident,
        "backend": getattr(backend, "name", None),
        "template": template.to_dict() if hasattr(template, "to_dict") else template,
        "mode": mode,
        "n_ctx": getattr(backend, "n_ctx", None),
        "max_new_tokens": getattr(judge, "max_new_tokens", None) if mode == "rationale" else None,
        # the GGUF's chat template is in the file (its digest); transformers renders with a date
        "chat_date": (getattr(chat, "date_string", DEFAULT_CHAT_DATE) if tokenizer is not None else None),
        # transformers' weights may be read in fp32 or bf16, which moves P(A) (gguf: the file says)
        **({"dtype": backend.dtype} if getattr(backend, "name", None) == "hf" else {}),
    }


def meta_path(path: str | Path) -> Path:
    """The provenance sidecar of a judgments file: `<file>.meta.json`."""
    return Path(str(path) + META_SUFFIX)


def read_provenance(path: str | Path) -> dict | None:
    """The sidecar of a judgments file ({"fingerprint", "provenance", ...}) or None."""
    meta = meta_path(path)
    return read_json(meta) if meta.is_file() else None


def write_provenance(path: str | Path, provenance: dict, **extra) -> str:
    fid = fingerprint_id(provenance)
    write_json(meta_path(path), {"fingerprint": fid, "provenance": provenance, **extra})
    return fid


def set_aside(path: str | Path) -> Path | None:
    """Move a judgments file and its sidecar to `<file>.stale-<time>` (kept, not deleted)."""
    path = Path(path)
    if not path.exists() and not meta_path(path).exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.stale-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.stale-{stamp}-{n}")
    if path.exists():
        path.rename(target)
    if meta_path(path).exists():
        meta_path(path).rename(meta_path(target))
    return target


def provenance_mismatch(path: str | Path, rows: list[dict], provenance: dict) -> list[str]:
    """Why the rows of `path` were not made by `provenance` ([] when they were)."""
    fid = fingerprint_id(provenance)
    if not rows:
        return []  # nothing to mix: the sidecar is (re)written
    meta = read_provenance(path)
    if meta is None:
        if all(row.get("fingerprint") == fid for row in rows):
            return []  # the sidecar was lost; every row names this judge
        return [f"{meta_path(path).name} is missing: these judgments do not say which judge made them"]
    changes = [] if meta.get("fingerprint") == fid else \
        (identity_changes(meta.get("provenance") or {}, provenance) or ["fingerprint differs"])
    foreign = sum(row.get("fingerprint") not in (None, fid) for row in rows)
    if not changes and foreign:
        changes = [f"{foreign} rows carry another judge's fingerprint"]
    return changes


def check_store(path: str | Path, provenance: dict, *, on_mismatch: str = "error", console=None,
                what: str = "judgments") -> list[dict]:
    """The rows of `path` a run with `provenance` may reuse; writes the sidecar of a new
    file. A file made otherwise: InputError naming what differs (`on_mismatch="error"`),
    or set aside and started afresh (`"replace"`)."""
    if on_mismatch not in ("error", "replace"):
        raise ValueError(f"on_mismatch must be 'error' or 'replace', got {on_mismatch!r}")
    path = Path(path)
    rows = JudgmentFile(path).load()
    changes = provenance_mismatch(path, rows, provenance)
    if changes:
        if on_mismatch == "error":
            raise InputError(
                f"{path}: holds {len(rows)} {what} made by another judge setup; " + "; ".join(changes)
                + f". Never mixed: write to another file, pass --fresh (the old file is kept as "
                f"{path.name}.stale-<time>) or delete {path} and {meta_path(path).name}")
        moved = set_aside(path)
        if console is not None:
            console.print(f"[yellow]note:[/] {path} was made by another judge setup ({'; '.join(changes)}); "
                          f"kept as {moved} and judged afresh", highlight=False)
        rows = []
    if rows and read_provenance(path) is not None:
        return rows
    write_provenance(path, provenance)
    return rows


def pair_key(pair, mode: str) -> str:
    """Identifies a judgment of `pair` in `mode` (a resumed run reuses it only if the
    pair's texts are the same)."""
    blob = json.dumps([mode, pair.question, pair.answer_a, pair.answer_b], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def judge_pairs(judge, pairs, mode: str | None = None, *, records_path: str | Path | None = None, console=None,
                name: str = "judge", progress_task=None, model_name: str | None = None,
                stage: str = "eval", on_mismatch: str = "error", provenance: dict | None = None) -> list[dict]:
    """One record per pair (both orders), in the order of `pairs`. With `records_path`
    the records are appended as they come and a re-run skips the pairs already there,
    if the same judge setup made them (see `check_store`: `on_mismatch`).

    progress_task: (progress, task) of a progress display the caller owns; otherwise a
    `stage` progress bar named `name` is shown. model_name: stored in each new record."""
    mode = mode or judge.mode
    pairs = list(pairs)
    provenance = provenance or judge_provenance(judge, mode)
    fid = fingerprint_id(provenance)
    store = JudgmentFile(records_path) if records_path else None
    done = {}
    if store is not None:
        Path(records_path).parent.mkdir(parents=True, exist_ok=True)
        done = {row.get("key"): row for row in check_store(records_path, provenance, on_mismatch=on_mismatch,
                                                           console=console)}
    records, todo = [], []
    for pair in pairs:
        key = pair_key(pair, mode)
        if key in done:
            row = dict(done[key])
            row.update(id=pair.id, label=pair.label, subset=pair.subset)
            records.append(row)
        else:
            records.append(None)
            todo.append((len(records) - 1, pair, key))

    def judged(chunk):
        """(index, pair, key, result) for a chunk of `todo`; a judge with parallel
        sequences (gguf) judges the chunk's pairs together."""
        if len(chunk) == 1:
            index, pair, key = chunk[0]
            try:
                return [(index, pair, key, judge.compare(pair.question, pair.answer_a, pair.answer_b, mode=mode))]
            except InputError as exc:
                raise InputError(f"pair {pair.id}: {exc}") from None
        try:
            results = judge.compare_many([(p.question, p.answer_a, p.answer_b) for _, p, _ in chunk], mode=mode)
        except InputError:
            for _, pair, _ in chunk:  # name the pair that does not fit
                try:
                    judge.fit(pair.question, pair.answer_a, pair.answer_b, mode)
                except InputError as exc:
                    raise InputError(f"pair {pair.id}: {exc}") from None
            raise
        return [(index, pair, key, result) for (index, pair, key), result in zip(chunk, results)]

    step = BATCH if getattr(judge, "parallel", False) else 1

    def run(progress, task):
        buffer = []
        for index, pair, key, result in (item for start in range(0, len(todo), step)
                                         for item in judged(todo[start:start + step])):
            record = {"id": pair.id, "label": pair.label, "subset": pair.subset, "key": key, **result.to_record(),
                      "fingerprint": fid}
            if pair.label in ("A", "B"):
                record["correct"] = result.verdict == pair.label
            if model_name:
                record["model"] = model_name
            records[index] = record
            buffer.append(record)
            if store is not None and len(buffer) >= BATCH:
                store.append(buffer)
                buffer = []
            if progress is not None:
                progress.advance(task)
        if store is not None and buffer:
            store.append(buffer)

    if progress_task is not None:
        progress, task = progress_task
        progress.update(task, completed=len(pairs) - len(todo))
        run(progress, task)
    else:
        with stage_progress(stage, console, unit="pairs") as progress:
            task = progress.add_task(name, total=len(pairs), completed=len(pairs) - len(todo),
                                     resumed=len(pairs) - len(todo))
            run(progress, task)
    return records


# ---------------------------------------------------------------- a data file into a JSONL


@dataclass
class JudgeFileSummary:
    path: Path
    total: int
    judged: int
    resumed: int
    seconds: float
    accuracy: float | None  # over pairs labelled A/B
    consistency: float | None  # share of verdicts that are not "inconsistent"

    @property
    def per_minute(self) -> float:
        return 60.0 * self.judged / self.seconds if self.seconds else 0.0


def judge_file(judge, data, out_jsonl: str | Path, *, mode: str | None = None, preset: str = "auto",
               limit: int | None = None, console=None, model_name: str | None = None, fresh: bool = False,
               **load_kwargs) -> JudgeFileSummary:
    """Judge every pair of `data` (a path `load_pairs` reads, with `preset` and
    `load_kwargs` such as fields/label_map, or PreferencePair records) into
    `out_jsonl` with `judge_pairs`; an interrupted run resumes where it stopped. A file
    holding judgments made in another mode, or by another judge setup, is refused
    (`fresh`: set it aside as `<file>.stale-<time>` and start again)."""
    mode = mode or judge.mode
    if isinstance(data, (str, Path)):
        pairs = load_pairs(data, preset=preset, limit=limit, **load_kwargs).pairs
    else:
        pairs = list(data)
    if limit is not None:
        pairs = pairs[:limit]
    out_jsonl = Path(out_jsonl)
    if fresh:
        moved = set_aside(out_jsonl)
        if moved is not None and console is not None:
            console.print(f"judge: --fresh: the old judgments are kept as {moved}", highlight=False)
    rows = JudgmentFile(out_jsonl).load()
    modes = {row.get("mode") for row in rows}
    if rows and modes != {mode}:
        raise InputError(f"{out_jsonl}: holds judgments made in mode {sorted(map(str, modes))}, not {mode!r}; "
                         "write to another file or use the same --mode")
    start = time.perf_counter()
    before = {row.get("key") for row in rows}
    wanted = judge_pairs(judge, pairs, mode, records_path=out_jsonl, console=console, name=out_jsonl.name,
                         model_name=model_name, stage="judge")
    seconds = time.perf_counter() - start
    resumed = sum(pair_key(p, mode) in before for p in pairs)
    labelled = [r for r in wanted if r.get("label") in ("A", "B")]
    accuracy = sum(r["verdict"] == r["label"] for r in labelled) / len(labelled) if labelled else None
    consistency = sum(r["verdict"] != "inconsistent" for r in wanted) / len(wanted) if wanted else None
    return JudgeFileSummary(out_jsonl, len(pairs), len(pairs) - resumed, resumed, seconds, accuracy, consistency)
