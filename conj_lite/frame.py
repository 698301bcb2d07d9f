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
the same texts. It works on the whole batch at once (one bitmask fill, the draw on
the logits' device: `draw_tokens`), and it serves every sampling engine: transformers
calls it as a logits processor, the llama.cpp engine step by step.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

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


# The same JSON string characters as one regular expression: llguidance lexes the whole
# rationale as a single token class, and computes its token masks about 20x faster than
# for the character-by-character GBNF rule (benchmarks/sampling.py --overhead).
_JSON_CHARS = r'/([^"\\\x00-\x1F\x7F]|\\(["\\\/bfnrt]|u([0-9a-cA-Ce-fE-F][0-9a-fA-F]|[dD][0-7])[0-9a-fA-F][0-9a-fA-F]))*/'


def judgment_lark(template: JudgeTemplate, verdict: int | None = None) -> str:
    """`judgment_grammar` in llguidance's Lark, the rationale's text one lexeme: what
    sampling holds generation to (the same language; the GGUF judge takes the GBNF)."""
    digit = "/[12]/" if verdict is None else json.dumps(str(verdict_rule(verdict).strip('"')))
    if not template.rationale:
        return f"start: {json.dumps(verdict_only_head(template), ensure_ascii=False)} {digit} \"}}\"\n"
    return (f"start: {json.dumps(frame_head(template), ensure_ascii=False)} RATIONALE "
            f"{json.dumps(frame_middle(template), ensure_ascii=False)} {digit} \"}}\"\n"
            f"RATIONALE: {_JSON_CHARS}\n")


def closing_grammar(template: JudgeTemplate, verdict: int | None = None) -> str:
    """GBNF that closes a rationale cut off at a clean point and gives the verdict."""
    return f"root ::= {_gbnf_literal(frame_middle(template))} {verdict_rule(verdict)} \"}}\"\n"


def sample_seed(seed: int, pair_id: str, order: str, kind: str, sample: int) -> int:
    """The seed of one judgment's random stream (stable across runs and machines)."""
    key = f"{seed}|{pair_id}|{order}|{kind}|{sample}".encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def round_trip_problem(texts, encode, decode) -> str | None:
    """Where `decode(encode(text))` first differs from `text`, for the first of `texts`
    that does not come back (a leading space a sentencepiece tokenizer adds or drops
    does not count); None when all do."""
    for text in texts:
        want, got = text.lstrip(" "), decode(encode(text)).lstrip(" ")
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            return f"{want[max(0, at - 20):at + 20]!r} reads back as {got[max(0, at - 20):at + 20]!r}"
    return None


# ---------------------------------------------------------------- the draw: torch, the whole batch at once

def unpack_bitmask(bitmask, vocab: int):
    """llguidance's token bitmask (int32, 32 tokens a word, little-endian bits) as a
    (batch, vocab) bool tensor on the bitmask's device; tokens past its end are refused."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]), value=False)


# Nucleus candidates, in tiers: a row's nucleus is looked for among its top 128 tokens, then
# its top 1,024, and the whole vocabulary is sorted only for a row whose nucleus is wider
# still. At temperature 0.8 a rationale's nucleus is mostly under 100 tokens of SmolLM2's
# 49k, and torch.topk's cost grows with k: one draw for 32 rows on one core took 21 ms with
# a single tier of 1,024 candidates, 7-8 ms with these (the same tokens).
NUCLEUS_CANDIDATES = (128, 1024)


def draw_tokens(logits, uniforms, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
                candidates: int | Sequence[int] = NUCLEUS_CANDIDATES):
    """One token per row of `logits` (batch, vocab; refused tokens at -inf): temperature,
    top-k and top-p on the whole batch, then inverse-CDF sampling with the row's own
    uniform in [0, 1) (`uniforms`, one per row). A row's token depends only on its logits
    and its uniform, never on the other rows (the nucleus is ordered by falling
    probability, ties by token id). temperature <= 0: the most likely token."""
    import torch

    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, vocab), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p >= 1.0:
        probs, index = torch.softmax(logits, dim=-1), None
    else:
        index, probs = nucleus(logits, top_p, (candidates,) if isinstance(candidates, int) else tuple(candidates))
    cum = probs.cumsum(-1)
    last = cum[:, -1:]
    # u * last < last, so the search lands on a token of positive probability
    target = torch.minimum(uniforms.to(cum.device, cum.dtype).unsqueeze(1) * last,
                           torch.nextafter(last, torch.zeros_like(last)))
    picked = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[1] - 1)
    return (picked if index is None else index.gather(1, picked)).squeeze(1)


def nucleus(logits, top_p: float, tiers: tuple[int, ...]):
    """(token ids, probabilities) of each row's top-p nucleus, by falling probability (ties
    by token id), zero probability past it (rows padded alike). A row's nucleus is taken
    from its top `tiers[0]` tokens when the tokens strictly above the k-th's value already
    hold more than `top_p` (then nothing at or below that value is in it, whatever ties
    torch.topk broke), else from the next tier's, else from the whole sorted vocabulary."""
    import torch

    vocab = logits.shape[-1]
    total = torch.logsumexp(logits, dim=-1, keepdim=True)
    found: list[tuple] = []
    pending = torch.arange(logits.shape[0], device=logits.device)
    for k in (*(t for t in tiers if t < vocab), vocab):
        rows = logits[pending]
        if k < vocab:
            values, index = torch.topk(rows, k, dim=-1)
            above = torch.exp(values - total[pending]).masked_fill(values <= values[:, -1:], 0.0)
            inside = above.sum(-1) > top_p
        else:
            values, index = torch.sort(rows, dim=-1, descending=True)
            inside = torch.ones(len(pending), dtype=torch.bool, device=logits.device)
        if inside.any():
            values, index = values[inside], index[inside]
            index, order = index.sort(dim=-1)  # ties by token id: the order does not depend on the path
            ranked = values.gather(1, order).sort(dim=-1, descending=True, stable=True)
            probs = torch.exp(ranked.values - total[pending[inside]])
            before = probs.cumsum(-1) - probs  # keep a token while the mass before it is <= top_p
            found.append((pending[inside], index.gather(1, ranked.indices), probs.masked_fill(before > top_p, 0.0)))
        pending = pending[~inside]
        if len(pending) == 0:
            break
    width = max(ids.shape[1] for _, ids, _ in found)
    index = torch.zeros(logits.shape[0], width, dtype=torch.long, device=logits.device)
    probs = torch.zeros(logits.shape[0], width, dtype=logits.dtype, device=logits.device)
    for rows, ids, p in found:
        index[rows, :ids.shape[1]] = ids
        probs[rows, :p.shape[1]] = p
    return index, probs


