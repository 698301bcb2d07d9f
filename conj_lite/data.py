"""Load pairwise preference data into one record shape, `PreferencePair`.

Sources: `.json` (a list of objects, or an object with the list under "data", "rows"
or "examples"), `.jsonl`, `.parquet`, `.csv` (UTF-8, first line = header), a directory
written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or else a
Hugging Face dataset name.

Column layouts ("presets"), detected from the first row's keys when preset="auto":
  canonical        question, answer_a, answer_b, label (A / B / tie)
  llmbar           input, output_1, output_2, label (1 / 2)
  chosen_rejected  prompt (optional), chosen, rejected: text or chat messages; a
                   `subset` column is kept (RewardBench: prompt, chosen, rejected, subset)
  annotators       several votes annotator1, annotator2, ... and a majority vote
                   (PandaLM: instruction, input, response1, response2, annotator1..3
                   with 0 = tie, 1, 2); no strict majority is a tie
  detected         any other common naming, compared case-insensitively: the question
                   as question / prompt / instruction (+ input) / query / input; the
                   answers as a pair response|output|completion|answer + A/B or 1/2
                   (with a space, an underscore or nothing before the suffix:
                   response_A, Response 1, response1, output_1, completion_a, answer1);
                   the label as label / winner / preference / choice
Any other layout: fields={"question": ..., "a": ..., "b": ..., "label": ...} (plus
optional "id", "subset", "source"); a list of columns as "label" is a majority vote,
a list of columns as "question" is joined with blank lines (instruction + input).

An empty answer is a legitimate thing to judge and is kept (counted in
LoadResult.n_empty_answers); a number or boolean where text is expected is converted
to text (json spelling: true, 4, 0.5) and counted in LoadResult.n_converted. Null,
a missing field, an empty question or an unknown label is a bad row.
Labels such as 0/1/2 need a label_map: a dict, "0=A,1=B,2=tie", or a named one
("autoj": 0 = A, 1 = B, 2 = tie; "pandalm": 0 = tie, 1 = A, 2 = B).

Every bad row raises `InputError` starting with `path:LINE:` (JSONL and CSV, 1-based
file lines) or `path: row N:` (JSON, Parquet, datasets; rows count from 0 like the id
suffix). With skip_invalid=True bad rows go to a rejects file instead.

The pure part (normalize_label, detect_preset, record_from_row) never touches files.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from conj_lite.errors import InputError
from conj_lite.jsonio import dumps_line, iter_jsonl_objects, json_error, no_space_error  # noqa: F401  (iter_jsonl_objects: read by training and warm-up)

LABELS = ("A", "B", "tie")

# Presets that are a plain renaming of columns. Roles: question, a, b, label.
PRESET_FIELDS = {
    "canonical": {"question": "question", "a": "answer_a", "b": "answer_b", "label": "label"},
    "llmbar": {"question": "input", "a": "output_1", "b": "output_2", "label": "label"},
}
CHOSEN_REJECTED = "chosen_rejected"
ANNOTATORS = "annotators"
PRESETS = (*PRESET_FIELDS, CHOSEN_REJECTED, ANNOTATORS)
FIELDS = "fields"  # LoadResult.preset for an explicit mapping; also accepted as preset=
REQUIRED_ROLES = ("question", "a", "b", "label")
OPTIONAL_ROLES = ("id", "subset", "source")
ID_KEYS = ("id", "pair_id")
DETECTED = "detected"  # LoadResult.preset for a layout found by detect_fields

# The "detected" layout: column names compared lower-case. The question is the first of
# QUESTION_COLUMNS the row has ("instruction" also takes "input" after it); the answers
# are the one pair of ANSWER_COLUMN names with suffixes a/b or 1/2; the label is the first
# of LABEL_COLUMNS.
QUESTION_COLUMNS = ("question", "prompt", "instruction", "query", "input")
ANSWER_COLUMN = re.compile(r"(?:response|output|completion|answer)[ _]?([ab12])", re.IGNORECASE)
ANSWER_PARTNER = {"a": "b", "A": "B", "1": "2"}
LABEL_COLUMNS = ("label", "winner", "preference", "choice")

# The default label mapping. Keys are compared lower-case with spaces removed.
# 1/2 follow "output_1"/"output_2" (LLMBar); [[A]]/[[B]]/[[C]] are MT-Bench judge
# verdicts ([[C]] = tie); model_a/model_b/tie (bothbad) are Chatbot Arena winners.
# 0 is deliberately absent: 0/1 means A/B in some datasets and tie/A in others.
DEFAULT_LABEL_MAP = {
    "1": "A", "2": "B",
    "a": "A", "b": "B",
    "[[a]]": "A", "[[b]]": "B", "[[c]]": "tie",
    "a>b": "A", "b<a": "A", "b>a": "B", "a<b": "B", "a=b": "tie", "b=a": "tie",
    "model_a": "A", "model_b": "B",
    "tie": "tie", "equal": "tie", "draw": "tie", "tie(bothbad)": "tie",
}
AMBIGUOUS_LABELS = ("0", "-1", "true", "false")

# Label maps by name, for benchmarks whose labels are bare numbers.
NAMED_LABEL_MAPS = {
    "autoj": {"0": "A", "1": "B", "2": "tie"},  # Auto-J pairwise: 0 = first, 1 = second, 2 = tie
    "pandalm": {"0": "tie", "1": "A", "2": "B"},  # PandaLM annotators: 0 = tie
}
# Annotator votes without a label_map: the default table plus PandaLM's 0 = tie, the
# convention of the one public benchmark with annotator1..3 columns.
DEFAULT_VOTE_MAP = {**DEFAULT_LABEL_MAP, "0": "tie"}

# The annotators preset: votes in annotator1, annotator2, ... (or annotator_1, ...);
# question and answers under the first of these column names that the row has.
ANNOTATOR_COLUMN = re.compile(r"annotator_?(\d+)", re.IGNORECASE)
ANNOTATOR_QUESTIONS = ("question", "instruction", "prompt", "input")
ANNOTATOR_ANSWERS = (("answer_a", "answer_b"), ("response1", "response2"), ("response_1", "response_2"),
                     ("response_a", "response_b"), ("output_1", "output_2"))
ANNOTATOR_IDS = ("id", "pair_id", "idx", "question_id")
ANNOTATOR_SUBSETS = ("subset", "category", "motivation_app")

# chosen/rejected data has the better answer in a fixed column; a judge trained on it
# as-is would learn "A is always better". The slot comes from a hash of the pair id, so
# it is the same on every run and machine. Changing the seed reshuffles every pair.
SLOT_SEED = "conj-lite-slot-v1"

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
JSON_LIST_KEYS = ("data", "rows", "examples")


@dataclass(frozen=True)
class PreferencePair:
    """One question, two answers, and which answer people preferred."""

    id: str
    question: str
    answer_a: str
    answer_b: str
    label: str  # "A" | "B" | "tie"; "A" = answer_a is better
    source: str | None = None
    subset: str | None = None

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadResult:
    pairs: list[PreferencePair]  # ties included
    n_rejected: int
    rejects_path: Path | None  # set only when rows were rejected and written there
    preset: str | None = None  # the preset used ("fields" for an explicit mapping)
    fields: dict | None = None  # role -> column(s) for "fields" and "detected" layouts
    label_values: dict | None = None  # each label value seen (as compared) -> "A"/"B"/"tie"
    label_map_used: str = "default"  # "default" table or "label_map" (the caller's)
    n_converted: int = 0  # number/boolean values converted to text
    n_empty_answers: int = 0  # answers that are empty text (kept: a legitimate case)

    def describe(self) -> str:
        """One line that says how the file was read: layout, columns, label mapping,
        and what was converted or kept empty (for the run's and the report's log)."""
        layout = self.preset or "?"
        if self.fields:
            columns = ", ".join(
                f"{role}={'+'.join(col) if isinstance(col, (list, tuple)) else col}" for role, col in self.fields.items()
            )
            layout += f" ({columns})"
        text = f"layout {layout}"
        if self.label_values:
            mapping = ", ".join(f"{key}->{value}" for key, value in sorted(self.label_values.items()))
            text += f"; labels {mapping} ({'your label_map' if self.label_map_used == 'label_map' else 'default table'})"
        if self.n_converted:
            text += f"; {self.n_converted} number/boolean values converted to text"
        if self.n_empty_answers:
            text += f"; {self.n_empty_answers} empty answers kept"
        return text

    @property
    def n_ties(self) -> int:
        return sum(pair.label == "tie" for pair in self.pairs)

    def trainable(self) -> list[PreferencePair]:
        """The pairs with a winner; ties teach a pairwise judge nothing to prefer."""
        return [pair for pair in self.pairs if pair.label != "tie"]


# ---------------------------------------------------------------------------
# Pure core: labels, presets, one row -> one record
# ---------------------------------------------------------------------------


def _label_key(value: object) -> str:
    """Comparable text of a label: 2.0 -> "2", " A > B " -> "a>b"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # Parquet/pandas turn int columns with nulls into floats
    return "".join(str(value).split()).lower()


