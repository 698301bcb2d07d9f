"""Stage S1: sample judgments in batches, resumably.

For every labelled pair and each answer order the model writes
  - `n_repeats` judgments to the plain judge prompt        (kind "repeat")
  - `hint_samples` judgments after the true hint           (kind "hint_true")
  - `hint_samples` judgments after the reversed hint       (kind "hint_reverse")
Each judgment is a row of `judgments.jsonl` keyed by (id, order, kind, sample).

Rows are appended a whole batch at a time and fsync'ed. A re-run reads the file,
cuts a torn last line (the process died mid-write), and generates only the keys that
are missing, so nothing is lost or written twice.

What runs the policy is a sampling engine (`conj_lite.engines`: transformers, whose
batched `generate` is here, or llama.cpp); `sample_judgments` treats them alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import SamplingConfig
from .filtering import read_judgment
from .errors import InputError
from .frame import FrameError, FrameSampler, forced_judgment, frame_middle, judgment_lark, sample_seed
from .jsonio import JudgmentFile
from .progress import stage_progress
from .prompts import JudgeTemplate, build_messages, hint_prefix, judge_verdict_json, ordered_answers, true_slot



def judgment_key(pair_id: str, order: str, kind: str, sample: int) -> str:
    return f"{pair_id}|{order}|{kind}|{sample}"


def row_key(row: dict) -> str:
    return judgment_key(row["id"], row["order"], row["kind"], row["sample"])


@dataclass
class Request:
    """One prompt to sample from, with the sample indices still to produce."""

    pair_id: str
    order: str
    kind: str
    hint_slot: int | None
    samples: list[int]
    messages: list[dict] = field(repr=False)
    prefix: str = ""

    def key(self, sample: int) -> str:
        return judgment_key(self.pair_id, self.order, self.kind, sample)


def plan_requests(pairs, template: JudgeTemplate, cfg: SamplingConfig, done: set[str] = frozenset(),
                  skip: set[tuple[str, str]] = frozenset()) -> list[Request]:
    """Every prompt of the Con-J sampling plan, minus the judgments already in `done`
    and the (pair id, order) examples in `skip` (prompts too long to train on).

    Ties are skipped: a judgment can only be right or wrong against a label."""
    orders = ("ab", "ba") if cfg.both_orders else ("ab",)
    kinds = [("repeat", cfg.n_repeats)]
    if cfg.hints and cfg.hint_samples > 0:
        kinds += [("hint_true", cfg.hint_samples), ("hint_reverse", cfg.hint_samples)]
    requests = []
    for pair in pairs:
        if pair.label not in ("A", "B"):
            continue
        for order in orders:
            if (pair.id, order) in skip:
                continue
            answer_1, answer_2 = ordered_answers(pair.answer_a, pair.answer_b, order)
            messages = build_messages(template, pair.question, answer_1, answer_2)
            right = true_slot(pair.label, order)
            for kind, n in kinds:
                slot = {"repeat": None, "hint_true": right, "hint_reverse": 3 - right}[kind]
                prefix = hint_prefix(template, slot) if slot else ""
                missing = [i for i in range(n) if judgment_key(pair.id, order, kind, i) not in done]
                if missing:
                    requests.append(Request(pair.id, order, kind, slot, missing, messages, prefix))
    return requests


def split_requests(requests: list[Request], max_sequences: int) -> list[Request]:
    """Cut requests with more samples than fit one generate call into pieces."""
    out = []
    for req in requests:
        for start in range(0, len(req.samples), max_sequences):
            out.append(Request(req.pair_id, req.order, req.kind, req.hint_slot,
                               req.samples[start : start + max_sequences], req.messages, req.prefix))
    return out


def make_batches(requests: list[Request], lengths: list[int], max_sequences: int,
                 by_example: bool = False) -> list[list[int]]:
    """Group request indices into engine calls of at most `max_sequences` sequences.

    Default: same sample count per call, similar prompt lengths (less padding). by_example
    (an engine that takes mixed counts and shares the prefixes of neighbouring prompts):
    the requests of one example (pair x order: its plain and hinted prompts) together,
    in plan order, so the plain prompt they all begin with is evaluated once."""
    if by_example:
        return _example_batches(requests, max_sequences)
    order = sorted(range(len(requests)), key=lambda i: (len(requests[i].samples), lengths[i]))
    batches, current, current_n = [], [], None
    for i in order:
        n = len(requests[i].samples)
        if current and (n != current_n or (len(current) + 1) * n > max_sequences):
            batches.append(current)
            current = []
        current.append(i)
        current_n = n
    if current:
        batches.append(current)
    return batches


def _example_batches(requests: list[Request], max_sequences: int) -> list[list[int]]:
    examples: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(requests):
        examples.setdefault((r.pair_id, r.order), []).append(i)
    batches, current, used = [], [], 0
    for members in examples.values():
        size = sum(len(requests[i].samples) for i in members)
        if current and used + size > max_sequences and size <= max_sequences:
            batches.append(current)  # keep the example whole in the next call
            current, used = [], 0
        for i in members:  # an example larger than a call is cut between its requests
            n = len(requests[i].samples)
            if current and used + n > max_sequences:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += n
    if current:
        batches.append(current)
    return batches


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends the assistant's turn: the generation config's EOS list (Llama-3
    `<|eot_id|>`, Phi-3 `<|end|>`, Gemma `<end_of_turn>`) and the tokenizer's EOS."""
    ids = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured if isinstance(configured, (list, tuple)) else [configured]) + [tokenizer.eos_token_id]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def cut_at_eos(ids: list[int], eos_ids: list[int]) -> tuple[list[int], str]:
    """The generated tokens up to the first EOS, and why generation ended."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position], "stop"
    return ids, "length"


def closing_budget(count_tokens, template: JudgeTemplate) -> int:
    """Tokens a frame judgment needs after its rationale: `", "better_answer": 1}` and EOS."""
    return count_tokens(frame_middle(template) + "1}") + 2


def round_trip_texts(template: JudgeTemplate, pairs, n_answers: int = 4) -> list[str]:
    """What the tokenizer must read back unchanged before frame sampling: a whole
    judgment in the frame, the hint prefixes, and the first answers of the data."""
    frame = judge_verdict_json(template, 'Answer 1 is better: it says "12", and 7 + 5 = 12 (not 13).', 1)
    answers = [a for p in pairs[:n_answers] for a in (p.answer_a, p.answer_b)]
    return [frame, hint_prefix(template, 1), hint_prefix(template, 2), *answers]


def shared_prompt_cache(model, input_ids, attention_mask, n: int):
    """The KV cache of every prompt but its last token, evaluated once per prompt and
    repeated n times along the batch (rows prompt-major, as generate's inputs); generate
    then evaluates only the last token of each row. Positions as generate counts them
    with left padding (the attention mask's running sum)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids, mask = input_ids[:, :-1], attention_mask[:, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    cache.batch_repeat_interleave(n)
    return cache


def generate(model, tokenizer, prompts: list[str], n: int, cfg: SamplingConfig, *, seeds: list[int] | None = None,
             grammars: list[str | None] | None = None, max_new_tokens: int | None = None, closing_tokens: int = 0,
             share_prompts: bool = True):
    """Sample `n` continuations per prompt in one batched call.

    `seeds` (default: cfg.seed + row) and `grammars` (None: free text) are per sequence,
    prompt-major: sequence j of prompt i is row i * n + j. Returns, per prompt, a list of
    (text, finish_reason, new_token_count). With `share_prompts` each prompt is evaluated
    once for its n samples (shared_prompt_cache); the samples are the same either way."""
    import torch

    if seeds is None:
        seeds = [cfg.seed + row for row in range(len(prompts) * n)]

    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    eos = eos_token_ids(model, tokenizer)
    budget = max_new_tokens or cfg.max_new_tokens
    sampler = FrameSampler(tokenizer, grammars or [None] * len(seeds), seeds, temperature=cfg.temperature,
                           top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=budget, eos_ids=eos,
                           closing_tokens=closing_tokens)
    with torch.inference_mode():
        # The n samples of a prompt share its prompt: evaluate it once, then copy its KV
        # cache n times (else each copy is evaluated again, n times the prompt's compute).
        inputs = {k: v.repeat_interleave(n, dim=0) for k, v in enc.items()}
        share = share_prompts and n > 1 and enc["input_ids"].shape[1] > 1
        cache = shared_prompt_cache(model, enc["input_ids"], enc["attention_mask"], n) if share else None
        out = model.generate(
            **inputs,
            past_key_values=cache,
            do_sample=False,  # FrameSampler draws every token; generate takes its choice
            logits_processor=[sampler],
            repetition_penalty=cfg.repetition_penalty,
            max_new_tokens=budget,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
            use_cache=True,
        )
    new = out[:, enc["input_ids"].shape[1] :].cpu()
    results = []
    for row in new:
        ids, finish = cut_at_eos(row.tolist(), eos)
        results.append((tokenizer.decode(ids, skip_special_tokens=True).strip(), finish, len(ids)))
    return [results[i * n : (i + 1) * n] for i in range(len(prompts))]


TOO_LONG = "too_long.json"


def too_long_path(out_path) -> Path:
    return Path(out_path).with_name(TOO_LONG)


def load_too_long(out_path, max_prompt_tokens: int | None = None) -> set[tuple[str, str]]:
    """The (pair id, order) examples an earlier run left out as too long, when it used
    the same limit; after the limit changed they are measured again."""
    path = too_long_path(out_path)
    if not path.is_file():
        return set()
    saved = json.loads(path.read_text("utf-8"))
    if saved.get("max_prompt_tokens") != max_prompt_tokens:
        return set()
    return {(row["id"], row["order"]) for row in saved["examples"]}


def over_length(requests: list[Request], lengths: list[int], max_prompt_tokens: int | None) -> set[tuple[str, str]]:
    """(pair id, order) of every request whose prompt leaves no room for a whole
    judgment: prompt tokens > max_prompt_tokens. One long request removes its example
    (every kind), so the example's DPO pairs are never built from half of its samples."""
    if max_prompt_tokens is None:
        return set()
    return {(r.pair_id, r.order) for r, n in zip(requests, lengths) if n > max_prompt_tokens}


def judgment_row(req: Request, sample: int, text: str, finish: str, new_tokens: int, template: JudgeTemplate) -> dict:
    """One line of judgments.jsonl."""
    return {"id": req.pair_id, "order": req.order, "kind": req.kind, "sample": sample, "hint_slot": req.hint_slot,
            "text": text, "verdict": read_judgment(text, template).slot, "finish": finish, "new_tokens": new_tokens}


@dataclass
class SampleSummary:
    path: Path
    total: int
    generated: int
    seconds: float
    too_long: int = 0

    @property
    def per_second(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0


def sample_judgments(engine, pairs, template: JudgeTemplate, cfg: SamplingConfig, out_path, console=None,
                     max_prompt_tokens: int | None = None) -> SampleSummary:
    """Run the whole sampling plan into `out_path` on `engine` (a conj_lite.engines
    SamplingEngine), skipping what is already there.

    With `max_prompt_tokens` (model.max_seq_length - sampling.max_new_tokens), examples
    whose prompt is longer are left out, with a warning, and listed in too_long.json
    next to `out_path`: training would truncate their judgments away. A token the frame's
    grammar refuses stops the stage (the batches written so far are kept)."""
    store = JudgmentFile(out_path)
    done = {row_key(r) for r in store.load()}
    skip = load_too_long(out_path, max_prompt_tokens)
    requests = split_requests(plan_requests(pairs, template, cfg, done, skip), max(1, cfg.batch_size))
    prompts = [engine.render(r.messages, r.prefix) for r in requests]
    lengths = [engine.count_tokens(p) for p in prompts]
    too_long = over_length(requests, lengths, max_prompt_tokens)
    if too_long:
        skip |= too_long
        rows = [{"id": i, "order": o} for i, o in sorted(skip)]
        too_long_path(out_path).write_text(json.dumps({"max_prompt_tokens": max_prompt_tokens, "examples": rows},
                                                      indent=1), "utf-8")
        if console is not None:
            console.print(
                f"[yellow]warning:[/] {len(too_long)} examples (pair x order) have prompts longer than "
                f"{max_prompt_tokens} tokens (model.max_seq_length - sampling.max_new_tokens) and are left out; "
                f"listed in {too_long_path(out_path)}. Raise model.max_seq_length to keep them.",
                highlight=False,
            )
        keep = [i for i, r in enumerate(requests) if (r.pair_id, r.order) not in too_long]
        requests, prompts, lengths = [requests[i] for i in keep], [prompts[i] for i in keep], [lengths[i] for i in keep]
    total = len(done) + sum(len(r.samples) for r in requests)
    framed = cfg.format == "frame"
    # verdict-only hint samples: the frame leaves one text, written without the model
    forced = [forced_judgment(template, r.hint_slot) if framed else None for r in requests]
    free = [i for i, text in enumerate(forced) if text is None]
    batches = [[free[i] for i in batch]
               for batch in make_batches([requests[i] for i in free], [lengths[i] for i in free], max(1, cfg.batch_size),
                                         by_example=engine.mixed_counts)]
    closing = closing_budget(engine.count_tokens, template) if framed else 0
    start, generated = time.perf_counter(), 0
    with stage_progress("sampling", console) as progress:
        task = progress.add_task("judgments", total=total, completed=len(done), resumed=len(done))
        rows = [judgment_row(r, index, text, "stop", engine.count_tokens(text), template)
                for r, text in zip(requests, forced) if text is not None for index in r.samples]
        if rows:
            store.append(rows)
            generated += len(rows)
            progress.update(task, advance=len(rows))
        for batch in batches:
            seeds = [sample_seed(cfg.seed, requests[i].pair_id, requests[i].order, requests[i].kind, k)
                     for i in batch for k in requests[i].samples]
            grammars = ([judgment_lark(template, requests[i].hint_slot) for i in batch for _ in requests[i].samples]
                        if framed else None)
            try:
                outputs = engine.generate([prompts[i] for i in batch], [len(requests[i].samples) for i in batch], cfg,
                                          seeds=seeds, grammars=grammars, closing_tokens=closing)
            except FrameError as exc:
                raise InputError(f"{engine.source}: sampling stopped: {exc}. The grammar reads this model's tokens "
                                 f"differently from the model; {len(done) + generated} judgments written so far "
                                 f"stay in {out_path}") from None
            rows = [judgment_row(requests[i], index, text, finish, n_tokens, template)
                    for i, samples in zip(batch, outputs)
                    for index, (text, finish, n_tokens) in zip(requests[i].samples, samples)]
            store.append(rows)
            generated += len(rows)
            progress.update(task, advance=len(rows))
    return SampleSummary(Path(out_path), total, generated, time.perf_counter() - start, len(too_long))
