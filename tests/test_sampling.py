"""Stage S1: the sampling plan, batching, the resumable judgments file, and real
batched generation on the tiny model, including a run killed mid-way and resumed."""

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from conj_lite.config import SamplingConfig
from conj_lite.data import PreferencePair, load_pairs
from conj_lite.errors import InputError
from conj_lite.filtering import read_judgment
from conj_lite.prompts import build_messages, hint_prefix, load_template, ordered_answers, render_prompt, true_slot
from conj_lite.engines import TransformersEngine
from conj_lite.sampling import (
    JudgmentFile,
    Request,
    judgment_key,
    make_batches,
    plan_requests,
    row_key,
    split_requests,
)

EN = load_template("en")
PAIRS = [
    PreferencePair("p1", "Capital of Australia?", "Canberra.", "Sydney.", "A"),
    PreferencePair("p2", "Author of Pride and Prejudice?", "Charlotte Brontë.", "Jane Austen.", "B"),
    PreferencePair("p3", "Pick a colour.", "Blue.", "Green.", "tie"),
    PreferencePair("p4", "2 + 2?", "5", "4", "B"),
]
ROW_FIELDS = {"id", "order", "kind", "sample", "hint_slot", "text", "verdict", "finish", "new_tokens"}


def keys_of(requests):
    return [r.key(i) for r in requests for i in r.samples]


# ---------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    "overrides, per_pair_order, orders",
    [
        ({}, {"repeat": 3, "hint_true": 2, "hint_reverse": 2}, ("ab", "ba")),
        ({"both_orders": False}, {"repeat": 3, "hint_true": 2, "hint_reverse": 2}, ("ab",)),
        ({"hints": False}, {"repeat": 3}, ("ab", "ba")),
        ({"hint_samples": 0}, {"repeat": 3}, ("ab", "ba")),
        ({"n_repeats": 0}, {"hint_true": 2, "hint_reverse": 2}, ("ab", "ba")),
        ({"n_repeats": 1, "hint_samples": 1, "both_orders": False, "hints": False}, {"repeat": 1}, ("ab",)),
    ],
)
def test_plan_counts(overrides, per_pair_order, orders):
    cfg = SamplingConfig(**{"n_repeats": 3, "hint_samples": 2, **overrides})
    requests = plan_requests(PAIRS, EN, cfg)
    labelled = [p.id for p in PAIRS if p.label != "tie"]
    assert len(requests) == len(labelled) * len(orders) * len(per_pair_order)
    samples = Counter()
    for r in requests:
        samples[(r.pair_id, r.order, r.kind)] += len(r.samples)
    assert samples == Counter(
        {(pid, order, kind): n for pid in labelled for order in orders for kind, n in per_pair_order.items()}
    )
    keys = keys_of(requests)
    assert len(keys) == len(set(keys)) == len(labelled) * len(orders) * sum(per_pair_order.values())
    assert {r.kind for r in requests} <= {"repeat", "hint_true", "hint_reverse"}


def test_plan_skips_ties():
    requests = plan_requests(PAIRS, EN, SamplingConfig())
    assert "p3" not in {r.pair_id for r in requests}
    assert plan_requests([PAIRS[2]], EN, SamplingConfig()) == []


def test_plan_hint_slots_prefixes_and_messages():
    requests = plan_requests(PAIRS, EN, SamplingConfig(n_repeats=2, hint_samples=1))
    by_id = {p.id: p for p in PAIRS}
    seen = set()
    for r in requests:
        pair = by_id[r.pair_id]
        right = true_slot(pair.label, r.order)
        expected_slot = {"repeat": None, "hint_true": right, "hint_reverse": 3 - right}[r.kind]
        assert r.hint_slot == expected_slot
        assert r.prefix == ("" if expected_slot is None else hint_prefix(EN, expected_slot))
        # the messages are the plain prompt in this order; the hint lives only in the prefix
        assert r.messages == build_messages(EN, pair.question, *ordered_answers(pair.answer_a, pair.answer_b, r.order))
        assert all("Hint" not in m["content"] for m in r.messages)
        seen.add((r.pair_id, r.order, r.kind, r.hint_slot))
    # spelled out for p1 (label A) and p2 (label B)
    assert {("p1", "ab", "hint_true", 1), ("p1", "ab", "hint_reverse", 2)} <= seen
    assert {("p1", "ba", "hint_true", 2), ("p1", "ba", "hint_reverse", 1)} <= seen
    assert {("p2", "ab", "hint_true", 2), ("p2", "ab", "hint_reverse", 1)} <= seen
    assert {("p2", "ba", "hint_true", 1), ("p2", "ba", "hint_reverse", 2)} <= seen