class AmbiguousLabelError(InputError):
    """A label whose meaning depends on the dataset (0/1/2). It is a problem of the whole
    file, not of one row, so load_pairs stops on it even with skip_invalid: rejecting
    the 0 rows and reading 1/2 by the default table could silently swap A and B."""


def normalize_label(value: object, label_map: dict | None = None) -> str:
    """"A", "B" or "tie" for a label as datasets write it.

    Without label_map, DEFAULT_LABEL_MAP applies. A label_map replaces it entirely, so a
    forgotten value is an error rather than a silent default."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError("the label is empty")
    key = _label_key(value)
    if label_map is not None:
        table = {_label_key(k): v for k, v in label_map.items()}
        if key not in table:
            raise InputError(f"label {value!r} is not in label_map (its keys: {sorted(map(str, label_map))})")
        if table[key] not in LABELS:
            raise InputError(f"label_map maps {value!r} to {table[key]!r}; targets must be 'A', 'B' or 'tie'")
        return table[key]
    if key in DEFAULT_LABEL_MAP:
        return DEFAULT_LABEL_MAP[key]
    if key in AMBIGUOUS_LABELS:
        raise AmbiguousLabelError(
            f"label {value!r} is ambiguous (0/1/2 labels mean A/B/tie in some datasets, tie/A/B in others); "
            "pass a label map, e.g. label_map='0=A,1=B,2=tie' (autoj) or '0=tie,1=A,2=B' (pandalm) "
            "(--label-map on the command line, data.label_map in a recipe)"
        )
    raise InputError(
        f"unknown label {value!r}; expected 1/2, A/B, [[A]]/[[B]], A>B/B>A/A=B, tie/equal/draw, "
        "or pass a label map (label_map=) for other values"
    )


def detect_preset(keys: Iterable[str]) -> str | None:
    """The preset whose columns are all among `keys`, or None."""
    keys = set(keys)
    for name, fields in PRESET_FIELDS.items():
        if set(fields.values()) <= keys:
            return name
    if {"chosen", "rejected"} <= keys:
        return CHOSEN_REJECTED
    if annotator_columns(keys) and any(set(pair) <= keys for pair in ANNOTATOR_ANSWERS):
        return ANNOTATORS
    if detect_fields(keys) is not None:
        return DETECTED
    return None


def detect_fields(keys: Iterable[str]) -> dict | None:
    """The role -> column mapping of a common layout (see the module doc), or None when
    a question, an answer pair or a label column is missing. Several answer pairs
    (response_a/b and output_1/2, say) are ambiguous: InputError asking for fields=."""
    keys = [str(key) for key in keys]
    by_lower = {}
    for key in keys:
        by_lower.setdefault(key.lower(), key)
    question_key = next((name for name in QUESTION_COLUMNS if name in by_lower), None)
    label_key = next((name for name in LABEL_COLUMNS if name in by_lower), None)
    pairs = []
    for key in keys:
        match = ANSWER_COLUMN.fullmatch(key)
        if match and match.group(1) in ANSWER_PARTNER:
            partner = key[:-1] + ANSWER_PARTNER[match.group(1)]
            if partner in keys:
                pairs.append((key, partner))
    if question_key is None or label_key is None or not pairs:
        return None
    if len(pairs) > 1:
        raise InputError(
            f"the answers could be any of the column pairs {', '.join('/'.join(pair) for pair in pairs)}; "
            "say which with fields={'question': ..., 'a': ..., 'b': ..., 'label': ...} (--fields)"
        )
    question: str | list[str] = by_lower[question_key]
    if question_key == "instruction" and "input" in by_lower:
        question = [question, by_lower["input"]]
    return {"question": question, "a": pairs[0][0], "b": pairs[0][1], "label": by_lower[label_key]}


def annotator_columns(keys: Iterable[str]) -> list[str]:
    """The vote columns among `keys`, in annotator order: annotator1, annotator2, ..."""
    found = [(int(m.group(1)), key) for key in keys if (m := ANNOTATOR_COLUMN.fullmatch(str(key)))]
    return [key for _, key in sorted(found)]


def parse_label_map(value: object) -> dict | None:
    """A label map from a dict, a name in NAMED_LABEL_MAPS, or text "0=A,1=B,2=tie"."""
    if value is None or isinstance(value, dict):
        return value or None
    text = str(value).strip()
    if text.lower() in NAMED_LABEL_MAPS:
        return dict(NAMED_LABEL_MAPS[text.lower()])
    table = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, target = item.partition("=")
        if not sep or not key.strip() or not target.strip():
            raise InputError(
                f"label map {text!r}: expected value=label pairs such as '0=A,1=B,2=tie', "
                f"or one of {', '.join(NAMED_LABEL_MAPS)}"
            )
        table[key.strip()] = {"a": "A", "b": "B", "tie": "tie"}.get(target.strip().lower(), target.strip())
    if not table:
        raise InputError(f"label map {text!r} is empty")
    return table


def majority_label(votes: list[str]) -> str:
    """The label more than half of the votes give; "tie" when no label has that many
    (A, B, tie -> tie; A, A, B -> A; A, B -> tie)."""
    if not votes:
        raise InputError("no annotator votes")
    best = max(LABELS, key=votes.count)
    return best if votes.count(best) * 2 > len(votes) else "tie"


def _is_missing(value: object) -> bool:
    """None, NaN (pandas and PandaLM's JSON write missing values as NaN) or blank text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _vote_label(row: dict, columns: list[str], label_map: dict | None) -> str:
    """The majority vote of the annotator columns that hold a vote."""
    votes = []
    for column in columns:
        value = row.get(column)
        if _is_missing(value):
            continue
        try:
            if label_map is None and _label_key(value) == "0":
                votes.append(DEFAULT_VOTE_MAP["0"])
            else:
                votes.append(normalize_label(value, label_map))
        except InputError as exc:
            raise InputError(f"{column}: {exc}") from None
    if not votes:
        raise InputError(f"no annotator vote in {', '.join(columns)} (all empty)")
    return majority_label(votes)


def chosen_slot(pair_id: str, seed: str = SLOT_SEED) -> str:
    """"A" or "B": where the chosen answer goes, about half the pairs each."""
    digest = hashlib.sha256(f"{seed}:{pair_id}".encode("utf-8")).digest()
    return "A" if digest[0] % 2 == 0 else "B"


def record_from_row(
    row: dict,
    preset: str = "canonical",
    *,
    default_id: str,
    fields: dict | None = None,
    label_map: dict | None = None,
    notes: dict | None = None,
) -> PreferencePair:
    """One PreferencePair from one row, under a preset or an explicit `fields` mapping.

    `notes`, when given, receives "converted" (number/boolean values turned into text)
    and "label" ((label value as compared, label) for a single label column).
    Raises InputError (without a file location; the loader adds it)."""
    if fields is None and preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if fields is None and preset == CHOSEN_REJECTED:
        return _chosen_rejected_record(row, default_id, notes)
    if fields is None and preset == ANNOTATORS:
        return _annotators_record(row, default_id, label_map, notes)
    return _mapped_record(row, fields or PRESET_FIELDS[preset], default_id, label_map, notes)


def _mapped_record(row: dict, fields: dict, default_id: str, label_map: dict | None,
                   notes: dict | None = None) -> PreferencePair:
    label_field = fields["label"]
    votes = list(label_field) if isinstance(label_field, (list, tuple)) else None
    question_field = fields["question"]
    # A list of question columns (instruction + input) is joined; only the first must be there.
    extra = list(question_field[1:]) if isinstance(question_field, (list, tuple)) else []
    question_field = question_field[0] if isinstance(question_field, (list, tuple)) else question_field
    _require_keys(row, [question_field, fields["a"], fields["b"]] + (votes or [label_field]))
    if votes is not None:
        label = _vote_label(row, votes, label_map)
    else:
        label = normalize_label(row[label_field], label_map)
        if notes is not None:
            notes["label"] = (_label_key(row[label_field]), label)
    question = _text(row[question_field], question_field, notes)
    for column in extra:
        if not _is_missing(row.get(column)):
            question = f"{question}\n\n{_text(row[column], column, notes)}"
    return PreferencePair(
        id=_row_id(row, fields.get("id"), default_id),
        question=question,
        answer_a=_text(row[fields["a"]], fields["a"], notes, answer=True),
        answer_b=_text(row[fields["b"]], fields["b"], notes, answer=True),
        label=label,
        source=_optional_text(row.get(fields.get("source", "source"))),
        subset=_optional_text(row.get(fields.get("subset", "subset"))),
    )


def _annotators_record(row: dict, default_id: str, label_map: dict | None,
                       notes: dict | None = None) -> PreferencePair:
    columns = annotator_columns(row)
    answers = next((pair for pair in ANNOTATOR_ANSWERS if set(pair) <= set(row)), None)
    question_key = next((key for key in ANNOTATOR_QUESTIONS if key in row), None)
    if not columns or answers is None or question_key is None:
        raise InputError(
            "annotators layout: expected vote columns annotator1, annotator2, ..., a question "
            f"({' / '.join(ANNOTATOR_QUESTIONS)}) and two answers "
            f"({' / '.join('+'.join(pair) for pair in ANNOTATOR_ANSWERS)}); "
            f"keys found: {', '.join(sorted(map(str, row)))}"
        )
    question = _text(row[question_key], question_key, notes)
    # PandaLM: the task is the instruction plus its input (NaN when there is none).
    if question_key == "instruction" and not _is_missing(row.get("input")):
        question = f"{question}\n\n{_text(row['input'], 'input', notes)}"
    subset = next((row[key] for key in ANNOTATOR_SUBSETS if not _is_missing(row.get(key))), None)
    pair_id = next((str(row[key]).strip() for key in ANNOTATOR_IDS if not _is_missing(row.get(key))), default_id)
    return PreferencePair(
        id=pair_id,
        question=question,
        answer_a=_text(row[answers[0]], answers[0], notes, answer=True),
        answer_b=_text(row[answers[1]], answers[1], notes, answer=True),
        label=_vote_label(row, columns, label_map),
        source=_optional_text(None if _is_missing(row.get("source")) else row.get("source")),
        subset=_optional_text(subset),
    )


def _chosen_rejected_record(row: dict, default_id: str, notes: dict | None = None) -> PreferencePair:
    _require_keys(row, ["chosen", "rejected"])
    if row.get("prompt") is None:
        # HH-style: the prompt is the conversation before the last assistant turn, and
        # chosen and rejected must share it (a few Anthropic HH rows do not: their
        # transcripts part earlier, so neither final answer replies to the other's context).
        question, chosen = _split_conversation(row["chosen"], "chosen", notes)
        other, rejected = _split_conversation(row["rejected"], "rejected", notes)
        if other != question:
            raise InputError(
                "chosen and rejected differ before their last assistant turn; expected one "
                "conversation with two different final answers"
            )
    else:
        question = _prompt_text(row["prompt"], notes)
        chosen = _final_answer(row["chosen"], "chosen", notes)
        rejected = _final_answer(row["rejected"], "rejected", notes)
    pair_id = _row_id(row, None, default_id)
    slot = chosen_slot(pair_id)
    answer_a, answer_b = (chosen, rejected) if slot == "A" else (rejected, chosen)
    return PreferencePair(
        id=pair_id,
        question=question,
        answer_a=answer_a,
        answer_b=answer_b,
        label=slot,
        source=_optional_text(row.get("source")),
        subset=_optional_text(row.get("subset")),
    )


def _require_keys(row: dict, keys: list[str]) -> None:
    missing = [key for key in keys if key not in row]
    if missing:
        raise InputError(
            f"missing field {', '.join(map(repr, missing))}; expected {', '.join(keys)}; "
            f"keys found: {', '.join(sorted(map(str, row))) or '(none)'}"
        )


def text_problem(value: str, *, answer: bool = False) -> str | None:
    """Why `value` cannot be judged as a question (or, `answer=True`, an answer), else None.
    The one rule of the loader, `conj-lite judge --question` and the judge service: a
    question holds more than whitespace (an answer may be empty), and no text holds a
    lone surrogate (a JSON escape such as "\\ud800", or undecodable bytes on a command
    line), which is no character: no tokenizer can encode it."""
    if not answer and not value.strip():
        return "is empty or only whitespace"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds a lone surrogate {ascii(value[exc.start])} at character {exc.start + 1}, which is not "
                "a character (half of a UTF-16 pair); write the character itself")
    return None


