"""Read a judge's verdict from what the model actually wrote.

The prompt asks for one JSON object, {"rationale": "...", "better_answer": 1 or 2}, but
small models wrap it in prose or code fences, repeat it, break the JSON (single quotes,
trailing commas, raw newlines), or get cut off at max_new_tokens before the closing
brace. `parse_verdict` tries readings from the most to the least structured and the
first one that finds a judgment decides (`Verdict.method` names it):

  json           the whole reply is valid JSON; counting it measures format compliance
  fenced_json    objects inside ``` fences (all the judgments found are fenced)
  embedded_json  balanced {...} objects in prose, or a whole reply that only reads
                 after tolerant repair (trailing commas, Python-dict quoting)
  key_value      loose `better_answer: 2` / `"更好的回答": 2` pairs, mostly JSON cut off
                 before its closing brace; the rationale may then be a partial string
  bracket        MT-Bench markers [[A]] [[B]] [[1]] [[2]] ([[C]] is a tie)
  none           nothing readable

Conflicts: inside the deciding reading every verdict must agree (fenced and embedded
objects count as one reading). A reply that contradicts itself (two objects that
disagree, [[A]] and [[B]], a verdict and a tie) has slot None: it is neither a judgment
to trust nor one to train on. Values that are no verdict at all (3, 0, "Paris") are
skipped when another candidate has one, so a quoted {"answer": 42} does not spoil the
real judgment. When all candidates agree, the rationale comes from the last one (models
restate their judgment; the last is final). Across readings there is no vote: a JSON
verdict stands even if its rationale quotes a [[A]] marker.

`method` says where a judgment was found even when its verdict is unusable (a tie, 3, a
contradiction); `ok` says whether there is a verdict. Keys and verdict values are read
after NFKC (full-width digits, colons, brackets); the rationale keeps its characters, so
Chinese punctuation survives.
"""

from __future__ import annotations

import ast
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

__all__ = [
    "METHODS",
    "RATIONALE_KEYS",
    "VERDICT_KEYS",
    "Verdict",
    "cap_rationale",
    "format_judgment",
    "parse_verdict",
]

METHODS = ("json", "fenced_json", "embedded_json", "key_value", "bracket", "none")

RATIONALE_KEYS = ("rationale", "reason", "reasoning", "explanation", "justification", "原因", "理由", "分析")
# Most specific first: when one object holds several of these keys, the first wins,
# so {"answer": "Paris", "better_answer": 2} reads 2. Spelling variants
# ("better answer", "Better-Answer", "betteranswer") are covered by key normalisation.
VERDICT_KEYS = (
    "better_answer",
    "better_response",
    "preferred_answer",
    "更好的回答",
    "更好的答案",
    "更优回答",
    "winner",
    "verdict",
    "preferred",
    "better",
    "更好",
    "choice",
    "answer",
)


@dataclass(frozen=True)
class Verdict:
    """A judge's verdict: which answer (1 or 2) is better, and why."""

    slot: int | None  # 1 or 2, None when it cannot be read
    rationale: str | None
    method: str  # one of METHODS: how (or where) the judgment was read

    @property
    def ok(self) -> bool:
        return self.slot in (1, 2)


def parse_verdict(
    text: str,
    *,
    rationale_keys: Iterable[str] = RATIONALE_KEYS,
    verdict_keys: Iterable[str] = VERDICT_KEYS,
) -> Verdict:
    """Read the verdict in a judge's reply. Never raises on a string.

    A custom template's keys can be added in front of the defaults, e.g.
    `verdict_keys=(template.verdict_key, *VERDICT_KEYS)`."""
    if not isinstance(text, str):
        raise TypeError(f"parse_verdict reads a str, got {type(text).__name__}")
    keys = _compile_keys(_key_tuple(rationale_keys), _key_tuple(verdict_keys))
    original = _final_answer(text)
    folded = _fold(original)

    reading = _object_reading(_strict_json(original), keys)
    if reading is not None:
        return _decide([reading], "json")
    readings, all_fenced = _embedded_readings(original, folded, keys)
    if readings:
        return _decide(readings, "fenced_json" if all_fenced else "embedded_json")
    readings = _key_value_readings(original, folded, keys)
    if readings:
        return _decide(readings, "key_value")
    readings = _bracket_readings(original, folded)
    if readings:
        return _decide(readings, "bracket")
    return Verdict(None, None, "none")