def test_plan_removes_done_keys_and_keeps_missing_samples():
    cfg = SamplingConfig(n_repeats=4, hint_samples=2)
    full = plan_requests(PAIRS, EN, cfg)
    all_keys = set(keys_of(full))
    done = {k for k in all_keys if k.startswith("p1|")}  # p1 complete
    done |= {judgment_key("p2", "ab", "repeat", 0), judgment_key("p2", "ab", "repeat", 2)}
    done |= {judgment_key("p2", "ba", "hint_true", 1)}
    done |= {judgment_key("p2", "ab", "repeat", 99), "unrelated|key"}  # stray keys are harmless
    requests = plan_requests(PAIRS, EN, cfg, done)
    assert "p1" not in {r.pair_id for r in requests}
    by = {(r.pair_id, r.order, r.kind): r for r in requests}
    assert by[("p2", "ab", "repeat")].samples == [1, 3]
    assert by[("p2", "ba", "hint_true")].samples == [0]
    assert by[("p2", "ba", "repeat")].samples == [0, 1, 2, 3]
    assert set(keys_of(requests)) == all_keys - done
    assert plan_requests(PAIRS, EN, cfg, all_keys) == []


def test_keys():
    assert judgment_key("p1", "ba", "hint_true", 3) == "p1|ba|hint_true|3"
    row = {"id": "p1", "order": "ba", "kind": "hint_true", "sample": 3}
    assert row_key(row) == judgment_key("p1", "ba", "hint_true", 3)


# ---------------------------------------------------------------- batches


def fake_requests(sample_counts):
    return [Request(f"p{i}", "ab", "repeat", None, list(range(n)), []) for i, n in enumerate(sample_counts)]


@pytest.mark.parametrize("max_sequences", [1, 2, 5, 8, 64])
def test_make_batches(max_sequences):
    rng = random.Random(max_sequences)
    counts = [rng.choice([1, 1, 2, 4]) for _ in range(40)]
    requests = fake_requests(counts)
    lengths = [rng.randint(10, 500) for _ in requests]
    batches = make_batches(requests, lengths, max_sequences)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(requests)))  # every request exactly once
    for batch in batches:
        assert batch
        n = {len(requests[i].samples) for i in batch}
        assert len(n) == 1  # one num_return_sequences per call
        if n.pop() <= max_sequences:
            assert sum(len(requests[i].samples) for i in batch) <= max_sequences
    # length-sorted within each sample count: neighbours have similar lengths
    keys = [(counts[i], lengths[i]) for i in flat]
    assert keys == sorted(keys)
    # and batches are full where they can be: only the last of each sample count is short
    for n in set(counts):
        sizes = [len(b) for b in batches if counts[b[0]] == n]
        per_call = max(1, max_sequences // n)
        assert all(size == per_call for size in sizes[:-1])


def test_make_batches_empty():
    assert make_batches([], [], 8) == [] == make_batches([], [], 8, by_example=True)


@pytest.mark.parametrize("max_sequences", [1, 3, 4, 6, 32])
def test_example_batches_keep_an_example_together(max_sequences):
    """by_example (the llama.cpp engine): an example's plain and hinted prompts go to one
    call, in plan order, mixed sample counts, within max_sequences; an example larger
    than a call is cut between its requests."""
    cfg = SamplingConfig(n_repeats=2, hint_samples=1)
    requests = split_requests(plan_requests(PAIRS, EN, cfg), max_sequences)
    batches = make_batches(requests, [0] * len(requests), max_sequences, by_example=True)
    assert [i for batch in batches for i in batch] == list(range(len(requests)))  # plan order, each once
    for batch in batches:
        assert sum(len(requests[i].samples) for i in batch) <= max_sequences
    example_of = [(r.pair_id, r.order) for r in requests]
    split = {e for e in set(example_of) if len({b for b, batch in enumerate(batches) for i in batch
                                                if example_of[i] == e}) > 1}
    assert (split == set()) == (max_sequences >= 4)  # 4 sequences per example: 2 repeats + 2 hints
    if max_sequences == 32:
        assert len(batches) == 1 and {len(requests[i].samples) for i in batches[0]} == {1, 2}


# ---------------------------------------------------------------- the judgments file


def rows_for(pair_id, n, start=0):
    return [
        {"id": pair_id, "order": "ab", "kind": "repeat", "sample": i, "hint_slot": None,
         "text": f'{{"rationale": "Réponse {i} — 好", "better_answer": 1}}', "verdict": 1, "finish": "stop", "new_tokens": 9}
        for i in range(start, start + n)
    ]


def test_judgment_file_round_trip(tmp_path):
    store = JudgmentFile(tmp_path / "j.jsonl")
    assert store.load() == []
    first, second = rows_for("a", 3), rows_for("b", 2)
    store.append(first)
    store.append(second)
    assert store.load() == first + second
    assert store.load() == first + second  # loading changes nothing
    assert store.path.read_text("utf-8").count("\n") == 5


@pytest.mark.parametrize(
    "tail",
    [b'{"id": "a", "order": "ab", "ki', "{\"id\": \"a\", \"text\": \"\xe5\xa5".encode("latin-1"), b"{", b"   "],
    ids=["half-json", "cut-inside-utf8", "one-brace", "spaces"],
)
def test_torn_last_line_is_dropped_and_cut(tmp_path, tail):
    store = JudgmentFile(tmp_path / "j.jsonl")
    rows = rows_for("a", 3)
    store.append(rows)
    good = store.path.read_bytes()
    with open(store.path, "ab") as f:
        f.write(tail)
    assert store.load() == rows
    assert store.path.read_bytes() == good  # the torn bytes are gone from the file
    more = rows_for("b", 2)
    store.append(more)  # appending after a cut gives clean lines
    assert store.load() == rows + more


def test_last_row_without_newline_is_not_lost(tmp_path):
    store = JudgmentFile(tmp_path / "j.jsonl")
    rows = rows_for("a", 3)
    store.path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps(rows[2]), "utf-8")
    loaded = store.load()
    on_disk = [json.loads(line) for line in store.path.read_text("utf-8").splitlines() if line.strip()]
    assert loaded == on_disk  # what counts as done is what the file holds


