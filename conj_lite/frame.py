"""The judgment frame: the one text format a judge writes, and holding generation to it.

A judgment is exactly `{"rationale": "<JSON string>", "better_answer": 1|2}` in the
template's own keys and this spacing. The GGUF judge holds llama.cpp to it with
`judgment_grammar`; sampling on transformers holds `generate` to the same grammar
through llguidance (`FrameSampler`), so every sample parses, and what training stores
as chosen/rejected is the text both backends are asked to produce.

Hint-driven samples use the grammar with the verdict fixed to the hinted answer: the
hint steers the rationale and the verdict is the hinted one, so a (true hint,
reversed hint) couple is one positive and one negative even on a model that ignores
hints.

`FrameSampler` also does the sampling itself, one random stream per sequence seeded
from (seed, pair id, order, kind, sample index); `generate` then only takes its
choice. A judgment thus depends on its key and not on how requests fell into
batches: a resumed run, a run with another batch size and an uninterrupted run write
the same texts.
"""

from __future__ import annotations

import hashlib
import json

from .prompts import JudgeTemplate

# JSON string characters, minus the lone surrogate escapes (\ud800-\udfff) that no
# UTF-8 file can hold.
_GBNF_CHAR = (
    'char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" '
    '([0-9a-cA-Ce-fE-F] [0-9a-fA-F] | [dD] [0-7]) [0-9a-fA-F] [0-9a-fA-F])\n'
)


def _gbnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


def frame_head(template: JudgeTemplate) -> str:
    """The frame up to the rationale's text: `{"rationale": "`."""
    return "{" + json.dumps(template.rationale_key, ensure_ascii=False) + ': "'


def frame_middle(template: JudgeTemplate) -> str:
    """Between the rationale's text and the verdict: `", "better_answer": `."""
    return '", ' + json.dumps(template.verdict_key, ensure_ascii=False) + ": "


def verdict_only_head(template: JudgeTemplate) -> str:
    """A verdict-only judgment up to its verdict: `{"better_answer": `."""
    return "{" + json.dumps(template.verdict_key, ensure_ascii=False) + ": "


def verdict_prefix(template: JudgeTemplate, rationale: str = "") -> str:
    """The frame up to the verdict value, with `rationale` as its text (a verdict-only
    judge has no rationale: `{"better_answer": `)."""
    if not template.rationale:
        return verdict_only_head(template)
    return frame_head(template) + json.dumps(rationale, ensure_ascii=False)[1:-1] + frame_middle(template)


def verdict_rule(verdict: int | None) -> str:
    if verdict is None:
        return "[12]"
    if verdict not in (1, 2):
        raise ValueError(f"verdict must be 1, 2 or None, got {verdict!r}")
    return f'"{verdict}"'


def judgment_grammar(template: JudgeTemplate, verdict: int | None = None) -> str:
    """GBNF for exactly one judgment in the template's format; `verdict` fixes the answer
    (hint-driven samples)."""
    if not template.rationale:
        return f"root ::= {_gbnf_literal(verdict_only_head(template))} {verdict_rule(verdict)} \"}}\"\n"
    return (
        f"root ::= {_gbnf_literal(frame_head(template))} char* {_gbnf_literal(frame_middle(template))} "
        f"{verdict_rule(verdict)} \"}}\"\n" + _GBNF_CHAR
    )


def forced_judgment(template: JudgeTemplate, verdict: int | None) -> str | None:
    """The one text the frame allows when it leaves the model no choice (verdict-only with
    the verdict fixed: a hint-driven sample), else None. Such a judgment is written, not
    generated: the model could only produce these exact characters."""
    if template.rationale or verdict is None:
        return None
    return verdict_only_head(template) + f"{verdict_rule(verdict)[1:-1]}}}"


def closing_grammar(template: JudgeTemplate, verdict: int | None = None) -> str:
    """GBNF that closes a rationale cut off at a clean point and gives the verdict."""
    return f"root ::= {_gbnf_literal(frame_middle(template))} {verdict_rule(verdict)} \"}}\"\n"


def sample_seed(seed: int, pair_id: str, order: str, kind: str, sample: int) -> int:
    """The seed of one judgment's random stream (stable across runs and machines)."""
    key = f"{seed}|{pair_id}|{order}|{kind}|{sample}".encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------- the edge: llguidance + torch


