"""conj_lite.data: every format, every preset, every way a file can be wrong.

Each test writes a real file in tmp_path (or reads a real shipped one); nothing touches
the network: the one hub test replaces datasets.load_dataset."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from conj_lite.data import (
    DEFAULT_LABEL_MAP,
    NAMED_LABEL_MAPS,
    LoadResult,
    PreferencePair,
    chosen_slot,
    detect_preset,
    load_pairs,
    majority_label,
    normalize_label,
    parse_label_map,
    record_from_row,
    write_pairs_jsonl,
)
from conj_lite.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLMBAR_NATURAL = SHARED / "data" / "llmbar" / "Dataset" / "LLMBar" / "Natural" / "dataset.json"
SAMPLE = REPO / "data" / "sample_prefs.jsonl"

CANONICAL_ROWS = [
    {"id": "q1", "question": "What is 2 + 2?", "answer_a": "4", "answer_b": "5", "label": "A"},
    {"id": "q2", "question": "Capital of France?", "answer_a": "Berlin.", "answer_b": "Paris.", "label": "B"},
    {"id": "q3", "question": "Say hi.", "answer_a": "Hi!", "answer_b": "Hello!", "label": "tie"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load_error(*args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        load_pairs(*args, **kwargs)
    return str(info.value)


def read_rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


# ---------------------------------------------------------------------------
# Label normalisation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (1, "A"), (2, "B"), ("1", "A"), ("2", "B"), (1.0, "A"), (2.0, "B"),
        ("A", "A"), ("B", "B"), ("a", "A"), ("b", "B"), (" A ", "A"),
        ("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"),
        ("A>B", "A"), ("B>A", "B"), ("A<B", "B"), ("a > b", "A"), ("A=B", "tie"),
        ("tie", "tie"), ("TIE", "tie"), ("equal", "tie"), ("draw", "tie"),
        ("model_a", "A"), ("model_b", "B"), ("tie (bothbad)", "tie"),
    ],
)
def test_normalize_label_default_table(value, expected):
    assert normalize_label(value) == expected


@pytest.mark.parametrize("value", [0, "0", -1, True, False])
def test_zero_one_style_labels_need_a_label_map(value):
    with pytest.raises(InputError, match="ambiguous.*label map"):
        normalize_label(value)


@pytest.mark.parametrize("value", ["C", "3", 3, "better", 1.5])
def test_unknown_label_lists_what_is_accepted(value):
    with pytest.raises(InputError, match="unknown label.*A>B.*label map"):
        normalize_label(value)


@pytest.mark.parametrize("value", [None, "", "   "])
def test_empty_label(value):
    with pytest.raises(InputError, match="empty"):
        normalize_label(value)


def test_label_map_replaces_the_default_table():
    label_map = {"0": "tie", "1": "A", "2": "B"}
    assert [normalize_label(v, label_map) for v in (0, "0", 1, "2", 2.0)] == ["tie", "tie", "A", "B", "B"]
    zero_one = {0: "A", 1: "B"}  # int keys work too; here 1 means B, unlike the default
    assert normalize_label("1", zero_one) == "B"
    with pytest.raises(InputError, match=r"'A>B' is not in label_map"):
        normalize_label("A>B", label_map)  # no fallback to the default table
    with pytest.raises(InputError, match="targets must be"):
        normalize_label("x", {"x": "first"})


def test_default_label_map_targets_are_labels():
    assert set(DEFAULT_LABEL_MAP.values()) == {"A", "B", "tie"}


# ---------------------------------------------------------------------------
# Pure helpers: presets, records, slots
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys, expected",
    [
        (["id", "question", "answer_a", "answer_b", "label", "subset"], "canonical"),
        (["input", "output_1", "output_2", "label"], "llmbar"),
        (["prompt", "chosen", "rejected"], "chosen_rejected"),
        (["chosen", "rejected"], "chosen_rejected"),
        (["question", "response_a", "response_b", "winner"], "detected"),
        (["question", "response_a", "winner"], None),
        (["text", "reply_a", "reply_b", "label"], None),
    ],
)
def test_detect_preset(keys, expected):
    assert detect_preset(keys) == expected


def test_record_from_row_llmbar():
    row = {"input": "Q?", "output_1": "one", "output_2": "two", "label": 2}
    assert record_from_row(row, "llmbar", default_id="f-0") == PreferencePair("f-0", "Q?", "one", "two", "B")


def test_record_from_row_keeps_own_id_subset_and_source():
    row = {"pair_id": 17, "question": "Q?", "answer_a": "x", "answer_b": "y", "label": "A",
           "subset": "math", "source": "mtbench"}
    pair = record_from_row(row, "canonical", default_id="f-0")
    assert (pair.id, pair.subset, pair.source) == ("17", "math", "mtbench")


def test_chosen_slot_is_deterministic_and_balanced():
    slots = [chosen_slot(f"pair-{i}") for i in range(1000)]
    assert slots == [chosen_slot(f"pair-{i}") for i in range(1000)]
    assert 450 <= slots.count("A") <= 550
    assert chosen_slot("pair-1", seed="other") in ("A", "B")


def test_chosen_rejected_label_follows_the_chosen_answer():
    for i in range(20):
        pair = record_from_row({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "chosen_rejected",
                               default_id=f"f-{i}")
        better = pair.answer_a if pair.label == "A" else pair.answer_b
        worse = pair.answer_b if pair.label == "A" else pair.answer_a
        assert (better, worse, pair.label) == ("good", "bad", chosen_slot(f"f-{i}"))


def test_preference_pair_rejects_bad_label():
    with pytest.raises(ValueError, match="label must be one of"):
        PreferencePair("x", "q", "a", "b", "1")


def test_load_result_counts_ties():
    pairs = [PreferencePair(str(i), "q", "a", "b", label) for i, label in enumerate(["A", "tie", "B", "tie"])]
    result = LoadResult(pairs=pairs, n_rejected=0, rejects_path=None)
    assert result.n_ties == 2
    assert [p.label for p in result.trainable()] == ["A", "B"]


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


def test_jsonl_canonical_with_tie(tmp_path):
    result = load_pairs(write_jsonl(tmp_path / "prefs.jsonl", CANONICAL_ROWS))
    assert result.preset == "canonical"
    assert [p.id for p in result.pairs] == ["q1", "q2", "q3"]
    assert [p.label for p in result.pairs] == ["A", "B", "tie"]
    assert result.pairs[1].answer_b == "Paris."
    assert (result.n_ties, len(result.trainable()), result.n_rejected, result.rejects_path) == (1, 2, 0, None)


def test_json_list_without_ids_gets_position_ids(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "id"} for row in CANONICAL_ROWS]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    result = load_pairs(path)
    assert [p.id for p in result.pairs] == ["mine-0", "mine-1", "mine-2"]
    assert result.pairs[0] == PreferencePair("mine-0", "What is 2 + 2?", "4", "5", "A")


@pytest.mark.parametrize("key", ["data", "rows", "examples"])
def test_json_object_with_list_under_a_key(tmp_path, key):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": 1, key: CANONICAL_ROWS}), encoding="utf-8")
    assert [p.label for p in load_pairs(path).pairs] == ["A", "B", "tie"]


def test_jsonl_with_bom_and_blank_lines(tmp_path):
    path = tmp_path / "bom.jsonl"
    text = "\n".join(json.dumps(r) for r in CANONICAL_ROWS[:2])
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\n\n").encode("utf-8") + b"\n\n")
    assert [p.id for p in load_pairs(path).pairs] == ["q1", "q2"]


def test_parquet_llmbar_layout(tmp_path):
    rows = [
        {"input": "Pick a color.", "output_1": "Blue.", "output_2": "Seven.", "label": 1},
        {"input": "2 * 3?", "output_1": "5", "output_2": "6", "label": 2},
    ]
    result = load_pairs(write_parquet(tmp_path / "bench.parquet", rows))
    assert result.preset == "llmbar"
    assert result.pairs == [
        PreferencePair("bench-0", "Pick a color.", "Blue.", "Seven.", "A"),
        PreferencePair("bench-1", "2 * 3?", "5", "6", "B"),
    ]


def test_csv_with_multiline_field_and_unicode(tmp_path):
    path = write_csv(
        tmp_path / "prefs.csv",
        ["question", "answer_a", "answer_b", "label", "subset"],
        [
            ["Write two lines.", "Line one\nLine two", "One line", "A>B", "format"],
            ["Café in French?", "Café", "Coffee shop ☕", "B", ""],
        ],
    )
    result = load_pairs(path)
    assert result.pairs[0].answer_a == "Line one\nLine two"
    assert [p.label for p in result.pairs] == ["A", "B"]
    assert result.pairs[1].answer_b == "Coffee shop ☕"
    assert [p.subset for p in result.pairs] == ["format", None]
    assert [p.id for p in result.pairs] == ["prefs-0", "prefs-1"]


def test_save_to_disk_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list(CANONICAL_ROWS).save_to_disk(str(tmp_path / "prefs_ds"))
    result = load_pairs(tmp_path / "prefs_ds")
    assert [(p.id, p.label) for p in result.pairs] == [("q1", "A"), ("q2", "B"), ("q3", "tie")]


def test_save_to_disk_dataset_dict_picks_split(tmp_path):
    import datasets

    rows = [{k: v for k, v in row.items() if k != "id"} for row in CANONICAL_ROWS]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                               "test": datasets.Dataset.from_list(rows[2:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [p.id for p in load_pairs(tmp_path / "dd").pairs] == ["dd-train-0", "dd-train-1"]
    test = load_pairs(tmp_path / "dd", split="test")
    assert [(p.id, p.label) for p in test.pairs] == [("dd-test-0", "tie")]
    message = load_error(tmp_path / "dd", split="validation")
    assert "no split 'validation'" in message and "train" in message and "test" in message


def test_hub_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "Q", "chosen": "yes", "rejected": "no"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_pairs("someone/prefs", split="test")
    assert calls == [("someone/prefs", "test")]
    assert result.pairs[0].id == "prefs-test-0"
    assert {result.pairs[0].answer_a, result.pairs[0].answer_b} == {"yes", "no"}


def test_hub_failure_says_offline(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = load_error("someone/prefs")
    assert message.startswith("someone/prefs: not a local file or directory")
    assert "offline" in message and "ConnectionError" in message


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------


def test_chosen_rejected_strings_keep_subset(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}", "subset": "s"}
            for i in range(40)]
    result = load_pairs(write_jsonl(tmp_path / "cr.jsonl", rows))
    assert result.preset == "chosen_rejected"
    for i, pair in enumerate(result.pairs):
        assert pair.question == f"Question {i}?" and pair.subset == "s"
        assert pair.label == chosen_slot(f"cr-{i}")
        assert {"A": pair.answer_a, "B": pair.answer_b}[pair.label] == f"good {i}"
    counts = Counter(p.label for p in result.pairs)
    assert counts["A"] >= 10 and counts["B"] >= 10  # both slots used, no position shortcut


def test_chosen_rejected_chat_messages_with_prompt(tmp_path):
    row = {
        "id": "c1",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
                   {"role": "assistant", "content": "Which size?"}, {"role": "user", "content": "Small."}],
        "chosen": [{"role": "assistant", "content": "3"}],
        "rejected": [{"role": "assistant", "content": "4"}],
    }
    pair = load_pairs(write_parquet(tmp_path / "chat.parquet", [row])).pairs[0]
    # The whole conversation is the question: "Small." alone would not say small what.
    assert pair.question == "System: Be brief.\n\nUser: Name a prime.\n\nAssistant: Which size?\n\nUser: Small."
    assert pair.id == "c1"
    assert {"A": pair.answer_a, "B": pair.answer_b}[pair.label] == "3"


def test_chosen_rejected_hh_messages_without_prompt(tmp_path):
    def convo(answer):
        return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is the boiling point of water?"},
                {"role": "assistant", "content": answer}]

    row = {"chosen": convo("100 °C at sea level."), "rejected": convo("50 °C.")}
    pair = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [row])).pairs[0]
    assert pair.question == "User: Hi\n\nAssistant: Hello!\n\nUser: What is the boiling point of water?"
    assert sorted([pair.answer_a, pair.answer_b]) == ["100 °C at sea level.", "50 °C."]
    assert {"A": pair.answer_a, "B": pair.answer_b}[pair.label] == "100 °C at sea level."


def test_chosen_rejected_hh_text_transcript(tmp_path):
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is 7 prime?\n\nAssistant: Yes, 7 is prime.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is 7 prime?\n\nAssistant: No.",
    }
    pair = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [row])).pairs[0]
    assert pair.question == "Human: Hi\n\nAssistant: Hello!\n\nHuman: Is 7 prime?"
    assert {"A": pair.answer_a, "B": pair.answer_b}[pair.label] == "Yes, 7 is prime."
    assert {pair.answer_a, pair.answer_b} == {"Yes, 7 is prime.", "No."}


def test_chosen_rejected_without_prompt_or_transcript_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "cr.jsonl", [{"chosen": "good", "rejected": "bad"}])
    message = load_error(path)
    assert message.startswith(f"{path}:1: ")
    assert "no 'prompt' column" in message


def test_chosen_rejected_chat_not_ending_with_assistant(tmp_path):
    row = {"prompt": "Q", "chosen": [{"role": "user", "content": "x"}], "rejected": "bad"}
    message = load_error(write_jsonl(tmp_path / "cr.jsonl", [row]))
    assert "must end with an assistant message" in message


def test_explicit_mapping_with_label_map(tmp_path):
    rows = [
        ["r1", "Best pet?", "A cat.", "A rock.", "1", "pets"],
        ["r2", "Sum of 2 and 2?", "5", "4", "2", "math"],
        ["r3", "Greet me.", "Hi.", "Hello.", "0", "chat"],
    ]
    path = write_csv(tmp_path / "custom.csv", ["uid", "prompt_text", "resp1", "resp2", "pref", "cat"], rows)
    result = load_pairs(
        path,
        fields={"question": "prompt_text", "a": "resp1", "b": "resp2", "label": "pref", "id": "uid", "subset": "cat"},
        label_map={"1": "A", "2": "B", "0": "tie"},
    )
    assert result.preset == "fields"
    assert [(p.id, p.label, p.subset) for p in result.pairs] == [("r1", "A", "pets"), ("r2", "B", "math"), ("r3", "tie", "chat")]
    assert result.n_ties == 1 and [p.id for p in result.trainable()] == ["r1", "r2"]
    assert result.pairs[1].answer_b == "4"


def test_explicit_mapping_zero_one_labels_in_json(tmp_path):
    rows = [{"q": "Q1", "x": "good", "y": "bad", "winner": 0}, {"q": "Q2", "x": "bad", "y": "good", "winner": 1}]
    path = tmp_path / "01.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    fields = {"question": "q", "a": "x", "b": "y", "label": "winner"}
    message = load_error(path, fields=fields)
    assert message.startswith(f"{path}: row 0: ") and "ambiguous" in message and "label_map" in message
    result = load_pairs(path, fields=fields, label_map={0: "A", 1: "B"})
    assert [p.label for p in result.pairs] == ["A", "B"]


def test_explicit_preset_name(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"input": "Q", "output_1": "a", "output_2": "b", "label": 1}])
    assert load_pairs(path, preset="llmbar").pairs[0].label == "A"
    message = load_error(path, preset="canonical")
    assert message.startswith(f"{path}:1: missing field 'question', 'answer_a', 'answer_b'")
    assert "keys found: input, label, output_1, output_2" in message


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"preset": "alpaca"}, "unknown preset 'alpaca'"),
        ({"preset": "llmbar", "fields": {"question": "q", "a": "a", "b": "b", "label": "l"}}, "either preset= or fields="),
        ({"fields": {"question": "q", "a": "a", "label": "l", "answer": "x"}}, "missing: ['b']; unknown: ['answer']"),
        ({"label_map": {"0": "first"}}, "label_map values must be"),
        ({"limit": 0}, "limit must be a positive integer"),
    ],
)
def test_bad_options(tmp_path, kwargs, expected):
    path = write_jsonl(tmp_path / "p.jsonl", CANONICAL_ROWS)
    assert expected in load_error(path, **kwargs)


# ---------------------------------------------------------------------------
# Real files
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not LLMBAR_NATURAL.is_file(), reason="shared LLMBar data not present")
def test_real_llmbar_natural():
    raw = json.loads(LLMBAR_NATURAL.read_text("utf-8"))
    result = load_pairs(LLMBAR_NATURAL)
    assert result.preset == "llmbar"
    assert len(result.pairs) == 100 and result.n_rejected == 0 and result.n_ties == 0
    labels = Counter(p.label for p in result.pairs)
    assert labels == Counter({"A": sum(r["label"] == 1 for r in raw), "B": sum(r["label"] == 2 for r in raw)})
    assert labels["A"] == 42 and labels["B"] == 58
    first = result.pairs[0]
    assert first.id == "dataset-0"
    assert first.question.startswith("Summarize the following content.")
    assert (first.answer_a, first.answer_b) == (raw[0]["output_1"], raw[0]["output_2"])
    assert first.label == "A"


LLMEVAL2 = SHARED / "data" / "llmbar" / "Dataset" / "Processed" / "LLMEval^2" / "dataset.json"


@pytest.mark.skipif(not LLMEVAL2.is_file(), reason="shared LLMBar data not present")
def test_real_llmeval2_keeps_its_one_empty_answer():
    # Real data is messy: row 169 of this file has an empty output_2, a legitimate
    # thing to judge (the other answer is better), so it is kept and counted.
    result = load_pairs(LLMEVAL2)
    assert (len(result.pairs), result.n_rejected, result.n_empty_answers) == (200, 0, 1)
    assert not result.pairs[169].answer_b.strip()
    assert "1 empty answers kept" in result.describe()


def test_shipped_sample_prefs():
    result = load_pairs(SAMPLE)
    assert result.preset == "canonical"
    assert len(result.pairs) == 40 and result.n_rejected == 0
    assert Counter(p.label for p in result.pairs) == Counter({"A": 19, "B": 19, "tie": 2})
    assert len({p.id for p in result.pairs}) == 40
    assert {p.subset for p in result.pairs} == {
        "factual", "arithmetic", "instruction_following", "coding", "safety", "summarization"}
    assert all(len(p.answer_a) < 300 and len(p.answer_b) < 300 for p in result.pairs)
    canberra = next(p for p in result.pairs if "Australia" in p.question)
    assert canberra.label == "A" and "Canberra" in canberra.answer_a


def test_write_pairs_jsonl_round_trips(tmp_path):
    original = load_pairs(SAMPLE).pairs + [PreferencePair("extra", "Q", "a", "b", "B", source="mine", subset=None)]
    path = write_pairs_jsonl(original, tmp_path / "out" / "pairs.jsonl")
    assert path.is_file()
    again = load_pairs(path, preset="canonical")
    assert again.pairs == original


def test_limit_takes_first_valid_pairs(tmp_path):
    rows = [dict(CANONICAL_ROWS[0], id="bad", question="  ")] + CANONICAL_ROWS
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    result = load_pairs(path, limit=2, skip_invalid=True)
    assert [p.id for p in result.pairs] == ["q1", "q2"]
    assert result.n_rejected == 1


# ---------------------------------------------------------------------------
# Bad input: message names the file and the right line or row
# ---------------------------------------------------------------------------

GOOD = json.dumps(CANONICAL_ROWS[0])


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"id": "x", "question": "Q", "answer_a": "a", "label": "A"}', "missing field 'answer_b'"),
        ('{"id": "x", "question": "   ", "answer_a": "a", "answer_b": "b", "label": "A"}', "field 'question' is empty"),
        ('{"id": "x", "question": "Q", "answer_a": "a", "answer_b": null, "label": "A"}', "field 'answer_b' is null"),
        ('{"id": "x", "question": "Q", "answer_a": [4], "answer_b": "b", "label": "A"}', "must be text, got list"),
        ('{"id": "x", "question": "Q", "answer_a": "a", "answer_b": "b", "label": "maybe"}', "unknown label 'maybe'"),
        ('{"id": "x", "question": "Q", "answer_a": "a", "answer_b": "b", "label": 0}', "ambiguous"),
        ('{"id": "x", "question": "Q", "answer_a": "a",', "not valid JSON"),
        ('["Q", "a", "b", "A"]', "expected a JSON object, got list"),
    ],
)
def test_jsonl_bad_row_names_file_and_line(tmp_path, bad_line, expected):
    path = tmp_path / "bad.jsonl"
    # line 1 good, line 2 blank, line 3 good, line 4 bad: blank lines still count as lines
    second = json.dumps(CANONICAL_ROWS[1])
    path.write_text(f"{GOOD}\n\n{second}\n{bad_line}\n", encoding="utf-8")
    message = load_error(path)
    assert message.startswith(f"{path}:4: ")
    assert expected in message


def test_jsonl_non_utf8_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    bad = json.dumps(dict(CANONICAL_ROWS[1], question="Caf\u00e9?"), ensure_ascii=False).encode("latin-1")
    path.write_bytes(GOOD.encode() + b"\n" + bad + b"\n")
    message = load_error(path)
    assert message.startswith(f"{path}:2: not valid UTF-8 (byte 0xe9")


def test_missing_field_lists_keys_found(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [CANONICAL_ROWS[0], {"id": "x", "question": "Q", "answer_a": "a", "answer_b": "b"}])
    message = load_error(path)
    assert message == (
        f"{path}:2: missing field 'label'; expected question, answer_a, answer_b, label; "
        "keys found: answer_a, answer_b, id, question"
    )


def test_unknown_layout_lists_keys(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "Q", "reply_a": "a", "reply_b": "b", "verdict": "A"}])
    message = load_error(path)
    assert message.startswith(f"{path}:1: cannot tell the data layout")
    assert "['reply_a', 'reply_b', 'text', 'verdict']" in message and "fields=" in message


def test_json_bad_row_names_row(tmp_path):
    rows = [CANONICAL_ROWS[0], CANONICAL_ROWS[1], dict(CANONICAL_ROWS[2], label="C")]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    message = load_error(path)
    assert message.startswith(f"{path}: row 2: unknown label 'C'")


def test_json_file_not_valid_json_names_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n  {"question": "Q",\n   "answer_a": "a" "answer_b": "b"}\n]\n', encoding="utf-8")
    message = load_error(path)
    assert message.startswith(f"{path}:3: not valid JSON")


def test_json_file_not_utf8_names_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b'[\n {"question": "Caf\xe9"}\n]\n')
    assert load_error(path).startswith(f"{path}:2: not valid UTF-8")


def test_json_wrong_top_level(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"items": CANONICAL_ROWS}), encoding="utf-8")
    message = load_error(path)
    assert message.startswith(f"{path}: expected a JSON list") and "['items']" in message


def test_csv_bad_row_reports_file_line(tmp_path):
    path = write_csv(
        tmp_path / "p.csv",
        ["question", "answer_a", "answer_b", "label"],
        [["Q1", "a\nmulti\nline", "b", "A"], ["   ", "a", "b", "B"]],
    )
    # header = line 1, first row spans lines 2-4, the bad row starts on line 5
    message = load_error(path)
    assert message.startswith(f"{path}:5: field 'question' is empty")


def test_csv_wrong_field_count(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("question,answer_a,answer_b,label\nQ,a,b,A\nQ2,a,B\n", encoding="utf-8")
    message = load_error(path)
    assert message.startswith(f"{path}:3: 3 fields but the header has 4")


def test_csv_non_utf8_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"question,answer_a,answer_b,label\nQ,a,b,A\nCaf\xe9,a,b,B\n")
    assert load_error(path).startswith(f"{path}:3: not valid UTF-8")
    result = load_pairs(path, skip_invalid=True)
    assert [p.question for p in result.pairs] == ["Q"] and result.n_rejected == 1
    assert read_rejects(result.rejects_path)[0]["line"] == 3


def test_parquet_bad_row_names_row(tmp_path):
    rows = [{"input": "Q", "output_1": "a", "output_2": "b", "label": 1},
            {"input": "Q2", "output_1": "a", "output_2": "b", "label": 7}]
    path = write_parquet(tmp_path / "p.parquet", rows)
    assert load_error(path).startswith(f"{path}: row 1: unknown label 7")


def test_duplicate_ids_name_both_lines(tmp_path):
    rows = [CANONICAL_ROWS[0], CANONICAL_ROWS[1], dict(CANONICAL_ROWS[2], id="q1")]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    message = load_error(path)
    assert message == f"{path}:3: duplicate id 'q1', first used at {path}:1"


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("prefs.txt", "hello", "unsupported file type '.txt'"),
        ("empty.jsonl", "\n\n", "no valid preference pairs; it has no rows"),
        ("empty.csv", "", "the file is empty"),
        ("empty.json", "[]", "no valid preference pairs; it has no rows"),
        ("junk.parquet", "not parquet", "not a readable Parquet file"),
    ],
)
def test_bad_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    message = load_error(path)
    assert message.startswith(str(path)) and expected in message


def test_missing_file_is_not_a_hub_lookup(tmp_path):
    assert load_error(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file or directory"
    assert load_error("data/missing.csv") == "data/missing.csv: no such file or directory"


def test_plain_directory_is_not_a_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    assert "not one written by datasets' save_to_disk" in load_error(tmp_path / "folder")


# ---------------------------------------------------------------------------
# skip_invalid: rejects file, counts, defaults
# ---------------------------------------------------------------------------


def test_skip_invalid_writes_rejects_with_reasons(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        GOOD,
        '{"id": "x1", "question": "Q", "answer_a": "a", "answer_b": "b", "label": "??"}',
        "not json",
        json.dumps(CANONICAL_ROWS[1]),
        json.dumps(dict(CANONICAL_ROWS[2], id="q1")),
        '{"id": "x2", "question": "", "answer_a": "a", "answer_b": "b", "label": "A"}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = load_pairs(path, skip_invalid=True)
    assert [p.id for p in result.pairs] == ["q1", "q2"]
    assert result.n_rejected == 4
    assert result.rejects_path == tmp_path / "mixed.rejects.jsonl"
    rejects = read_rejects(result.rejects_path)
    assert [r["line"] for r in rejects] == [2, 3, 5, 6]
    assert "unknown label '??'" in rejects[0]["reason"]
    assert "not valid JSON" in rejects[1]["reason"] and rejects[1]["raw"] == "not json"
    assert rejects[2]["reason"] == f"duplicate id 'q1', first used at {path}:1"
    assert "field 'question' is empty" in rejects[3]["reason"]
    assert json.loads(rejects[0]["raw"])["id"] == "x1"


def test_skip_invalid_custom_rejects_path_and_row_numbers(tmp_path):
    rows = [CANONICAL_ROWS[0], {"question": "Q"}, CANONICAL_ROWS[1]]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    target = tmp_path / "reports" / "bad.jsonl"
    result = load_pairs(path, skip_invalid=True, rejects_path=target)
    assert result.rejects_path == target and result.n_rejected == 1
    (reject,) = read_rejects(target)
    assert reject["line"] == 1 and reject["raw"] == {"question": "Q"}
    assert "missing field 'answer_a', 'answer_b', 'label'" in reject["reason"]


def test_skip_invalid_without_rejects_writes_nothing(tmp_path):
    path = write_jsonl(tmp_path / "clean.jsonl", CANONICAL_ROWS)
    result = load_pairs(path, skip_invalid=True)
    assert (result.n_rejected, result.rejects_path) == (0, None)
    assert not (tmp_path / "clean.rejects.jsonl").exists()


def test_all_rows_invalid_is_an_error_even_with_skip(tmp_path):
    path = write_jsonl(tmp_path / "allbad.jsonl", [dict(r, label="?") for r in CANONICAL_ROWS])
    message = load_error(path, skip_invalid=True)
    assert message.startswith(f"{path}: no valid preference pairs; all 3 rows were rejected")
    assert len(read_rejects(tmp_path / "allbad.rejects.jsonl")) == 3


def test_skip_invalid_for_hub_name_needs_rejects_path():
    message = load_error("someone/prefs", skip_invalid=True)
    assert "pass rejects_path=" in message


# ---------------------------------------------------------------------------
# Judge-benchmark shapes: annotator votes, 0/1/2 labels, RewardBench
# ---------------------------------------------------------------------------


def test_majority_label():
    assert majority_label(["A", "A", "B"]) == "A"
    assert majority_label(["B", "tie", "B"]) == "B"
    assert majority_label(["A", "B", "tie"]) == "tie"  # no majority
    assert majority_label(["A", "B"]) == "tie"
    assert majority_label(["tie", "tie", "A"]) == "tie"
    assert majority_label(["A"]) == "A"
    with pytest.raises(InputError):
        majority_label([])


def test_pandalm_annotators_json_with_nan_input(tmp_path):
    # PandaLM's testset-v1.json: votes 0 = tie, 1 = response1, 2 = response2; a missing
    # input is written as a bare NaN, which Python's json module reads.
    text = """[
      {"idx": 0, "motivation_app": "Grammarly", "instruction": "Rewrite the sentence.", "input": "It is raining cats.",
       "response1": "It rains hard.", "response2": "Cats.", "annotator1": 1, "annotator2": 1, "annotator3": 2},
      {"idx": 1, "motivation_app": "Google Search", "instruction": "Suggest a query.", "input": NaN,
       "response1": "how to code", "response2": "best coding language", "annotator1": 0, "annotator2": 1, "annotator3": 2},
      {"idx": 2, "motivation_app": "Google Search", "instruction": "Suggest a query.", "input": NaN,
       "response1": "a", "response2": "b", "annotator1": 2, "annotator2": 0, "annotator3": 2},
      {"idx": 3, "motivation_app": "Wikipedia", "instruction": "Translate.", "input": "Hello",
       "response1": "Bonjour", "response2": "Hallo", "annotator1": 0, "annotator2": 0, "annotator3": 1}
    ]"""
    path = tmp_path / "testset-v1.json"
    path.write_text(text, encoding="utf-8")
    result = load_pairs(path)
    assert result.preset == "annotators"
    assert [(p.id, p.label, p.subset) for p in result.pairs] == [
        ("0", "A", "Grammarly"), ("1", "tie", "Google Search"), ("2", "B", "Google Search"), ("3", "tie", "Wikipedia")]
    assert result.pairs[0].question == "Rewrite the sentence.\n\nIt is raining cats."
    assert result.pairs[1].question == "Suggest a query."  # NaN input: the instruction alone
    assert (result.pairs[0].answer_a, result.pairs[0].answer_b) == ("It rains hard.", "Cats.")
    assert result.n_ties == 2


def test_annotators_with_letter_votes_and_a_missing_vote(tmp_path):
    rows = [
        {"question": "Q1", "answer_a": "x", "answer_b": "y", "annotator_1": "A", "annotator_2": "B>A", "annotator_3": "A"},
        {"question": "Q2", "answer_a": "x", "answer_b": "y", "annotator_1": "B", "annotator_2": None, "annotator_3": "B"},
        {"question": "Q3", "answer_a": "x", "answer_b": "y", "annotator_1": "tie", "annotator_2": "A", "annotator_3": ""},
    ]
    result = load_pairs(write_jsonl(tmp_path / "votes.jsonl", rows))
    assert result.preset == "annotators" and [p.label for p in result.pairs] == ["A", "B", "tie"]


def test_annotator_vote_errors_name_the_column(tmp_path):
    row = {"question": "Q", "answer_a": "x", "answer_b": "y", "annotator1": 1, "annotator2": 7}
    assert "annotator2: unknown label 7" in load_error(write_jsonl(tmp_path / "v.jsonl", [row]))
    row = {"question": "Q", "answer_a": "x", "answer_b": "y", "annotator1": None, "annotator2": ""}
    message = load_error(write_jsonl(tmp_path / "w.jsonl", [row]))
    assert message.startswith(f"{tmp_path / 'w.jsonl'}:1: no annotator vote in annotator1, annotator2")
    # the PandaLM convention (0 = tie) is only the default: a label map replaces it
    row = {"question": "Q", "answer_a": "x", "answer_b": "y", "annotator1": 0, "annotator2": 0}
    assert load_pairs(write_jsonl(tmp_path / "m.jsonl", [row]), label_map="autoj").pairs[0].label == "A"


def test_fields_with_a_list_of_vote_columns(tmp_path):
    rows = [["1", "Q", "x", "y", "0", "1", "1"], ["2", "Q2", "x", "y", "2", "2", "0"]]
    path = write_csv(tmp_path / "votes.csv", ["uid", "q", "r1", "r2", "j1", "j2", "j3"], rows)
    fields = {"question": "q", "a": "r1", "b": "r2", "label": ["j1", "j2", "j3"], "id": "uid"}
    result = load_pairs(path, fields=fields, label_map={"0": "A", "1": "B", "2": "tie"})
    assert [(p.id, p.label) for p in result.pairs] == [("1", "B"), ("2", "tie")]
    assert "missing field 'j3'" in load_error(
        write_csv(tmp_path / "short.csv", ["q", "r1", "r2", "j1", "j2"], [["Q", "x", "y", "0", "1"]]), fields=fields,
        label_map="autoj")


@pytest.mark.parametrize("label_map", ["autoj", "0=A,1=B,2=tie", "0=a, 1=b, 2=Tie", {"0": "A", "1": "B", "2": "tie"}])
def test_zero_one_two_labels_with_two_as_tie(tmp_path, label_map):
    rows = [{"prompt": f"Q{i}", "response 1": "x", "response 2": "y", "label": i % 3} for i in range(6)]
    fields = {"question": "prompt", "a": "response 1", "b": "response 2", "label": "label"}
    result = load_pairs(write_jsonl(tmp_path / "autoj.jsonl", rows), fields=fields, label_map=label_map)
    assert [p.label for p in result.pairs] == ["A", "B", "tie"] * 2


def test_named_and_text_label_maps():
    assert parse_label_map("pandalm") == {"0": "tie", "1": "A", "2": "B"}
    assert parse_label_map("PandaLM") == NAMED_LABEL_MAPS["pandalm"]
    assert parse_label_map("yes=A, no=B") == {"yes": "A", "no": "B"}
    assert parse_label_map(None) is None and parse_label_map({}) is None
    for bad in ("0:A", "=A", "0="):
        with pytest.raises(InputError, match="label map"):
            parse_label_map(bad)
    with pytest.raises(InputError, match="label_map values must be"):
        load_pairs(SAMPLE, label_map="0=first")


def test_arrow_labels_in_csv(tmp_path):
    path = write_csv(tmp_path / "arrows.csv", ["question", "answer_a", "answer_b", "label"],
                     [["Q1", "x", "y", "A>B"], ["Q2", "x", "y", "B>A"], ["Q3", "x", "y", "A=B"]])
    assert [p.label for p in load_pairs(path).pairs] == ["A", "B", "tie"]


def test_rewardbench_rows_keep_subset_and_ids(tmp_path):
    # RewardBench (allenai/reward-bench, filtered split): prompt, chosen, chosen_model,
    # rejected, rejected_model, subset, id (an integer).
    rows = [{"prompt": f"Task {i}", "chosen": f"good {i}", "chosen_model": "m1", "rejected": f"bad {i}",
             "rejected_model": "m2", "subset": ["alpacaeval-easy", "refusals-dangerous"][i % 2], "id": 30 + i}
            for i in range(30)]
    result = load_pairs(write_parquet(tmp_path / "rb.parquet", rows))
    assert result.preset == "chosen_rejected"
    assert [p.id for p in result.pairs[:2]] == ["30", "31"]
    assert Counter(p.subset for p in result.pairs) == {"alpacaeval-easy": 15, "refusals-dangerous": 15}
    for pair in result.pairs:
        assert {"A": pair.answer_a, "B": pair.answer_b}[pair.label].startswith("good")
    assert {p.label for p in result.pairs} == {"A", "B"}


def test_preset_fields_is_accepted_with_a_mapping(tmp_path):
    # ConjRun passes preset="fields" together with data.fields
    rows = [{"q": "Q", "x": "a", "y": "b", "w": "B"}]
    fields = {"question": "q", "a": "x", "b": "y", "label": "w"}
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    assert load_pairs(path, preset="fields", fields=fields).pairs[0].label == "B"
    assert "needs a field mapping" in load_error(path, preset="fields")


# ---------------------------------------------------------------------------
# Real benchmark files (issue 11, items 14-15): empty and non-text answers, the
# column layouts public pairwise sets use, gzip-compressed JSONL, HH transcripts
# ---------------------------------------------------------------------------


def test_empty_answers_are_kept_and_counted(tmp_path):
    rows = [dict(CANONICAL_ROWS[0], answer_b=""), dict(CANONICAL_ROWS[1], answer_a="   "), CANONICAL_ROWS[2]]
    result = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.id for p in result.pairs] == ["q1", "q2", "q3"] and result.n_rejected == 0
    assert (result.pairs[0].answer_b, result.pairs[1].answer_a) == ("", "   ")
    assert result.n_empty_answers == 2 and "2 empty answers kept" in result.describe()


def test_numbers_and_booleans_become_text_and_are_counted(tmp_path):
    rows = [dict(CANONICAL_ROWS[0], answer_a=4, answer_b=5.5), dict(CANONICAL_ROWS[1], answer_b=True),
            dict(CANONICAL_ROWS[2], question=1914)]
    result = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    a, b, c = result.pairs
    assert (a.answer_a, a.answer_b, b.answer_b, c.question) == ("4", "5.5", "true", "1914")
    assert result.n_converted == 4 and "4 number/boolean values converted to text" in result.describe()


def test_truly_broken_rows_go_to_rejects(tmp_path):
    rows = [CANONICAL_ROWS[0], dict(CANONICAL_ROWS[1], answer_b=None), dict(CANONICAL_ROWS[2], answer_a={"x": 1})]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert load_error(path).startswith(f"{path}:2: field 'answer_b' is null")
    result = load_pairs(path, skip_invalid=True)
    assert [p.id for p in result.pairs] == ["q1"] and result.n_rejected == 2
    assert [r["line"] for r in read_rejects(result.rejects_path)] == [2, 3]


# One case per layout: (rows as a file holds them, file type, expected fields, labels seen)
LAYOUTS = {
    "response_A/B, prompt, winner A>B": (
        [{"prompt": "Q1", "response_A": "a1", "response_B": "b1", "winner": "A>B"},
         {"prompt": "Q2", "response_A": "a2", "response_B": "b2", "winner": "B>A"},
         {"prompt": "Q3", "response_A": "a3", "response_B": "b3", "winner": "A=B"}],
        "jsonl", {"question": "prompt", "a": "response_A", "b": "response_B", "label": "winner"},
        {"a>b": "A", "b>a": "B", "a=b": "tie"}),
    "Response 1/2 with a space, Question, Label 1/2 (CSV)": (
        [{"Question": "Q1", "Response 1": "a1", "Response 2": "b1", "Label": "1"},
         {"Question": "Q2", "Response 1": "a2", "Response 2": "b2", "Label": "2"},
         {"Question": "Q3", "Response 1": "a3", "Response 2": "b3", "Label": "tie"}],
        "csv", {"question": "Question", "a": "Response 1", "b": "Response 2", "label": "Label"},
        {"1": "A", "2": "B", "tie": "tie"}),
    "response1/2, instruction + input, label A/B/tie": (
        [{"instruction": "Q1", "input": "ctx", "response1": "a1", "response2": "b1", "label": "A"},
         {"instruction": "Q2", "input": "", "response1": "a2", "response2": "b2", "label": "B"},
         {"instruction": "Q3", "input": None, "response1": "a3", "response2": "b3", "label": "tie"}],
        "json", {"question": ["instruction", "input"], "a": "response1", "b": "response2", "label": "label"},
        {"a": "A", "b": "B", "tie": "tie"}),
    "output_1/2, query, preference 1/2 (Parquet)": (
        [{"query": "Q1", "output_1": "a1", "output_2": "b1", "preference": 1},
         {"query": "Q2", "output_1": "a2", "output_2": "b2", "preference": 2},
         {"query": "Q3", "output_1": "a3", "output_2": "b3", "preference": 1}],
        "parquet", {"question": "query", "a": "output_1", "b": "output_2", "label": "preference"},
        {"1": "A", "2": "B"}),
    "completion_a/b, prompt, label": (
        [{"prompt": "Q1", "completion_a": "a1", "completion_b": "b1", "label": "a"},
         {"prompt": "Q2", "completion_a": "a2", "completion_b": "b2", "label": "b"},
         {"prompt": "Q3", "completion_a": "a3", "completion_b": "b3", "label": "a"}],
        "jsonl", {"question": "prompt", "a": "completion_a", "b": "completion_b", "label": "label"},
        {"a": "A", "b": "B"}),
    "ANSWER1/ANSWER2 upper case, QUESTION, CHOICE": (
        [{"QUESTION": "Q1", "ANSWER1": "a1", "ANSWER2": "b1", "CHOICE": 2},
         {"QUESTION": "Q2", "ANSWER1": "a2", "ANSWER2": "b2", "CHOICE": 1},
         {"QUESTION": "Q3", "ANSWER1": "a3", "ANSWER2": "b3", "CHOICE": 2}],
        "jsonl", {"question": "QUESTION", "a": "ANSWER1", "b": "ANSWER2", "label": "CHOICE"},
        {"1": "A", "2": "B"}),
}


def write_rows(tmp_path: Path, rows: list[dict], kind: str) -> Path:
    path = tmp_path / f"bench.{kind}"
    if kind == "jsonl":
        return write_jsonl(path, rows)
    if kind == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
        return path
    if kind == "csv":
        return write_csv(path, list(rows[0]), [list(row.values()) for row in rows])
    return write_parquet(path, rows)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_common_layouts_are_detected_and_named(tmp_path, layout):
    rows, kind, fields, labels = LAYOUTS[layout]
    result = load_pairs(write_rows(tmp_path, rows, kind))
    assert result.preset == "detected" and result.fields == fields
    assert result.label_values == labels and result.label_map_used == "default"
    a_key, b_key, label_key = fields["a"], fields["b"], fields["label"]
    for row, pair in zip(rows, result.pairs):
        assert (pair.answer_a, pair.answer_b) == (row[a_key], row[b_key])
        assert pair.label == labels["".join(str(row[label_key]).split()).lower()]
    described = result.describe()
    assert described.startswith("layout detected (question=") and f"a={a_key}" in described
    assert "default table" in described
    if isinstance(fields["question"], list):  # instruction + input: the input follows when there is one
        assert [p.question for p in result.pairs] == ["Q1\n\nctx", "Q2", "Q3"]
    else:
        assert [p.question for p in result.pairs] == ["Q1", "Q2", "Q3"]


@pytest.mark.parametrize("label_map, expected", [("0=tie,1=A,2=B", ["tie", "A", "B"]),
                                                 ("autoj", ["A", "B", "tie"])])
def test_zero_one_two_labels_need_a_stated_map_even_with_skip_invalid(tmp_path, label_map, expected):
    rows = [{"prompt": f"Q{i}", "response_a": "x", "response_b": "y", "label": i} for i in (0, 1, 2)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    for kwargs in ({}, {"skip_invalid": True}):  # rejecting the 0 rows would read 1/2 by guess
        message = load_error(path, **kwargs)
        assert message.startswith(f"{path}:1: label 0 is ambiguous") and "label_map=" in message
    result = load_pairs(path, label_map=label_map)
    assert [p.label for p in result.pairs] == expected
    assert result.label_map_used == "label_map" and "your label_map" in result.describe()


def test_two_answer_column_pairs_ask_for_fields(tmp_path):
    row = {"prompt": "Q", "response_a": "x", "response_b": "y", "output_1": "x", "output_2": "y", "label": "A"}
    message = load_error(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert "response_a/response_b" in message and "output_1/output_2" in message and "fields=" in message


def test_jsonl_gz_is_read_like_jsonl(tmp_path):
    import gzip

    path = tmp_path / "prefs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in CANONICAL_ROWS) + '{"id": "bad"}\n')
    result = load_pairs(path, skip_invalid=True)
    assert [p.id for p in result.pairs] == ["q1", "q2", "q3"] and result.preset == "canonical"
    assert result.rejects_path == tmp_path / "prefs.rejects.jsonl"
    assert read_rejects(result.rejects_path)[0]["line"] == 4


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz", ".csv.gz"])
def test_a_cut_off_or_mislabelled_gz_file_is_an_error_naming_it(tmp_path, suffix):
    import gzip

    path = tmp_path / f"prefs{suffix}"
    rows = [{**CANONICAL_ROWS[0], "id": f"q{i}"} for i in range(300)]
    text = {".jsonl.gz": "".join(json.dumps(r) + "\n" for r in rows), ".json.gz": json.dumps(rows),
            ".csv.gz": "id,question,answer_a,answer_b,label\n" + "".join(
                f"{r['id']},{r['question']},{r['answer_a']},{r['answer_b']},{r['label']}\n" for r in rows)}[suffix]
    whole = gzip.compress(text.encode())
    path.write_bytes(whole[: len(whole) * 2 // 3])
    assert load_error(path).startswith(f"{path}: the gzip data ends early")
    path.write_bytes(text.encode())  # not compressed at all
    assert load_error(path).startswith(f"{path}: not a readable gzip file")


def test_a_lone_surrogate_escape_is_a_bad_row_naming_its_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(CANONICAL_ROWS[0]) + "\n" + json.dumps({**CANONICAL_ROWS[1], "answer_b": "x \udc80"})
                    + "\n" + json.dumps({"chosen": "\n\nHuman: Hi \ud800\n\nAssistant: yo", "rejected": "x"}) + "\n")
    message = load_error(path)
    assert message.startswith(f"{path}:2: field 'answer_b' holds a lone surrogate '\\udc80' at character 3")
    result = load_pairs(path, skip_invalid=True, preset="canonical")  # the rejects file is written whole
    assert [r["line"] for r in read_rejects(result.rejects_path)] == [2, 3]
    assert "\\udc80" in result.rejects_path.read_text("utf-8")


def test_json_errors_do_not_say_at_at(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "unterminated\n')
    message = load_error(path)
    assert "Unterminated string starting at column 14" in message and "at at" not in message


def test_hh_transcripts_must_share_the_conversation(tmp_path):
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is 7 prime?\n\nAssistant: Yes.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Is 7 prime?\n\nAssistant: No."}
    message = load_error(write_jsonl(tmp_path / "hh.jsonl", [row]))
    assert "chosen and rejected differ before their last assistant turn" in message


def test_hh_single_turn_and_empty_final_answer(tmp_path):
    row = {"chosen": "\n\nHuman: Say nothing.\n\nAssistant:", "rejected": "\n\nHuman: Say nothing.\n\nAssistant: Nothing!"}
    result = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [row]))
    pair = result.pairs[0]
    assert pair.question == "Say nothing."
    assert {"A": pair.answer_a, "B": pair.answer_b}[pair.label] == ""
    assert result.n_empty_answers == 1


HH_HARMLESS = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.mark.skipif(not HH_HARMLESS.is_file(), reason="shared HH-RLHF data not present")
def test_real_hh_rlhf_harmless_base(tmp_path):
    first = json.loads(__import__("gzip").open(HH_HARMLESS, "rt", encoding="utf-8").readline())
    result = load_pairs(HH_HARMLESS, skip_invalid=True, rejects_path=tmp_path / "rejects.jsonl")
    assert result.preset == "chosen_rejected"
    # 5 rows whose chosen and rejected transcripts part before the final turn; 4 empty chosen answers
    assert (len(result.pairs), result.n_rejected, result.n_empty_answers) == (2307, 5, 4)
    assert [r["line"] for r in read_rejects(result.rejects_path)] == [1255, 1689, 1951, 1953, 2037]
    pair = result.pairs[0]
    assert pair.id == "harmless-base-test-0"
    # A multi-turn conversation keeps its context: the last Human turn alone would not say what "yep" is.
    assert pair.question.startswith("Human: what are some pranks with a pen i can do?\n\nAssistant:")
    assert pair.question.endswith("Human: okay some of these do not have anything to do with pens")
    chosen = {"A": pair.answer_a, "B": pair.answer_b}[pair.label]
    assert chosen == first["chosen"].rpartition("\n\nAssistant:")[2].strip()
    assert Counter(p.label for p in result.pairs)["A"] > 1000  # both slots used