def _text(value: object, name: str, notes: dict | None = None, *, answer: bool = False) -> str:
    """Text of a field. A number or boolean becomes its JSON spelling (true, 4, 0.5) and
    is counted in notes["converted"]; an answer may be empty, a question may not (see
    `text_problem`)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise InputError(f"field {name!r} is null (missing); an empty {'answer' if answer else 'text'} is written \"\"")
    if isinstance(value, (bool, int, float)):
        value = json.dumps(value)
        if notes is not None:
            notes["converted"] = notes.get("converted", 0) + 1
    if not isinstance(value, str):
        raise InputError(f"field {name!r} must be text, got {type(value).__name__}")
    problem = text_problem(value, answer=answer)
    if problem:
        raise InputError(f"field {name!r} {problem}")
    return value


def _optional_text(value: object) -> str | None:
    if value is None or not str(value).strip():
        return None
    return str(value)


def _row_id(row: dict, id_field: str | None, default_id: str) -> str:
    """The row's own id if it has one, else the position-based default."""
    for key in (id_field,) if id_field else ID_KEYS:
        value = row.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return default_id


def _messages(value: object, name: str) -> list[dict]:
    is_chat = isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    if not is_chat or not value:
        raise InputError(f"field {name!r} must be text or a list of chat messages {{'role': ..., 'content': ...}}")
    return value


ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def _context_text(messages: list[dict], name: str, notes: dict | None = None) -> str:
    """The question a conversation asks: the one user message alone, or, when there is
    more (a system message, earlier turns), the whole conversation as "Role: text"
    paragraphs, so that a follow-up such as "yes, do that" keeps what it refers to."""
    if not any(message["role"] == "user" for message in messages):
        raise InputError(f"field {name!r} has no user message; roles found: {[m['role'] for m in messages]}")
    if len(messages) == 1:
        return _text(messages[0]["content"], f"{name} (user message)", notes)
    parts = []
    for message in messages:
        role = str(message["role"])
        content = _text(message["content"], f"{name} ({role} message)", notes, answer=True)
        parts.append(f"{ROLE_NAMES.get(role, role.title())}: {content}")
    return "\n\n".join(parts)