def format_judgment(
    rationale: str | None, slot: int, *, rationale_key: str = "rationale", verdict_key: str = "better_answer"
) -> str:
    """The canonical judgment: one line of JSON spaced like the prompt's example (and
    `prompts.judge_verdict_json`), non-ASCII kept as is. `rationale=None` gives a
    verdict-only judgment."""
    if rationale is not None and not isinstance(rationale, str):
        raise TypeError(f"rationale must be a str or None, got {type(rationale).__name__}")
    if isinstance(slot, bool) or not isinstance(slot, int) or slot not in (1, 2):
        raise ValueError(f"slot must be 1 or 2, got {slot!r}")
    if rationale is None:
        return json.dumps({verdict_key: slot}, ensure_ascii=False)
    return json.dumps({rationale_key: rationale, verdict_key: slot}, ensure_ascii=False)


# A sentence ends at . ! ? followed by a space (not "3.14"), or at CJK end punctuation.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]”’]*(?=\s|$)|[。！？；…]+[”’」』）]*")


def cap_rationale(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters, at the last sentence end if that
    keeps at least half, else at the last word break, else hard. No ellipsis is added:
    capped rationales become training targets, and a sentence end reads complete."""
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")
    if len(text) <= max_chars:
        return text
    floor = max_chars // 2
    sentence_end = 0
    for match in _SENTENCE_END.finditer(text):
        if match.end() > max_chars:
            break
        sentence_end = match.end()
    if sentence_end and sentence_end >= floor:
        return text[:sentence_end].rstrip()
    # text[max_chars] itself may be the break, so look one character further.
    word_break = max(text.rfind(space, 0, max_chars + 1) for space in " \n\t")
    if word_break >= floor:
        return text[:word_break].rstrip(" \t\n,;:，、；：")
    return text[:max_chars].rstrip()


# ---------------------------------------------------------------- keys and values

_MISSING = object()
_TIE = 0  # an explicit tie: a reading that conflicts with 1 and 2 but is no verdict
_MAX_DEPTH = 4  # objects nested deeper than this are not candidates on their own
_MAX_CANDIDATES = 200  # bounds the work on degenerate output ("{{{{…")
_MAX_VERDICT_CHARS = 80  # a verdict value is short; longer ones are neither read nor scanned

_KEY_SEPARATORS = re.compile(r"[\s_\-]+")


class _Keys(NamedTuple):
    rationale: tuple[str, ...]  # normalised, in priority order
    verdict: tuple[str, ...]
    rationale_pair: re.Pattern
    verdict_pair: re.Pattern


def _norm_key(key: str) -> str:
    """"Better-Answer", "better answer", "ＢｅｔｔｅｒＡｎｓｗｅｒ" → "betteranswer"."""
    return _KEY_SEPARATORS.sub("", unicodedata.normalize("NFKC", key)).casefold()


def _key_tuple(keys: Iterable[str]) -> tuple[str, ...]:
    if isinstance(keys, str):  # a lone key, not an iterable of characters
        keys = (keys,)
    return tuple(dict.fromkeys(k for k in map(_norm_key, keys) if k))


@lru_cache(maxsize=32)
def _compile_keys(rationale: tuple[str, ...], verdict: tuple[str, ...]) -> _Keys:
    return _Keys(rationale, verdict, _pair_pattern(rationale), _pair_pattern(verdict))


def _pair_pattern(keys: tuple[str, ...]) -> re.Pattern:
    """Matches `key:`, `"key": `, `**Key:** `, `key=` for any of `keys` (normalised),
    allowing the separators that _norm_key drops; the match ends where the value starts."""
    if not keys:
        return re.compile(r"(?!)")
    alternatives = []
    for key in sorted(keys, key=len, reverse=True):  # longest first: "reasoning" before "reason"
        body = r"[ \t_\-]*".join(map(re.escape, key))
        # "answer" must not match inside "the_answer"; CJK keys have no word breaks.
        guard = r"(?<![A-Za-z0-9])" if key[0].isascii() and key[0].isalnum() else ""
        alternatives.append(guard + body)
    return re.compile(
        r"[\"'“‘「『]?(?:" + "|".join(alternatives) + r")[\"'”’」』]?"
        r"[ \t]*(?:\*\*|__)?[ \t]*[:=]\s*(?:\*\*|__)?[ \t]*",
        re.IGNORECASE,
    )


_TIE_WORDS = frozenset({"c", "tie", "draw", "equal", "same", "both", "平局", "相同", "一样"})
_SLOT_CHARS = {"1": 1, "2": 2, "a": 1, "b": 2, "一": 1, "二": 2}
_SLOT_TEXT = re.compile(
    r"(?:(?:answer|response|assistant|option|回答|答案|回复)[_\-:#]?)?第?([12ab一二])(?:\.0+)?(?:个(?:回答|答案)?|号)?"
)
_WRAPPERS = "\"'`“”‘’「」『』【】[]()<>*.。!！"
_WHITESPACE = re.compile(r"\s+")


def _read_slot(value: object) -> int | None:
    """1 or 2 from a verdict value, _TIE for an explicit tie, None for anything else.

    Reads 2, 2.0, "2", "２", "Answer 2", "answer_2", "回答2", "第二个回答", "B", "[[B]]",
    "**Answer 2**". Nothing looser: "2 is better" or "1 or 2" are not verdicts."""
    if isinstance(value, bool):  # True == 1 in Python, but it is no answer number
        return None
    if isinstance(value, (int, float)):
        return int(value) if value in (1, 2) else None
    if not isinstance(value, str):
        return None
    text = _WHITESPACE.sub("", unicodedata.normalize("NFKC", value)).casefold().strip(_WRAPPERS)
    if text in _TIE_WORDS:
        return _TIE
    match = _SLOT_TEXT.fullmatch(text)
    return _SLOT_CHARS[match.group(1)] if match else None


def _as_rationale(value: object) -> str | None:
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        value = "\n".join(value)  # some models give a list of reasons
    if not isinstance(value, str):
        return None
    return value.strip() or None


# ---------------------------------------------------------------- text preparation


def _final_answer(text: str) -> str:
    """The reply without BOMs, surrounding whitespace, or a <think> block: drafts in a
    reasoning model's thinking must not count against its final judgment."""
    text = text.replace("\ufeff", "").strip()
    end = text.rfind("</think>")
    return text[end + len("</think>") :].strip() if end >= 0 else text


@lru_cache(maxsize=8192)
def _fold_char(char: str) -> str:
    folded = unicodedata.normalize("NFKC", char)
    return folded if len(folded) == 1 else char


def _fold(text: str) -> str:
    """NFKC character by character, keeping only one-to-one mappings ("２"→"2", "："→":",
    "［"→"["), so that offsets in the folded text are offsets in the original: scanning
    happens on the folded text, rationales are cut from the original."""
    return "".join(char if char.isascii() else _fold_char(char) for char in text)


# ---------------------------------------------------------------- JSON objects


class _Reading(NamedTuple):
    slot: int | None  # 1, 2, _TIE, or None when the value is no verdict
    rationale: str | None


def _decide(readings: list[_Reading], method: str) -> Verdict:
    """One verdict from the readings of one method (see the module notes on conflicts)."""
    slots = {reading.slot for reading in readings if reading.slot is not None}
    if len(slots) > 1:
        return Verdict(None, None, method)
    agreeing = [reading for reading in readings if reading.slot in slots] or readings
    rationale = next((r.rationale for r in reversed(agreeing) if r.rationale), None)
    slot = slots.pop() if slots else None
    return Verdict(slot if slot in (1, 2) else None, rationale, method)


def _lookup(value: object, keys: tuple[str, ...], depth: int = 0) -> object:
    """The value under the first of `keys` in a decoded object, looking into nested
    objects and lists (e.g. {"judgment": {...}}) when the top level has none."""
    if depth > _MAX_DEPTH:
        return _MISSING
    if isinstance(value, dict):
        by_key: dict[str, object] = {}
        for key, item in value.items():
            by_key.setdefault(_norm_key(str(key)), item)
        for key in keys:
            if key in by_key:
                return by_key[key]
        children = list(value.values())
    elif isinstance(value, list):
        children = value
    else:
        return _MISSING
    for child in children:
        found = _lookup(child, keys, depth + 1)
        if found is not _MISSING:
            return found
    return _MISSING


def _object_reading(value: object, keys: _Keys) -> _Reading | None:
    """The reading of a decoded object; None when it has no verdict key, as then it is
    no judgment (e.g. a JSON snippet quoted from one of the answers)."""
    verdict = _lookup(value, keys.verdict)
    if verdict is _MISSING:
        return None
    return _Reading(_read_slot(verdict), _as_rationale(_lookup(value, keys.rationale)))


def _strict_json(text: str) -> object:
    """The whole reply as JSON (_MISSING when it is not): exactly what the prompt asks
    for, except that raw newlines inside strings are let through."""
    try:
        return json.loads(text, strict=False)
    except (ValueError, RecursionError):
        return _MISSING


_TRAILING_COMMA = re.compile(r'("(?:\\.|[^"\\])*")|,(\s*[}\]])', re.DOTALL)


def _decode(snippet: str) -> object:
    """A JSON value, leniently: raw newlines in strings, trailing commas, and Python
    literals ({'rationale': '...', 'better_answer': 2,}). _MISSING when none of them reads."""
    attempts = (
        lambda s: json.loads(s, strict=False),
        # Strings are matched first and kept, so commas inside them are safe.
        lambda s: json.loads(_TRAILING_COMMA.sub(lambda m: m.group(1) or m.group(2), s), strict=False),
        ast.literal_eval,  # safe: literals only, never code
    )
    for attempt in attempts:
        try:
            return attempt(snippet)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
    return _MISSING


def _object_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every balanced {...} in text, nested ones included, outer first.

    One linear pass. Quotes count only inside an object (prose is full of apostrophes),
    and a single quote opens a string only in a Python-style object, one whose first key
    is single-quoted. An unclosed object (truncated output) yields nothing itself, but
    complete objects inside it still count."""
    spans, stack, quote = [], [], None
    index = 0
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = None
        elif char == "{":
            python_style = text[index + 1 : index + 40].lstrip().startswith("'")
            stack.append((index, "\"'" if python_style else '"'))
        elif char == "}" and stack:
            start, _ = stack.pop()
            if len(stack) < _MAX_DEPTH:
                spans.append((start, index + 1))
        elif stack and char in stack[-1][1]:
            quote = char
        index += 1
    return sorted(spans, key=lambda span: (span[0], -span[1]))


_FENCE = re.compile(r"```[ \t]*[\w+\-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


def _fence_ranges(text: str) -> list[tuple[int, int]]:
    """Where the contents of ``` fences lie (an unclosed fence runs to the end)."""
    return [match.span(1) for match in _FENCE.finditer(text)]


def _embedded_readings(original: str, folded: str, keys: _Keys) -> tuple[list[_Reading], bool]:
    """Readings of all objects in the reply, fenced or not (so a fenced verdict and a
    different one in prose conflict), and whether all of them lie in ``` fences."""
    fences = _fence_ranges(folded)
    readings, all_fenced = [], True
    for (start, end), value in _decoded_objects(original, folded, _object_spans(folded)):
        reading = _object_reading(value, keys)
        if reading is not None:
            readings.append(reading)
            all_fenced = all_fenced and any(lo <= start and end <= hi for lo, hi in fences)
    return readings, all_fenced


def _decoded_objects(
    original: str, folded: str, spans: list[tuple[int, int]]
) -> list[tuple[tuple[int, int], object]]:
    """(span, value) of the outermost spans that decode; inside a span that fails to
    decode, its nested objects get their chance."""
    values, covered_until = [], -1
    for start, end in spans[:_MAX_CANDIDATES]:
        if start < covered_until or ":" not in folded[start:end]:
            continue
        # The original, not the folded text: folding would rewrite the rationale's
        # punctuation. An object that needs folding (a bare ２) is left to key_value.
        value = _decode(original[start:end])
        if value is not _MISSING:
            values.append(((start, end), value))
            covered_until = end
    return values


# ---------------------------------------------------------------- loose key/value pairs

_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "「": "」", "『": "』"}
# A string value ends at a closing quote followed by the end of the object, the end of
# the text, or a comma and the next key; an inner quote ("says "hi" to") does not.
_VALUE_END = re.compile(r"""\s*(?:\Z|[}\]]|,\s*(?:\Z|["'“‘「『]|[^\s"':,{}]{1,40}\s*[:=]))""")
_BARE_VERDICT = re.compile(r"[^,}\n;]*")
_BARE_RATIONALE = re.compile(r"[^\n]*")
# The unfinished line before a loose verdict key: "Final " of "Final verdict: 2", '{"'.
_LABEL_TAIL = re.compile(r"(?:^|(?<=[\n.!?。！？]))[^\n.!?。！？]{0,40}\Z")
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _string_end(folded: str, start: int, close: str, stop: int) -> int | None:
    """Index of the quote that closes a string value starting at `start`; None when
    `stop` comes first (generation cut off mid-string, or the value is too long)."""
    index = start
    while index < stop:
        char = folded[index]
        if char == "\\":
            index += 2
            continue
        if char == close and _VALUE_END.match(folded, index + 1):
            return index
        index += 1
    return None


def _value_span(
    folded: str, start: int, bare: re.Pattern, limit: int | None = None
) -> tuple[int, int, str | None]:
    """(start, end, quote) of the value at `start`: a quoted string (maybe unclosed) or
    a bare token. With a `limit`, scanning stops a little past it (so a degenerate reply
    cannot make this quadratic) and an over-long value comes out longer than `limit`."""
    stop = len(folded) if limit is None else min(len(folded), start + limit + 2)
    if start < stop and folded[start] in _QUOTE_PAIRS:
        quote = folded[start]
        end = _string_end(folded, start + 1, _QUOTE_PAIRS[quote], stop)
        return start + 1, stop if end is None else end, quote
    return start, bare.match(folded, start, stop).end(), None


def _unescape(raw: str, quote: str | None) -> str:
    """A string value's text: JSON escapes decoded when they are valid, else the common
    ones (\\n, \\", \\') by hand, which also copes with a string cut mid-escape."""
    if quote == '"':
        try:
            return json.loads(f'"{raw}"', strict=False)
        except ValueError:
            pass
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), raw)