class FrameSampler:
    """A `LogitsProcessor` for `generate(do_sample=False)` that samples every row itself.

    Per row: the grammar's mask (when the row has one), temperature, top-k, top-p, then
    a draw from the row's own generator; the logits it returns allow only the drawn
    token. A row that reaches its token budget inside the rationale is made to close
    the string, so the verdict always fits. Built-in processors that run before it
    (the repetition penalty) still apply."""

    def __init__(self, tokenizer, grammars: list[str | None], seeds: list[int], *, temperature: float,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int, eos_ids: list[int], closing_tokens: int = 0,
                 ll_tokenizer=None):
        import torch

        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens, self.closing_tokens = max_new_tokens, closing_tokens
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.matchers = [None] * len(grammars)
        self.eos_ids = list(eos_ids)
        self.prompt_len: int | None = None
        if any(g is not None for g in grammars):
            import llguidance

            self.ll_tokenizer = ll_tokenizer or ll_tokenizer_for(tokenizer, self.eos_ids)
            compiled = {g: llguidance.grammar_from("gbnf", g) for g in set(grammars) if g is not None}
            self.matchers = [llguidance.LLMatcher(self.ll_tokenizer, compiled[g]) if g is not None else None
                             for g in grammars]
            for m in self.matchers:
                if m is not None and m.is_error():
                    raise ValueError(f"grammar error: {m.get_error()}")
            self._closers = _closing_token_ids(tokenizer)

    def __call__(self, input_ids, scores):
        import torch

        step = 0
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        else:
            step = input_ids.shape[1] - self.prompt_len
            last = input_ids[:, -1].tolist()
            for m, token in zip(self.matchers, last):
                if m is not None and not m.is_stopped():
                    m.consume_token(token)
        scores = scores.float().cpu()
        chosen = torch.empty(scores.shape[0], dtype=torch.long)
        for row in range(scores.shape[0]):
            logits = scores[row]
            m = self.matchers[row]
            if m is not None:
                if m.is_stopped() or m.is_error():
                    chosen[row] = self.eos_ids[0]
                    continue
                logits = logits.masked_fill(~self._allowed(m, logits.shape[0], step), float("-inf"))
            chosen[row] = self._draw(logits, self.generators[row])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0]), chosen] = 0.0
        return out.to(input_ids.device)

    def _allowed(self, matcher, vocab: int, step: int):
        import numpy as np
        import torch

        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(vocab, dtype=torch.bool)
        n = min(vocab, bits.shape[0])
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool))
        if self.closing_tokens and step >= self.max_new_tokens - self.closing_tokens:
            closing = allowed & self._closers[:vocab] if self._closers.shape[0] >= vocab else allowed
            if closing.any():  # inside the rationale: end the string now
                return closing
        return allowed

    def _draw(self, logits, generator) -> int:
        import torch

        if self.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits / self.temperature
        if self.top_k and self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[0])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            drop = cum - sorted_p > self.top_p  # keep the smallest set reaching top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, idx, sorted_p)
        return int(torch.multinomial(probs, 1, generator=generator))


_CACHE: dict[tuple, tuple[object, object]] = {}


def _cached(tokenizer, what: str, build):
    """One `build()` per tokenizer object (the entry keeps the tokenizer alive, so its id is not reused)."""
    key = (id(tokenizer), what)
    if key not in _CACHE or _CACHE[key][0] is not tokenizer:
        _CACHE[key] = (tokenizer, build())
    return _CACHE[key][1]


def ll_tokenizer_for(tokenizer, eos_ids: list[int]):
    """llguidance's view of a fast HF tokenizer (about a second to build; cached)."""
    import llguidance.hf

    return _cached(tokenizer, f"ll{tuple(eos_ids)}", lambda: llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos_ids)))


def _closing_token_ids(tokenizer):
    """Tokens whose text starts with a double quote: the ways to end a JSON string (cached)."""
    import torch

    def build():
        mask = torch.zeros(len(tokenizer), dtype=torch.bool)
        for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            if token and token.startswith('"') and tokenizer.decode([token_id]).startswith('"'):
                mask[token_id] = True
        return mask

    return _cached(tokenizer, "closers", build)