def _final_answer(value: object, name: str, notes: dict | None = None) -> str:
    """An answer: plain text, or the content of the final assistant message."""
    if isinstance(value, str):
        return _text(value, name, notes, answer=True)
    messages = _messages(value, name)
    if messages[-1]["role"] != "assistant":
        raise InputError(f"field {name!r} must end with an assistant message, ends with {messages[-1]['role']!r}")
    return _text(messages[-1]["content"], f"{name} (assistant message)", notes, answer=True)


def _prompt_text(value: object, notes: dict | None = None) -> str:
    """The question: plain text, or a chat prompt (see _context_text)."""
    if isinstance(value, str):
        return _text(value, "prompt", notes)
    return _context_text(_messages(value, "prompt"), "prompt", notes)


def _split_conversation(value: object, name: str, notes: dict | None = None) -> tuple[str, str]:
    """(question, answer) from a whole conversation: chat messages or an HH transcript."""
    if isinstance(value, str):
        return _split_hh_transcript(value, name)
    answer = _final_answer(value, name, notes)
    return _context_text(value[:-1], name, notes), answer


def _split_hh_transcript(text: str, name: str) -> tuple[str, str]:
    """Anthropic HH text: "\\n\\nHuman: q\\n\\nAssistant: a ..." -> (question, last a).

    The question is the one Human turn, or the transcript before the last Assistant
    turn when there are several turns (in harmless-base test, 1650 of 2312 rows)."""
    problem = text_problem(text, answer=True)
    if problem:
        raise InputError(f"field {name!r} {problem}")
    head, marker, answer = ("\n\n" + text.lstrip()).rpartition(HH_ASSISTANT)
    if not marker or HH_HUMAN not in head:
        raise InputError(
            f"field {name!r} is text but there is no 'prompt' column; expected chat messages or an "
            "HH-style transcript ('Human: ... Assistant: ...'), or add a prompt column"
        )
    if head.count(HH_HUMAN) == 1 and head.startswith(HH_HUMAN) and HH_ASSISTANT not in head:
        question = _text(head[len(HH_HUMAN):].strip(), f"{name} (Human turn)")
    else:
        question = _text(head.strip(), f"{name} (conversation before the last Assistant turn)")
    return question, answer.strip()