def _loose_rationale(
    original: str, folded: str, pattern: re.Pattern
) -> tuple[str | None, list[tuple[int, int]]]:
    """The last rationale value in loose text, and the spans of its quoted strings (a
    verdict key quoted inside a rationale is not the verdict)."""
    rationale, string_spans, position = None, [], 0
    while match := pattern.search(folded, position):
        start, end, quote = _value_span(folded, match.end(), _BARE_RATIONALE)
        text = _unescape(original[start:end], quote).strip()
        rationale = text or rationale
        if quote:
            string_spans.append((start, end))
        position = max(end, match.end())
    return rationale, string_spans


def _key_value_readings(original: str, folded: str, keys: _Keys) -> list[_Reading]:
    """Readings from `key: value` pairs anywhere in the text.

    Unlike a JSON object, a loose key without a verdict value ("Answer: Paris") is no
    judgment, so then this gives nothing and the next method gets its turn; so does a
    value that is a [[B]] marker ("Final verdict: [[B]]"), which is MT-Bench style.
    Without a rationale key, the rationale is the prose before the first verdict read."""
    rationale, string_spans = _loose_rationale(original, folded, keys.rationale_pair)
    slots, first_key = [], None
    for match in keys.verdict_pair.finditer(folded):
        if any(lo <= match.start() < hi for lo, hi in string_spans):
            continue
        start, end, _ = _value_span(folded, match.end(), _BARE_VERDICT, _MAX_VERDICT_CHARS)
        if _MARKER.fullmatch(folded[start:end].strip(" \t*")):
            continue
        slot = _read_slot(folded[start:end]) if end - start <= _MAX_VERDICT_CHARS else None
        if slot is not None and first_key is None:
            first_key = match.start()
        slots.append(slot)
    if all(slot is None for slot in slots):
        return []
    if rationale is None:
        rationale = _LABEL_TAIL.sub("", original[:first_key]).strip() or None
    return [_Reading(slot, rationale) for slot in slots]


# ---------------------------------------------------------------- [[A]] markers

_MARKER = re.compile(r"\[\[\s*([^\[\]\n]{1,16}?)\s*\]\]")
# "Final verdict:" left dangling at the end once the marker is gone.
_DANGLING_LABEL = re.compile(r"(?:^|(?<=[\n.!?。！？]))[ \t*_#>\-]*[^\n.!?。！？]{0,40}[:：][\s*_]*\Z")


def _bracket_readings(original: str, folded: str) -> list[_Reading]:
    """Readings from MT-Bench style [[A]]/[[B]]/[[1]]/[[2]]/[[C]] markers; the rationale
    is the prose around them."""
    markers = [(match.span(), _read_slot(match.group(1))) for match in _MARKER.finditer(folded)]
    markers = [(span, slot) for span, slot in markers if slot is not None]
    if not markers:
        return []
    pieces, position = [], 0
    for (start, end), _ in markers:
        pieces.append(original[position:start].rstrip(" \t"))
        position = end
    pieces.append(original[position:])
    prose = _DANGLING_LABEL.sub("", "".join(pieces).strip()).strip()
    return [_Reading(slot, prose or None) for _, slot in markers]
