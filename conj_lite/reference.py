"""The DPO reference on llama.cpp: its log-probabilities computed once, before training.

DPO compares the policy with a frozen reference, the model as training found it. TRL
computes the reference's log-probabilities of each pair's chosen and rejected
completions with a forward pass in every step (or all of them first, with
`precompute_ref_log_probs`), in the policy's own dtype: in fp32 on a CPU that pass is a
third of a step of the embedded demo (0.9-1.0 s of a 2.65 s micro-step of 2 rows,
docs/benchmarks.md). llama.cpp evaluates the same prompts from a GGUF of the
reference (f32: `config.POLICY_GGUF_TYPE`) once, sharing what rows share, so with `training.ref_engine: llama.cpp` the trainer is
handed the reference's log-probabilities computed here, from the token ids TRL's own
data preparation made, and takes them as it takes precomputed ones.

The reference is the policy's GGUF (`engines.policy_gguf`): the model's own GGUF
rewritten in f32 or its directory converted, plus, when training continues from an
adapter, that adapter as a GGUF LoRA (TRL's reference is then a frozen copy of it).
llama.cpp's kernels differ from the fp32 forward by a few thousandths of a nat on a
judgment's log-probability (SmolLM2, the demo's pairs, from the earlier f16 GGUF: mean
0.006, largest 0.023); the DPO term sees that times beta (0.1), a shift of its logit
by ~0.001.

Each row is evaluated on one sequence, its prompt from where it departs from the
previous row's (the judge's instructions are evaluated once), then the chosen
completion; the sequence is cut back to the prompt and the rejected one follows. Rows
are truncated as the shared-prompt step truncates them (`shared_prompt.truncate`). The
results are kept in the training's directory (`reference_logps-train.json`, keyed by the rows'
token ids and the GGUFs), so a resumed training does not evaluate them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .artifacts import fingerprint_id
from .judging.backends import ParallelDecoder, load_llama, shared_prefix
from .shared_prompt import truncate


def log_softmax_at(logits: np.ndarray, tokens: Sequence[int]) -> list[float]:
    """log p(token) under one row of logits, for each of `tokens` (in float64)."""
    row = logits.astype(np.float64)
    top = row.max()
    norm = top + np.log(np.exp(row - top).sum())
    return [float(row[t] - norm) for t in tokens]


def cells_for(rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]) -> int:
    """KV cells the longest row needs: its prompt and the longer of its completions."""
    return max((len(p) + max(len(c), len(r)) for p, c, r in rows), default=1)


def rows_logps(decoder, n_vocab: int, rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
               on_row: Callable[[int], None] | None = None) -> tuple[list[float], list[float]]:
    """(chosen, rejected) summed log-probabilities of each (prompt, chosen, rejected) row
    of token ids, on sequence 0 of a `judging.backends.ParallelDecoder`."""
    chosen_out, rejected_out, before = [], [], []
    for index, (prompt, chosen, rejected) in enumerate(rows):
        p = len(prompt)
        if p == 0:
            raise ValueError(f"row {index}: an empty prompt")
        start = shared_prefix([before, prompt])  # kept from the row before; the prompt's last token evaluated
        decoder.rewind(0, start)
        at_prompt_end: list[float] = []
        chosen_logps: list[float] = []

        def logps(i, tokens):
            return log_softmax_at(np.ctypeslib.as_array(decoder.logits(i), shape=(n_vocab,)), tokens)

        def keep(key, i):
            if key == "end":  # predicts the first token of both completions
                at_prompt_end.extend(logps(i, [chosen[0] if chosen else 0, rejected[0] if rejected else 0]))
            else:
                chosen_logps.extend(logps(i, [chosen[key + 1]]))

        entries = [(0, pos, prompt[pos], "end" if pos == p - 1 else None) for pos in range(start, p)]
        entries += [(0, p + j, chosen[j], j) for j in range(len(chosen) - 1)]
        decoder.decode(entries, keep)
        rejected_logps: list[float] = []
        if len(rejected) > 1:
            decoder.rewind(0, p)

            def keep_rejected(j, i):
                rejected_logps.extend(logps(i, [rejected[j + 1]]))

            decoder.decode([(0, p + j, rejected[j], j) for j in range(len(rejected) - 1)], keep_rejected)
        chosen_out.append((at_prompt_end[0] if chosen else 0.0) + sum(chosen_logps))
        rejected_out.append((at_prompt_end[1] if rejected else 0.0) + sum(rejected_logps))
        before = prompt
        if on_row is not None:
            on_row(index)
    return chosen_out, rejected_out


def rows_key(dataset, max_length: int | None, reads: dict) -> str:
    """What the reference's log-probabilities depend on: every row's token ids, the
    truncation, and the GGUFs (their recorded sources)."""
    import hashlib
    import json

    digest = hashlib.blake2b(digest_size=16)
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        digest.update(json.dumps([list(ids) for ids in dataset[column]]).encode("utf-8"))
    return fingerprint_id({"rows": digest.hexdigest(), "max_length": max_length, "reads": reads})


def cached_logps(path: Path, key: str, compute: Callable[[], tuple[list[float], list[float]]]):
    """compute(), kept in `path` under `key`: a resumed training reads it back instead of
    evaluating every row again; a file made for other rows, or unreadable, is replaced."""
    from .errors import InputError
    from .jsonio import read_json, write_json

    if path.is_file():
        try:
            stored = read_json(path)
        except InputError:
            stored = {}
        if stored.get("key") == key and len(stored.get("chosen", ())) == len(stored.get("rejected", ())):
            return stored["chosen"], stored["rejected"]
    chosen, rejected = compute()
    write_json(path, {"key": key, "chosen": chosen, "rejected": rejected})
    return chosen, rejected


def unique_rows(rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]) -> tuple[list, list[int]]:
    """(the distinct rows in the order first met, where each row's results are among them):
    a budget beyond the training rows visits rows again (training.training_order's passes),
    and their reference log-probabilities are the same (2,400 rows of HH held 546 repeats:
    ~3.5 minutes of llama.cpp on 2 cores)."""
    first: dict[tuple, int] = {}
    where = [first.setdefault((tuple(p), tuple(c), tuple(r)), len(first)) for p, c, r in rows]
    unique = [None] * len(first)
    for row, i in zip(rows, where):
        unique[i] = row
    return unique, where


def llama_cpp_reference_logps(gguf: str | Path, lora: str | Path | None, dataset, max_length: int | None,
                              console=None) -> tuple[list[float], list[float]]:
    """The reference's (chosen, rejected) log-probabilities of every row of a TRL-tokenized
    preference dataset (prompt_ids, chosen_ids, rejected_ids), on llama.cpp."""
    import torch

    from .progress import stage_progress

    rows = [truncate(list(p), list(c), list(r), max_length)
            for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
    rows, where = unique_rows(rows)
    cells = -(-cells_for(rows) // 256) * 256
    llm, _ = load_llama(gguf, n_ctx=cells, lora_path=lora)
    decoder = ParallelDecoder(llm, 1, cells)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # idle OpenMP workers of torch would spin on llama.cpp's cores
    try:
        with stage_progress("reference", console, unit="rows") as progress:
            task = progress.add_task("log-probabilities on llama.cpp", total=len(rows))
            chosen, rejected = rows_logps(decoder, llm.n_vocab(), rows, lambda i: progress.update(task, completed=i + 1))
            return [chosen[i] for i in where], [rejected[i] for i in where]
    finally:
        torch.set_num_threads(threads)
        decoder.close()
        llm.close()