# ---------------------------------------------------------------------------
# Edge: reading files and datasets into raw rows
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RawRow:
    """One row as read, before it becomes a PreferencePair."""

    where: str  # message prefix: "path:LINE" or "path: row N"
    number: int  # the line or row number in `where` (the rejects file's "line")
    default_id: str  # f"{stem}-{index}", the id when the row has none
    row: dict | None  # None when the row could not be read
    raw: object  # the original text or value, for the rejects file
    problem: str | None = None  # why the row could not be read


def _decode_line(data: bytes, line_number: int) -> str:
    # utf-8-sig on the first line drops the byte-order mark that Windows tools add.
    return data.decode("utf-8-sig" if line_number == 1 else "utf-8")


def _utf8_problem(data: bytes, exc: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte {data[exc.start]:#04x} at column {exc.start + 1}); save the file as UTF-8"


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    index = 0
    with _open_bytes(path) as handle:
        for line_number, data in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                text = _decode_line(data, line_number).rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raw = data.decode("utf-8", "backslashreplace").rstrip("\r\n")
                yield RawRow(where, line_number, f"{_stem(path)}-{index}", None, raw, _utf8_problem(data, exc))
                index += 1
                continue
            if not text.strip():
                continue  # blank lines (a trailing one, say) are not rows
            row, problem = _parse_json_object(text)
            yield RawRow(where, line_number, f"{_stem(path)}-{index}", row, text, problem)
            index += 1


def _parse_json_object(text: str) -> tuple[dict | None, str | None]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({json_error(exc)}); each line must be one JSON object"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {type(value).__name__}"
    return value, None


def _read_json(path: Path) -> Iterator[RawRow]:
    with _open_bytes(path) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path}:{line}: {_utf8_problem(data, exc)}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({json_error(exc)})") from None
    yield from _object_rows(_json_list(path, value), str(path), _stem(path))


def _json_list(path: Path, value: object) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        for key in JSON_LIST_KEYS:
            if isinstance(value.get(key), list):
                return value[key]
        found = f"an object with keys {sorted(value)}"
    else:
        found = type(value).__name__
    raise InputError(
        f"{path}: expected a JSON list of objects, or an object with the list under "
        f"{', '.join(map(repr, JSON_LIST_KEYS))}; found {found}"
    )


def _object_rows(rows: Iterable, name: str, stem: str) -> Iterator[RawRow]:
    for index, row in enumerate(rows):
        problem = None if isinstance(row, dict) else f"expected an object, got {type(row).__name__}"
        yield RawRow(f"{name}: row {index}", index, f"{stem}-{index}", row if problem is None else None, row, problem)


def _read_csv(path: Path) -> Iterator[RawRow]:
    bad_lines: set[int] = set()

    def decoded_lines() -> Iterator[str]:
        # Decode line by line so that one bad byte costs one row, not the file.
        with _open_bytes(path) as handle:
            for line_number, data in enumerate(handle, start=1):
                try:
                    yield _decode_line(data, line_number)
                except UnicodeDecodeError:
                    bad_lines.add(line_number)
                    yield data.decode("utf-8", "replace")

    reader = csv.reader(decoded_lines())
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputError(f"{path}:1: not a valid CSV header ({exc})") from None
    if header is None:
        raise InputError(f"{path}: the file is empty; expected a header line with column names")
    if 1 in bad_lines:
        raise InputError(f"{path}:1: the header is not valid UTF-8; save the file as UTF-8")
    index = 0
    while True:
        first_line = reader.line_num + 1  # a quoted field may span several lines
        try:
            values = next(reader, None)
        except csv.Error as exc:
            raise InputError(f"{path}:{first_line}: not valid CSV ({exc})") from None
        if values is None:
            return
        if not values:
            continue  # a blank line
        row, problem = _csv_row(header, values)
        if bad_lines & set(range(first_line, reader.line_num + 1)):
            problem = "not valid UTF-8; save the file as UTF-8"
        yield RawRow(f"{path}:{first_line}", first_line, f"{_stem(path)}-{index}", row, row or values, problem)
        index += 1


def _csv_row(header: list[str], values: list[str]) -> tuple[dict | None, str | None]:
    if len(values) != len(header):
        return None, f"{len(values)} fields but the header has {len(header)} ({', '.join(header)})"
    return dict(zip(header, values)), None


def _read_parquet(path: Path) -> Iterator[RawRow]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    yield from _object_rows(table.to_pylist(), str(path), _stem(path))


def _import_datasets(name: str):
    try:
        import datasets
    except ImportError:
        raise InputError(f"{name}: loading this needs the 'datasets' package (pip install datasets)") from None
    return datasets


def _pick_split(dataset, split: str, name: str):
    """(dataset, is_dict): the `split` of a DatasetDict, or a plain Dataset as it is."""
    if not hasattr(dataset, "keys"):
        return dataset, False
    if split not in dataset:
        raise InputError(f"{name}: no split {split!r}; splits found: {', '.join(dataset.keys())}")
    return dataset[split], True


def _read_dataset_dir(path: Path, split: str) -> Iterator[RawRow]:
    datasets = _import_datasets(str(path))
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise InputError(
            f"{path}: a directory, but not one written by datasets' save_to_disk "
            "(no dataset_info.json or dataset_dict.json); pass a data file instead"
        ) from None
    dataset, is_dict = _pick_split(loaded, split, str(path))
    # Ids carry the split of a DatasetDict so that train and test ids never collide.
    stem = f"{path.name}-{split}" if is_dict else path.name
    yield from _object_rows(dataset, str(path), stem)


def _read_hub(name: str, split: str) -> Iterator[RawRow]:
    datasets = _import_datasets(name)
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub fails in many ways (offline, not found, bad split)
        raise InputError(
            f"{name}: not a local file or directory, and loading it as a Hugging Face dataset "
            f"(split {split!r}) failed: {type(exc).__name__}: {exc}. If you are offline or the "
            "name is wrong, pass a local .json/.jsonl/.parquet/.csv file or save_to_disk directory"
        ) from None
    yield from _object_rows(dataset, f"{name}[{split}]", f"{name.split('/')[-1]}-{split}")


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
           ".jsonl.gz": _read_jsonl, ".json.gz": _read_json, ".csv.gz": _read_csv}