def apply_repetition_penalty(scores, seen, penalty: float):
    """transformers' repetition penalty on a batch: the logits of tokens in `seen`
    (batch, n; a row may repeat a token) divided by `penalty` when positive, multiplied
    when negative."""
    import torch

    if penalty == 1.0:
        return scores
    picked = torch.gather(scores, 1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seen, picked)


# ---------------------------------------------------------------- the edge: llguidance + torch


class FrameError(RuntimeError):
    """The judgment grammar refused a token sampled inside it: the grammar's view of the
    tokenizer is not the model's (see check_round_trip)."""


class FrameSampler:
    """Samples every row of a batch itself, held to the frame: a `LogitsProcessor` for
    `generate(do_sample=False)`, or called step by step (`choose`, `advance`) by an engine
    that decodes by itself (llama.cpp).

    Per step, for the whole batch: one llguidance bitmask fill (the rows with a grammar),
    the mask applied, then temperature, top-k, top-p and one uniform per row from the
    row's own generator (`draw_tokens`), on the logits' device. A row that reaches its
    token budget inside the rationale is made to close the string, so the verdict always
    fits. A token the grammar refuses stops sampling (`FrameError`): it means the
    grammar and the model read the tokens differently. Built-in processors that run
    before it (the repetition penalty) still apply."""

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
            # GBNF (judgment_grammar, what the GGUF judge takes) or llguidance's Lark (judgment_lark)
            compiled = {g: llguidance.grammar_from("gbnf" if "::=" in g else "lark", g)
                        for g in set(grammars) if g is not None}
            self.matchers = [llguidance.LLMatcher(self.ll_tokenizer, compiled[g]) if g is not None else None
                             for g in grammars]
            for m in self.matchers:
                if m is not None and m.is_error():
                    raise ValueError(f"grammar error: {m.get_error()}")
            self._executor = _executor()
            self._closers = closing_token_mask(self.ll_tokenizer)
            self._bitmask = torch.full((len(grammars), (self.ll_tokenizer.vocab_size + 31) // 32), -1,
                                       dtype=torch.int32)

    def __call__(self, input_ids, scores):
        import torch

        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        else:
            self.advance(range(input_ids.shape[0]), input_ids[:, -1].tolist())
        chosen = self.choose(scores, input_ids.shape[1] - self.prompt_len)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen.unsqueeze(1), 0.0)

    def advance(self, rows, tokens: list[int]) -> None:
        """The tokens just chosen for `rows` enter their grammars."""
        held = [(self.matchers[r], t) for r, t in zip(rows, tokens)
                if self.matchers[r] is not None and not self.matchers[r].is_stopped()]
        if not held:
            return
        for (m, token), ok in zip(held, self._executor.consume_token_par(held)):
            if not ok or m.is_error():
                raise FrameError(f"the judgment grammar refused token {token} "
                                 f"({self.ll_tokenizer.dbg_tokens([token])}): {m.get_error()}")

    def choose(self, scores, step: int, rows=None):
        """The next token of each row in `rows` (default: all) from their logits `scores`
        (len(rows), vocab), `step` tokens into the judgment; a tensor on scores' device."""
        import torch

        rows = list(range(scores.shape[0])) if rows is None else list(rows)
        scores = scores.float()
        held = [(i, self.matchers[r]) for i, r in enumerate(rows) if self.matchers[r] is not None]
        done = [i for i, m in held if m.is_stopped()]
        if held:
            mask = self._bitmask[: len(rows)].fill_(-1)
            live = [(m, i) for i, m in held if not m.is_stopped()]
            if live:
                self._executor.unsafe_compute_mask_ptr(live, mask.data_ptr(), mask.shape[1] * 4, mask.shape[0])
            allowed = unpack_bitmask(mask.to(scores.device), scores.shape[1])
            if self.closing_tokens and step >= self.max_new_tokens - self.closing_tokens:
                closers = self._closers.to(scores.device)
                closing = allowed & _fit(closers, scores.shape[1])
                allowed = torch.where(closing.any(-1, keepdim=True), closing, allowed)  # inside the rationale: end it
            scores = scores.masked_fill(~allowed, float("-inf"))
            if done:  # a finished judgment only ends its turn
                scores[done] = 0.0
        uniforms = torch.tensor([torch.rand(1, generator=self.generators[r]).item() for r in rows])
        chosen = draw_tokens(scores, uniforms, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if done:
            chosen[done] = self.eos_ids[0]
        return chosen


def _fit(mask, vocab: int):
    """A per-token mask cut or padded (False) to `vocab` entries."""
    import torch

    if mask.shape[0] >= vocab:
        return mask[:vocab]
    return torch.cat([mask, mask.new_zeros(vocab - mask.shape[0])])


_CACHE: dict[tuple, tuple[object, object]] = {}


def _cached(owner, what: str, build):
    """One `build()` per owner object (the entry keeps the owner alive, so its id is not reused)."""
    key = (id(owner), what)
    if key not in _CACHE or _CACHE[key][0] is not owner:
        _CACHE[key] = (owner, build())
    return _CACHE[key][1]


def _executor():
    import llguidance

    return _cached(llguidance, "executor", llguidance.LLExecutor)


def ll_tokenizer_for(tokenizer, eos_ids: list[int]):
    """llguidance's view of a fast HF tokenizer (about a second to build; cached)."""
    import llguidance.hf

    return _cached(tokenizer, f"ll{tuple(eos_ids)}", lambda: llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos_ids)))


def closing_token_mask(ll_tokenizer):
    """Tokens whose bytes start with a double quote: the ways to end a JSON string (cached)."""
    import torch

    def build():
        n = ll_tokenizer.vocab_size
        return torch.tensor([ll_tokenizer.decode_bytes([t]).startswith(b'"') for t in range(n)], dtype=torch.bool)

    return _cached(ll_tokenizer, "closers", build)
