"""The local judge: a question and two answers in, a verdict out, on a CPU.

    judge = Judge.from_gguf("runs/tiny/gguf/judge-q4_k_m.gguf")     # or open_judge(spec)
    result = judge.compare("What is 7 + 5?", "12", "13")
    result.verdict, result.p_a          # "A", 0.93

Every pair is judged in both orders (answer 1 = A, then answer 1 = B) with the prompt of
`conj_lite.prompts`, so judging sees exactly what training saw. Per order the judge
either writes a rationale and then its verdict (mode "rationale"), or the verdict is
read straight after the prompt (mode "verdict": much faster, no rationale).

P(A better) is read at the verdict token (see `verdicts`): by the backend while it
generates when it can, otherwise after prompt + reply up to the verdict, tokenized
afresh. Verdict mode uses an empty rationale: `{"rationale": "", "better_answer": `.
What runs the model is a backend (`backends`: GGUF via llama-cpp-python, or
transformers); the judge treats them alike.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..artifacts import is_gguf_path, resolve_template
from ..errors import InputError
from ..parsing import RATIONALE_KEYS, VERDICT_KEYS, parse_verdict
from ..progress import get_console
from ..prompts import ORDERS, JudgeTemplate, build_messages, ordered_answers
from ..tiny import tiny_model_path
from .backends import BACKENDS, open_backend
from .verdicts import (
    DEFAULT_MAX_NEW_TOKENS,
    MODES,
    JudgeResult,
    OrderJudgment,
    cap_lengths,
    combine,
    p_slot1,
    split_canonical_judgment,
    verdict_prefix,
)

TRUNCATION_MARK = "\n[... truncated]"
MIN_ANSWER_TOKENS = 16


def _print_warning(message: str) -> None:
    get_console().print(f"[yellow]warning:[/] {message}", highlight=False)


class Judge:
    """A pairwise judge over one backend. Build it with `Judge.from_gguf` or `Judge.from_hf`."""

    def __init__(self, backend, template: JudgeTemplate, *, mode: str = "rationale",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, warn: Callable[[str], None] | None = _print_warning):
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.backend, self.template, self.mode = backend, template, mode
        self.max_new_tokens, self.warn = max_new_tokens, warn
        backend.set_template(template)

    # -- construction

    @classmethod
    def open(cls, backend: str, spec, *, template=None, mode: str = "rationale",
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, warn: Callable[[str], None] | None = _print_warning,
             **options) -> "Judge":
        """A judge on the registered backend `backend` ("gguf", "hf", ...) opened on
        `spec` with `options` (n_ctx, n_threads, ...). The judge template is the one
        recorded with the model unless `template` (name, path or JudgeTemplate) is given."""
        runner = open_backend(backend, spec, **options)
        chosen = template if template is not None else runner.default_template()
        judge = cls(runner, resolve_template(chosen), mode=mode, max_new_tokens=max_new_tokens, warn=warn)
        # What was opened, for the provenance of stored judgments (batch.judge_provenance).
        judge.opened = {"backend": backend, "spec": spec, "adapter": options.get("adapter"),
                        "base": options.get("base"), "lora_path": options.get("lora_path")}
        return judge

    @classmethod
    def from_gguf(cls, path: str | Path, *, n_ctx: int | None = None, n_threads: int | None = None,
                  template=None, mode: str = "rationale", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  use_extra_bufts: bool = False, verbose: bool = False, **kwargs) -> "Judge":
        """A judge from a GGUF file. The judge template comes from the file's metadata
        (written by `conj-lite export`); `template` overrides it (name, path or JudgeTemplate)."""
        return cls.open("gguf", path, n_ctx=n_ctx, n_threads=n_threads, use_extra_bufts=use_extra_bufts,
                        verbose=verbose, template=template, mode=mode, max_new_tokens=max_new_tokens, **kwargs)

    @classmethod
    def from_hf(cls, model_dir: str | Path, *, adapter: str | Path | None = None, base: str | None = None,
                template=None, mode: str = "rationale", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                n_ctx: int | None = None, n_threads: int | None = None, dtype: str = "float32",
                **kwargs) -> "Judge":
        """A judge from transformers: a merged model directory, a LoRA adapter directory
        (its base is read from conj_lite_train.json / adapter_config.json, or `base`),
        or `model_dir` = base with `adapter`."""
        return cls.open("hf", model_dir, adapter=adapter, base=base, n_ctx=n_ctx, n_threads=n_threads, dtype=dtype,
                        template=template, mode=mode, max_new_tokens=max_new_tokens, **kwargs)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- prompts

    def prompt(self, question: str, answer_1: str, answer_2: str) -> str:
        """The exact prompt text of one order (chat template + generation prompt)."""
        return self.backend.render(build_messages(self.template, question, answer_1, answer_2))

    def _reserve(self, mode: str) -> int:
        """Tokens the judgment needs after the prompt."""
        prefix = len(self.backend.tokenize(verdict_prefix(self.template, ""))) + 2
        return prefix if mode == "verdict" else self.max_new_tokens + prefix

    def tokens_needed(self, question: str, answer_a: str, answer_b: str, mode: str | None = None) -> tuple[int, int]:
        """(tokens the pair needs uncut: its longer order's prompt + the judgment, the context size)."""
        need = max(len(self.backend.tokenize(self.prompt(question, *ordered_answers(answer_a, answer_b, o))))
                   for o in ORDERS)
        return need + self._reserve(mode or self.mode), self.backend.n_ctx

    def fit(self, question: str, answer_a: str, answer_b: str, mode: str) -> tuple[str, str, list[str]]:
        """The answers, cut so both prompts and the judgment fit the context."""
        n_ctx, reserve = self.backend.n_ctx, self._reserve(mode)
        budget = n_ctx - reserve

        def need(a: str, b: str) -> int:
            return max(len(self.backend.tokenize(self.prompt(question, *ordered_answers(a, b, o)))) for o in ORDERS)

        total = need(answer_a, answer_b)
        if total <= budget:
            return answer_a, answer_b, []
        ids_a, ids_b = self.backend.tokenize(answer_a), self.backend.tokenize(answer_b)
        overhead = total - len(ids_a) - len(ids_b)
        mark = len(self.backend.tokenize(TRUNCATION_MARK))
        room = budget - overhead - 2 * mark - 4
        for _ in range(4):
            if room < 2 * MIN_ANSWER_TOKENS:
                what = "the judgment" if mode == "verdict" else f"a {self.max_new_tokens}-token judgment"
                raise InputError(
                    f"context too small: the prompt needs {overhead} tokens without the answers and {reserve} more "
                    f"for {what}, but the context holds {n_ctx}; use a larger --ctx (at least "
                    f"{overhead + reserve + 2 * MIN_ANSWER_TOKENS + 2 * mark + 4})"
                    + ("" if mode == "verdict" else " or a smaller --max-new-tokens")
                )
            cap_a, cap_b = cap_lengths(len(ids_a), len(ids_b), room)
            a = answer_a if cap_a >= len(ids_a) else self.backend.detokenize(ids_a[:cap_a]) + TRUNCATION_MARK
            b = answer_b if cap_b >= len(ids_b) else self.backend.detokenize(ids_b[:cap_b]) + TRUNCATION_MARK
            excess = need(a, b) - budget
            if excess <= 0:
                notes = [f"answer {name} cut from {n} to {cap} tokens to fit the {n_ctx}-token context"
                         for name, n, cap in (("A", len(ids_a), cap_a), ("B", len(ids_b), cap_b)) if cap < n]
                return a, b, notes
            room -= excess + 2
        raise InputError(f"could not fit the answers into the {n_ctx}-token context; use a larger --ctx")

    # -- judging

    def verdict_p1(self, prompt: str, prefix: str) -> float:
        """P(answer 1 better) at the verdict position after prompt + prefix.

        "1" and "2" are appended and tokenized with the context; the first token where
        the two differ is the verdict token, whatever the tokenizer merges around it."""
        context, one, two = self._verdict_tokens(prompt, prefix)
        logits = self.backend.next_logits(context)
        return p_slot1(float(logits[one]), float(logits[two]))

    def _verdict_tokens(self, prompt: str, prefix: str) -> tuple[list[int], int, int]:
        """(the tokens before the verdict token, the token of "1", the token of "2")."""
        ids_1 = self.backend.tokenize(prompt + prefix + "1")
        ids_2 = self.backend.tokenize(prompt + prefix + "2")
        k = 0
        for x, y in zip(ids_1, ids_2):
            if x != y:
                break
            k += 1
        if k >= min(len(ids_1), len(ids_2)):
            raise RuntimeError("the tokenizer does not tell the verdicts '1' and '2' apart")
        return ids_1[:k], ids_1[k], ids_2[k]

    def judge_order(self, question: str, answer_a: str, answer_b: str, order: str, mode: str) -> OrderJudgment:
        """One order's judgment (answers already fitted to the context)."""
        prompt = self.prompt(question, *ordered_answers(answer_a, answer_b, order))
        if mode == "verdict":
            p1 = self.verdict_p1(prompt, verdict_prefix(self.template, ""))
            return OrderJudgment(order, 1 if p1 >= 0.5 else 2, p1, None, None, True, "verdict")
        return self._read_order(prompt, order, self.backend.generate(self.backend.tokenize(prompt), self.max_new_tokens))

    def _read_order(self, prompt: str, order: str, generation) -> OrderJudgment:
        """One order's judgment from its generated reply (rationale mode)."""
        text, finished, tokens, p1 = generation
        rationale, slot, prefix = split_canonical_judgment(self.template, text)
        method = "grammar" if self.backend.constrained else "json"
        if slot is None and not self.backend.constrained:  # free text: read it as well as it can be
            parsed = parse_verdict(text, rationale_keys=(self.template.rationale_key, *RATIONALE_KEYS),
                                   verdict_keys=(self.template.verdict_key, *VERDICT_KEYS))
            slot, method = parsed.slot, parsed.method
            rationale = parsed.rationale if parsed.rationale is not None else rationale
        if p1 is None:  # not read while generating: ask after prompt + reply, tokenized afresh
            if prefix is None:  # not in the canonical form: ask at the canonical position
                prefix = verdict_prefix(self.template, rationale or "")
            p1 = self.verdict_p1(prompt, prefix)
        if slot is None and not finished:
            slot, method = (1 if p1 >= 0.5 else 2), "probability"
        return OrderJudgment(order, slot, p1, rationale, text, finished, method, tokens)

    def compare(self, question: str, answer_a: str, answer_b: str, mode: str | None = None) -> JudgeResult:
        """Judge a pair in both orders: verdict "A", "B" or "inconsistent", and P(A better)."""
        mode = mode or self.mode
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        start = time.perf_counter()
        a, b, notes = self.fit(question, answer_a, answer_b, mode)
        for note in notes:
            if self.warn:
                self.warn(note)
        ab = self.judge_order(question, a, b, "ab", mode)
        ba = self.judge_order(question, a, b, "ba", mode)
        result = combine(ab, ba, mode)
        result.seconds = time.perf_counter() - start
        result.truncated, result.warnings = bool(notes), notes
        return result

    @property
    def parallel(self) -> bool:
        """Whether the backend decodes several sequences together (gguf)."""
        return hasattr(self.backend, "generate_many") and getattr(self.backend, "n_parallel", 1) > 1

    def compare_many(self, pairs, mode: str | None = None) -> list[JudgeResult]:
        """Judge several (question, answer_a, answer_b) pairs: the results of compare()
        on each, but on a backend with parallel sequences (gguf) both orders of several
        pairs decode together, and the prompt prefixes they share are evaluated once.
        Other backends judge one pair at a time, and so does verdict mode on gguf unless
        the backend's `parallel_verdict` is set (on a CPU the prompts alone, reusing the
        cached prefix, are faster than together: benchmarks/kv_layout.py). Batched decoding rounds floating point
        differently, so P(A) may differ in the 4th decimal and, rarely, a rationale
        parts from the one-at-a-time text at a near-tie token.
        `seconds` of each result is the batch's time divided among its pairs."""
        mode = mode or self.mode
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        pairs = list(pairs)
        together = self.parallel and (mode != "verdict" or getattr(self.backend, "parallel_verdict", False))
        if not together or len(pairs) == 0:
            return [self.compare(q, a, b, mode=mode) for q, a, b in pairs]
        start = time.perf_counter()
        fitted = []
        for question, answer_a, answer_b in pairs:
            a, b, notes = self.fit(question, answer_a, answer_b, mode)
            for note in notes:
                if self.warn:
                    self.warn(note)
            prompts = [self.prompt(question, *ordered_answers(a, b, o)) for o in ORDERS]
            fitted.append((prompts, notes))
        if mode == "verdict":
            prefix = verdict_prefix(self.template, "")
            tokens = [[self._verdict_tokens(p, prefix) for p in prompts] for prompts, _ in fitted]
            logits = self.backend.next_logits_many([[t[0] for t in group] for group in tokens])
            orders = []
            for group, rows in zip(tokens, logits):
                p1s = [p_slot1(float(row[one]), float(row[two])) for (_, one, two), row in zip(group, rows)]
                orders.append([OrderJudgment(o, 1 if p1 >= 0.5 else 2, p1, None, None, True, "verdict")
                               for o, p1 in zip(ORDERS, p1s)])
        else:
            generations = self.backend.generate_many(
                [[self.backend.tokenize(p) for p in prompts] for prompts, _ in fitted], self.max_new_tokens)
            orders = [[self._read_order(p, o, g) for p, o, g in zip(prompts, ORDERS, gens)]
                      for (prompts, _), gens in zip(fitted, generations)]
        seconds = (time.perf_counter() - start) / len(pairs)
        results = []
        for (ab, ba), (_, notes) in zip(orders, fitted):
            result = combine(ab, ba, mode)
            result.seconds, result.truncated, result.warnings = seconds, bool(notes), notes
            results.append(result)
        return results


# ---------------------------------------------------------------- opening a judge


_PRINT = object()  # open_judge's default: the judge prints its warnings


def choose_backend(spec, backend: str = "auto") -> tuple[str, str | Path]:
    """(backend name, what it opens) for a judge spec. "auto" reads the spec:

      path/to/model.gguf    gguf (a file is recognised by its suffix or its GGUF magic)
      path/to/merged        hf: a transformers model directory (merged, or an untrained base)
      path/to/adapter       hf: a LoRA adapter directory (adapter_config.json)
      tiny                  hf: the tiny local model of the default recipe (built and cached)
      org/name              hf: a Hugging Face model id"""
    if backend != "auto":
        if backend not in BACKENDS:
            raise InputError(f"unknown judge backend {backend!r}; known: auto, {', '.join(BACKENDS)}")
        return backend, spec
    spec = str(spec)
    if spec == "tiny":
        return "hf", tiny_model_path()
    path = Path(spec).expanduser()
    if path.is_file():
        if not is_gguf_path(path):
            raise InputError(f"{spec}: a file but not a GGUF model; pass a .gguf file or a model/adapter directory")
        return "gguf", path
    if path.is_dir():
        if not ((path / "adapter_config.json").is_file() or (path / "config.json").is_file()):
            raise InputError(f"{spec}: not a model directory (no config.json) and not a LoRA adapter "
                             "(no adapter_config.json)")
        return "hf", path
    if spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise InputError(f"{spec}: no such judge file or directory")
    return "hf", spec  # a hub model id


def open_judge(spec, *, backend: str = "auto", mode: str = "rationale", n_threads: int | None = None,
               n_ctx: int | None = None, max_new_tokens: int | None = None, template=None, warn=_PRINT,
               use_extra_bufts: bool = False, adapter: str | Path | None = None, base: str | None = None,
               n_parallel: int = 4) -> Judge:
    """A `Judge` from a spec (see `choose_backend`); `backend` names one instead of
    "auto". A Judge (or any object with compare()) is returned as it is. `warn`: a
    callable for the judge's warnings (answers cut to fit the context), None for
    silence. `use_extra_bufts` and `n_parallel` (pairs decoded together) are gguf
    options, `adapter`/`base` hf options."""
    if not isinstance(spec, (str, Path)):
        return spec
    kwargs = {"mode": mode, "max_new_tokens": max_new_tokens or DEFAULT_MAX_NEW_TOKENS, "template": template}
    if warn is not _PRINT:
        kwargs["warn"] = warn  # None: silent
    name, target = choose_backend(spec, backend)
    return Judge.open(name, target, n_ctx=n_ctx, n_threads=n_threads, use_extra_bufts=use_extra_bufts,
                      adapter=adapter, base=base, n_parallel=n_parallel, **kwargs)