def _suffix(path: Path) -> str:
    """The file type: ".jsonl", or ".jsonl.gz" for a gzip-compressed one."""
    suffixes = [suffix.lower() for suffix in path.suffixes[-2:]]
    return "".join(suffixes) if suffixes[-1:] == [".gz"] else path.suffix.lower()


def _stem(path: Path) -> str:
    """The name without its type: "harmless-base-test" for harmless-base-test.jsonl.gz."""
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix and path.name.lower().endswith(suffix) else path.stem


def _open_bytes(path: Path):
    """The file for reading bytes, decompressed when it ends with .gz."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def _looks_like_path(text: str) -> bool:
    """Whether a missing `source` was meant as a file (so: "no such file", not a hub lookup)."""
    return (
        _suffix(Path(text)) in READERS
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1  # hub names are "name" or "owner/name"
    )


def _gzip_checked(path: Path, rows: Iterator[RawRow]) -> Iterator[RawRow]:
    """The rows of a .gz file; a file that is not gzip, or ends early (a cut download),
    is an InputError naming it, after the rows read before the damage."""
    line = 0
    try:
        for raw in rows:
            line = raw.number
            yield raw
    except EOFError:
        after = f" after line {line}" if line else ""
        raise InputError(f"{path}: the gzip data ends early{after}: the file is cut off; download or copy it "
                         "again") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{path}: not a readable gzip file ({exc}); a .gz name needs gzip-compressed data") from None


def _open_rows(source: str | Path, split: str) -> Iterator[RawRow]:
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_dataset_dir(path, split)
    if path.is_file():
        reader = READERS.get(_suffix(path))
        if reader is None:
            raise InputError(
                f"{path}: unsupported file type {_suffix(path)!r}; expected "
                f"{', '.join(READERS)} or a save_to_disk directory"
            )
        return _gzip_checked(path, reader(path)) if _suffix(path).endswith(".gz") else reader(path)
    if isinstance(source, Path) or _looks_like_path(str(source)):
        raise InputError(f"{source}: no such file or directory")
    return _read_hub(str(source), split)


def default_rejects_path(source: str | Path) -> Path:
    """Where rejected rows go by default: next to the data, never the working dir."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.with_name(f"{_stem(path)}.rejects.jsonl")
    if path.is_dir():
        return path.parent / f"{path.name}.rejects.jsonl"
    raise InputError(
        f"{source}: with skip_invalid=True, pass rejects_path= for a Hugging Face dataset "
        "(there is no local file to put the rejects next to)"
    )


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _check_options(preset: str, fields: dict | None, label_map: dict | None, limit: int | None) -> None:
    if preset == FIELDS and fields is None:
        raise InputError("preset 'fields' needs a field mapping: fields={'question': ..., 'a': ..., 'b': ..., 'label': ...}")
    if preset not in ("auto", FIELDS) and preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; known: auto, {', '.join(PRESETS)}")
    if fields is not None:
        if preset not in ("auto", FIELDS):
            raise InputError("pass either preset= or fields=, not both")
        missing = [role for role in REQUIRED_ROLES if role not in fields]
        unknown = sorted(set(fields) - set(REQUIRED_ROLES) - set(OPTIONAL_ROLES))
        if missing or unknown:
            raise InputError(
                f"fields= needs the keys {', '.join(REQUIRED_ROLES)} (optional: {', '.join(OPTIONAL_ROLES)}); "
                f"missing: {missing or 'none'}; unknown: {unknown or 'none'}"
            )
    if label_map is not None:
        bad = {key: value for key, value in label_map.items() if value not in LABELS}
        if bad:
            raise InputError(f"label_map values must be 'A', 'B' or 'tie'; got {bad}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive integer, got {limit!r}")