def test_corrupt_middle_line_names_path_and_line(tmp_path):
    store = JudgmentFile(tmp_path / "j.jsonl")
    rows = rows_for("a", 4)
    lines = [json.dumps(r) for r in rows]
    lines[1] = lines[1][:20]  # line 2 is broken, lines 3 and 4 are fine
    store.path.write_text("\n".join(lines) + "\n", "utf-8")
    before = store.path.read_bytes()
    with pytest.raises(InputError) as info:
        store.load()
    assert str(info.value).startswith(f"{store.path}:2:")
    assert store.path.read_bytes() == before  # nothing is cut when the file is corrupt


# ---------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from conj_lite.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def sample_pairs(sample_data):
    return load_pairs(sample_data).pairs


class GenerateSpy:
    """Wraps model.generate (the real one still runs) to see each call's inputs."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.calls = model, tokenizer, []
        self.original = model.generate

    def __call__(self, **kwargs):
        out = self.original(**kwargs)
        inputs = self.tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=False)
        self.calls.append({"inputs": inputs, "n": kwargs.get("num_return_sequences", 1), "sequences": out.shape[0]})
        return out

    def __enter__(self):
        self.model.generate = self
        return self

    def __exit__(self, *exc):
        del self.model.generate


@pytest.mark.slow
def test_generate_shapes_and_finish(tiny):
    from conj_lite.sampling import generate

    model, tokenizer = tiny
    messages = build_messages(EN, "What is 2 + 2?", "4", "Five, because two and two make five.")
    prompts = [render_prompt(tokenizer, messages), render_prompt(tokenizer, messages[-1:], hint_prefix(EN, 1))]
    cfg = SamplingConfig(max_new_tokens=12, repetition_penalty=1.0)
    out = generate(model, tokenizer, prompts, 3, cfg)
    assert len(out) == 2 and all(len(samples) == 3 for samples in out)
    for samples in out:
        for text, finish, n_tokens in samples:
            assert isinstance(text, str) and "<pad>" not in text and "<|im_end|>" not in text
            assert finish in ("stop", "length")
            assert 0 <= n_tokens <= 12
            if finish == "length":
                assert n_tokens == 12
    # a shorter override of max_new_tokens is honoured
    short = generate(model, tokenizer, prompts[:1], 1, cfg, max_new_tokens=3)
    assert short[0][0][2] <= 3


@pytest.mark.slow
def test_batched_greedy_matches_one_at_a_time(tiny):
    """Left padding is right: a prompt's greedy output is the same alone or in a batch
    with a much longer prompt."""
    from conj_lite.sampling import generate

    model, tokenizer = tiny
    short = render_prompt(tokenizer, build_messages(EN, "2 + 2?", "4", "5"))
    long = render_prompt(tokenizer, build_messages(EN, "Explain photosynthesis. " * 8, "Plants make sugar. " * 6, "No idea."))
    cfg = SamplingConfig(temperature=0.0, repetition_penalty=1.0, max_new_tokens=16)
    alone = generate(model, tokenizer, [short], 1, cfg)[0][0]
    batched = generate(model, tokenizer, [long, short], 1, cfg)[1][0]
    assert batched == alone


@pytest.mark.slow
def test_the_samples_of_a_prompt_share_one_evaluation_of_it(tiny):
    """generate evaluates each prompt once and copies its KV cache to its n samples: the
    same samples (framed, seeded, repetition penalty on) as the prompt repeated n times and
    evaluated n times, with the prompts evaluated in len(prompts) rows, not n times as many."""
    from conj_lite.frame import judgment_grammar
    from conj_lite.sampling import generate

    model, tokenizer = tiny
    prompts = [render_prompt(tokenizer, build_messages(EN, "2 + 2?", "4", "5")),
               render_prompt(tokenizer, build_messages(EN, "Explain photosynthesis. " * 4, "Plants make sugar.", "?"))]
    n = 3
    seeds, grammars = list(range(len(prompts) * n)), [judgment_grammar(EN, None)] * (len(prompts) * n)
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, repetition_penalty=1.2, max_new_tokens=16)
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        shared = generate(model, tokenizer, prompts, n, cfg, seeds=seeds, grammars=grammars)
    finally:
        hook.remove()
    repeated = generate(model, tokenizer, [p for p in prompts for _ in range(n)], 1, cfg, seeds=seeds, grammars=grammars)
    assert [s for samples in shared for s in samples] == [samples[0] for samples in repeated]
    longest = max(len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts)
    assert shapes[0] == (len(prompts), longest - 1)  # every prompt but its last token, once
    assert all(shape == (len(prompts) * n, 1) for shape in shapes[1:])  # then one token per sample


def planned_keys(pairs, cfg):
    return set(keys_of(plan_requests(pairs, EN, cfg)))


@pytest.mark.slow
def test_sample_judgments_rows_and_rerun(tiny, sample_pairs, tmp_path):
    from conj_lite.sampling import sample_judgments

    model, tokenizer = tiny
    pairs = sample_pairs[:3]
    assert all(p.label in ("A", "B") for p in pairs)
    cfg = SamplingConfig(n_repeats=2, max_new_tokens=24, batch_size=8, repetition_penalty=1.0)
    out = tmp_path / "judgments.jsonl"
    with GenerateSpy(model, tokenizer) as spy:
        summary = sample_judgments(TransformersEngine(model, tokenizer), pairs, EN, cfg, out)
    expected = len(pairs) * 2 * (2 + 1 + 1)  # pairs x orders x (repeats + true hint + reversed hint)
    assert (summary.total, summary.generated) == (expected, expected)
    assert summary.per_second > 0

    rows = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert len(rows) == expected
    keys = [row_key(r) for r in rows]
    assert len(set(keys)) == expected
    assert set(keys) == planned_keys(pairs, cfg)
    by_id = {p.id: p for p in pairs}
    for r in rows:
        assert set(r) == ROW_FIELDS
        assert r["finish"] in ("stop", "length") and 0 <= r["new_tokens"] <= 24
        assert r["verdict"] == read_judgment(r["text"], EN).slot
        right = true_slot(by_id[r["id"]].label, r["order"])
        assert r["hint_slot"] == {"repeat": None, "hint_true": right, "hint_reverse": 3 - right}[r["kind"]]
    # held to the judgment frame (the default format), every judgment has a verdict,
    # and hint-driven ones the hinted verdict
    assert all(r["verdict"] in (1, 2) for r in rows)
    assert all(r["verdict"] == r["hint_slot"] for r in rows if r["kind"] != "repeat")

    # every generate call stayed within batch_size and the hint reached the model input
    assert all(call["sequences"] <= cfg.batch_size for call in spy.calls)
    inputs = [text for call in spy.calls for text in call["inputs"]]
    hinted = [t for t in inputs if "(Hint: answer" in t]
    assert len(hinted) == len(pairs) * 2 * 2
    for text in hinted:
        assert text.rstrip().endswith("I explain why.)")
        assert text.rindex("<|im_start|>assistant") < text.index("(Hint: answer")
    assert len(inputs) - len(hinted) == len(pairs) * 2 * cfg.n_repeats  # one row per repeated sample

    # a re-run finds everything done and writes nothing
    before = out.read_bytes()
    again = sample_judgments(TransformersEngine(model, tokenizer), pairs, EN, cfg, out)
    assert (again.total, again.generated) == (expected, 0)
    assert out.read_bytes() == before

    # a partial file is completed: only the missing keys are generated
    lines = before.decode("utf-8").splitlines(keepends=True)
    kept = expected - 5
    out.write_text("".join(lines[:kept]), "utf-8")
    resumed = sample_judgments(TransformersEngine(model, tokenizer), pairs, EN, cfg, out)
    assert (resumed.total, resumed.generated) == (expected, 5)
    final = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert final[:kept] == rows[:kept]
    assert sorted(row_key(r) for r in final) == sorted(keys)


@pytest.mark.slow
def test_batch_size_below_n_repeats_is_respected(tiny, sample_pairs, tmp_path):
    from conj_lite.sampling import sample_judgments

    model, tokenizer = tiny
    cfg = SamplingConfig(n_repeats=4, hints=False, both_orders=False, batch_size=2, max_new_tokens=2)
    with GenerateSpy(model, tokenizer) as spy:
        summary = sample_judgments(TransformersEngine(model, tokenizer), sample_pairs[:1], EN, cfg, tmp_path / "j.jsonl")
    assert summary.generated == 4
    assert max(call["sequences"] for call in spy.calls) <= cfg.batch_size


KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from conj_lite.config import SamplingConfig
from conj_lite.data import load_pairs
from conj_lite.models import load_tokenizer
from conj_lite.prompts import load_template
from conj_lite.engines import TransformersEngine
from conj_lite.sampling import sample_judgments
model_dir, data, out, n_pairs = sys.argv[1:5]
tokenizer = load_tokenizer(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
pairs = load_pairs(data).pairs[: int(n_pairs)]
cfg = SamplingConfig(**__CFG__)
print("ready", flush=True)
sample_judgments(TransformersEngine(model, tokenizer), pairs, load_template("en"), cfg, out)
print("done", flush=True)
"""


