"""Judge a whole data set: the one resumable loop behind `conj-lite judge --data`,
`conj-lite eval`, calibration splits and the learnability check.

    records = judge_pairs(judge, pairs, "verdict", records_path="out.jsonl")

One record per pair (both orders): {"id", "label", "subset", "key", verdict, p_a, ...}
plus "correct" for a pair labelled A or B. With `records_path` the records are appended
as they come (a kill loses at most the last batch) and a re-run skips the pairs already
there. A pair is recognised by `key`, a hash of the mode and the pair's texts, so a
pair whose texts changed is judged again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..data import load_pairs
from ..errors import InputError
from ..jsonio import JudgmentFile
from ..progress import stage_progress

BATCH = 8  # records appended per write


def pair_key(pair, mode: str) -> str:
    """Identifies a judgment of `pair` in `mode` (a resumed run reuses it only if the
    pair's texts are the same)."""
    blob = json.dumps([mode, pair.question, pair.answer_a, pair.answer_b], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def judge_pairs(judge, pairs, mode: str | None = None, *, records_path: str | Path | None = None, console=None,
                name: str = "judge", progress_task=None, model_name: str | None = None,
                stage: str = "eval") -> list[dict]:
    """One record per pair (both orders), in the order of `pairs`. With `records_path`
    the records are appended as they come and a re-run skips the pairs already there.

    progress_task: (progress, task) of a progress display the caller owns; otherwise a
    `stage` progress bar named `name` is shown. model_name: stored in each new record."""
    mode = mode or judge.mode
    pairs = list(pairs)
    store = JudgmentFile(records_path) if records_path else None
    done = {}
    if store is not None:
        Path(records_path).parent.mkdir(parents=True, exist_ok=True)
        done = {row.get("key"): row for row in store.load()}
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
            record = {"id": pair.id, "label": pair.label, "subset": pair.subset, "key": key, **result.to_record()}
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
               limit: int | None = None, console=None, model_name: str | None = None,
               **load_kwargs) -> JudgeFileSummary:
    """Judge every pair of `data` (a path `load_pairs` reads, with `preset` and
    `load_kwargs` such as fields/label_map, or PreferencePair records) into
    `out_jsonl` with `judge_pairs`; an interrupted run resumes where it stopped. A file
    holding judgments made in another mode is refused."""
    mode = mode or judge.mode
    if isinstance(data, (str, Path)):
        pairs = load_pairs(data, preset=preset, limit=limit, **load_kwargs).pairs
    else:
        pairs = list(data)
    if limit is not None:
        pairs = pairs[:limit]
    out_jsonl = Path(out_jsonl)
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