def _detect_or_raise(raw: RawRow) -> tuple[str, dict | None]:
    """(preset, fields): the layout of the first readable row; fields for "detected"."""
    try:
        preset = detect_preset(raw.row)
    except InputError as exc:
        raise InputError(f"{raw.where}: {exc}") from None
    if preset is None:
        raise InputError(
            f"{raw.where}: cannot tell the data layout from the keys {sorted(map(str, raw.row))}; expected "
            "canonical (question, answer_a, answer_b, label), llmbar (input, output_1, output_2, label), "
            "chosen_rejected (chosen, rejected, optional prompt), or a question (question / prompt / "
            "instruction / query), two answers (response_A/response_B, response1/response2, output_1/output_2, "
            "completion_a/completion_b, answer1/answer2, ...) and a label (label / winner / preference / "
            "choice). Pass preset= or fields={...}"
        )
    return preset, detect_fields(raw.row) if preset == DETECTED else None


def _write_rejects(rejects: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("w", encoding="utf-8") as handle:
            for reject in rejects:  # dumps_line: a rejected row's lone surrogate stays an escape
                handle.write(dumps_line(reject, default=str))
    except OSError as exc:
        raise no_space_error(path, exc) or exc from None
    return path


def load_pairs(
    source: str | Path,
    *,
    preset: str = "auto",
    fields: dict | None = None,
    label_map: dict | str | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    rejects_path: str | Path | None = None,
    limit: int | None = None,
) -> LoadResult:
    """Read preference pairs from a file, a save_to_disk directory or a hub dataset name.

    The first bad row raises InputError, unless skip_invalid=True: then each bad row is
    written to `rejects_path` (default: `<data>.rejects.jsonl` next to the data) as
    {"line", "reason", "raw"} and counted. An ambiguous label (0 without a label_map)
    stops the load even then. A source with no valid pair is always an error. Duplicate ids are an error naming both lines. `limit` keeps the first N
    valid pairs and stops reading there. Ties are kept; see LoadResult.trainable().
    `label_map` is a dict, "0=A,1=B,2=tie" or a name in NAMED_LABEL_MAPS."""
    label_map = parse_label_map(label_map)
    _check_options(preset, fields, label_map, limit)
    if skip_invalid and rejects_path is None:
        rejects_path = default_rejects_path(source)
    # The layout in use: "fields" for an explicit mapping, else a preset name, or None
    # until the first readable row tells which preset it is.
    if fields is not None:
        layout = "fields"
    else:
        layout = None if preset == "auto" else preset
    pairs: list[PreferencePair] = []
    rejects: list[dict] = []
    first_seen: dict[str, str] = {}
    label_values: dict[str, str] = {}
    n_converted = 0
    for raw in _open_rows(source, split):
        if layout is None and raw.row is not None:
            layout, detected = _detect_or_raise(raw)
            fields = detected or fields
        notes: dict = {}
        try:
            if raw.problem:
                raise InputError(raw.problem)
            pair = record_from_row(raw.row, layout, default_id=raw.default_id, fields=fields, label_map=label_map,
                                   notes=notes)
            first = first_seen.setdefault(pair.id, raw.where)
            if first != raw.where:
                raise InputError(f"duplicate id {pair.id!r}, first used at {first}")
        except AmbiguousLabelError as exc:
            # A file-wide question (what does 0 mean?): never skipped row by row.
            raise InputError(f"{raw.where}: {exc}") from None
        except InputError as exc:
            if not skip_invalid:
                raise InputError(f"{raw.where}: {exc}") from None
            rejects.append({"line": raw.number, "reason": str(exc), "raw": raw.raw})
            continue
        pairs.append(pair)
        n_converted += notes.get("converted", 0)
        if "label" in notes:
            label_values.setdefault(*notes["label"])
        if limit is not None and len(pairs) >= limit:
            break
    written = _write_rejects(rejects, Path(rejects_path)) if rejects else None
    if not pairs:
        detail = f"all {len(rejects)} rows were rejected (reasons in {written})" if rejects else "it has no rows"
        raise InputError(f"{source}: no valid preference pairs; {detail}")
    return LoadResult(
        pairs=pairs, n_rejected=len(rejects), rejects_path=written, preset=layout, fields=fields,
        label_values=label_values or None, label_map_used="label_map" if label_map is not None else "default",
        n_converted=n_converted,
        n_empty_answers=sum((not p.answer_a.strip()) + (not p.answer_b.strip()) for p in pairs),
    )


def write_pairs_jsonl(pairs: Iterable[PreferencePair], path: str | Path) -> Path:
    """Write pairs as canonical JSONL, one to_dict() per line; load_pairs reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n")
    return path


def heldout_split(pairs: list[PreferencePair], n: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs): the `n` labelled pairs whose ids hash lowest are
    held out, so the split does not depend on file order and mixes the file's subsets."""
    if n <= 0:
        return list(pairs), []
    labelled = [p for p in pairs if p.label in ("A", "B")]
    if n >= len(labelled):
        raise InputError(f"data.heldout={n}: the data has only {len(labelled)} labelled pairs; hold out fewer")
    rank = sorted(labelled, key=lambda p: hashlib.blake2b(p.id.encode("utf-8"), digest_size=8).digest())
    held = {id(p) for p in rank[:n]}
    return [p for p in pairs if id(p) not in held], [p for p in pairs if id(p) in held]