@pytest.mark.slow
def test_killed_sampling_resumes_without_loss_or_duplicates(tiny, tiny_model_dir, sample_data, sample_pairs, tmp_path, repo_root):
    from conj_lite.sampling import sample_judgments

    n_pairs = 6
    cfg_args = {"n_repeats": 2, "hint_samples": 1, "max_new_tokens": 16, "batch_size": 2, "repetition_penalty": 1.0}
    cfg = SamplingConfig(**cfg_args)
    pairs = sample_pairs[:n_pairs]
    expected = planned_keys(pairs, cfg)
    labelled = sum(p.label != "tie" for p in pairs)
    assert labelled >= 4 and len(expected) == labelled * 2 * 4
    out = tmp_path / "judgments.jsonl"

    script = KILL_SCRIPT.replace("__CFG__", repr(cfg_args))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tiny_model_dir), str(sample_data), str(out), str(n_pairs)],
        cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:  # at least one batch is written
                break
            time.sleep(0.02)
        assert proc.poll() is None, "sampling finished (or died) before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    written = out.read_bytes()
    complete = written[: written.rfind(b"\n") + 1]
    before = [json.loads(line) for line in complete.decode("utf-8").splitlines()]
    assert 2 <= len(before) < len(expected)  # killed mid-way
    # simulate dying in the middle of the next write as well
    with open(out, "ab") as f:
        f.write(b'{"id": "' + pairs[-1].id.encode() + b'", "order": "ba", "kind": "rep')

    model, tokenizer = tiny
    summary = sample_judgments(TransformersEngine(model, tokenizer), pairs, EN, cfg, out)
    assert summary.total == len(expected)
    assert summary.generated == len(expected) - len(before)

    text = out.read_text("utf-8")
    assert text.endswith("\n")
    final = [json.loads(line) for line in text.splitlines()]
    keys = [row_key(r) for r in final]
    assert Counter(keys) == Counter(expected)  # each planned key exactly once
    assert final[: len(before)] == before  # what survived the kill is kept as it was
    assert all(set(r) == ROW_FIELDS for r in final)
    assert sample_judgments(TransformersEngine(model, tokenizer), pairs, EN, cfg, out).generated == 0


def test_plan_requests_leaves_out_skipped_examples():
    cfg = SamplingConfig(n_repeats=1, hint_samples=1)
    skip = {(PAIRS[0].id, "ba")}
    requests = plan_requests(PAIRS, EN, cfg, skip=skip)
    assert {(r.pair_id, r.order) for r in requests} == {(r.pair_id, r.order) for r in plan_requests(PAIRS, EN, cfg)} - skip


@pytest.mark.slow
def test_prompts_too_long_to_train_on_are_left_out_and_listed(tiny, sample_pairs, tmp_path):
    from conj_lite.sampling import load_too_long, sample_judgments

    model, tokenizer = tiny
    pairs = [p for p in sample_pairs if p.label in ("A", "B")][:4]

    def plain_length(pair, order):
        messages = build_messages(EN, pair.question, *ordered_answers(pair.answer_a, pair.answer_b, order))
        return len(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False).input_ids)

    lengths = sorted(plain_length(p, o) for p in pairs for o in ("ab", "ba"))
    limit = lengths[len(lengths) // 2]  # about half of the plain prompts fit; hinted ones are a little longer
    cfg = SamplingConfig(n_repeats=1, max_new_tokens=8, batch_size=8, repetition_penalty=1.0)
    out = tmp_path / "judgments.jsonl"
    summary = sample_judgments(TransformersEngine(model, tokenizer), pairs, EN, cfg, out, max_prompt_tokens=limit)
    skipped = load_too_long(out, limit)
    long_plain = {(p.id, o) for p in pairs for o in ("ab", "ba") if plain_length(p, o) > limit}
    assert long_plain <= skipped and summary.too_long == len(skipped) < 8
    rows = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert rows and all((r["id"], r["order"]) not in skipped for r in rows)
    # every example that was kept has all of its kinds (repeat, true hint, reversed hint)
    assert Counter((r["id"], r["order"]) for r in rows) == {k: 3 for k in {(r["id"], r["order"]) for r in rows}}
    # a rerun neither samples them nor counts them as missing
    again = sample_judgments(TransformersEngine(model, tokenizer), pairs, EN, cfg, out, max_prompt_tokens=limit)
    assert (again.generated, again.too_long) == (0, 0)
    # a higher limit brings the left-out examples back (the old list is not re-used unchecked)
    assert load_too_long(out, lengths[-1] + 64) == set()
    more = sample_judgments(TransformersEngine(model, tokenizer), pairs, EN, cfg, out, max_prompt_tokens=lengths[-1] + 64)
    assert more.too_long == 0 and more.generated == 3 * len(skipped)
    rows = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert skipped <= {(r["id"], r["order"]) for r in rows}


@pytest.mark.slow
def test_a_verdict_only_hint_sample_is_the_text_generation_would_write(tiny, sample_pairs, tmp_path):
    """Verdict-only, a hint-driven sample has its verdict fixed, so the frame allows one
    text: it is written without the model, and it is what held generation writes."""
    from dataclasses import replace

    from conj_lite.frame import forced_judgment, judgment_grammar
    from conj_lite.sampling import generate, sample_judgments

    model, tokenizer = tiny
    only = replace(EN, rationale=False)
    cfg = SamplingConfig(n_repeats=1, hint_samples=1, max_new_tokens=16, repetition_penalty=1.0)
    prompt = render_prompt(tokenizer, build_messages(only, "2 + 2?", "4", "5"), hint_prefix(only, 2))
    (generated,) = generate(model, tokenizer, [prompt], 1, cfg, grammars=[judgment_grammar(only, 2)])[0]
    assert generated[0] == forced_judgment(only, 2) == '{"better_answer": 2}'
    assert forced_judgment(EN, 2) is None and forced_judgment(only, None) is None
    with GenerateSpy(model, tokenizer) as spy:
        summary = sample_judgments(TransformersEngine(model, tokenizer), sample_pairs[:4], only, cfg, tmp_path / "j.jsonl")
    rows = JudgmentFile(tmp_path / "j.jsonl").load()
    hints = [r for r in rows if r["kind"] != "repeat"]
    assert hints and all(r["text"] == forced_judgment(only, r["hint_slot"]) and r["verdict"] == r["hint_slot"]
                         for r in hints)
    assert all(r["new_tokens"] == generated[2] for r in hints)
    assert summary.generated == len(rows)
    # only the repeats went through generate
    assert sum(call["sequences"] for call in spy.calls) == sum(r["kind"] == "repeat" for r in rows)
