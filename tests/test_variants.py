"""The recipe variants: each one really does what it says.

Unit tests for the pure parts (variant overrides, the warm-up set, position
swapping, loss terms), then each variant run through `ConjRun` on the tiny model for
a few steps, checking what it produced: the warm-up's loss is SFT-only, round 2
samples from the round-1 adapter, the no-hint ablation has no hint judgments, the
verdict-only targets hold no rationale, and so on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conj_lite.config import load_recipe
from conj_lite.data import PreferencePair
from conj_lite.errors import InputError
from conj_lite.filtering import build_pairs, read_judgment
from conj_lite.config import FilterConfig
from conj_lite.parsing import format_judgment
from conj_lite.prompts import load_template
from conj_lite.training import loss_terms
from conj_lite.variants import VARIANTS, variant_overrides
from conj_lite.warmup import (
    read_warmup_file,
    slot_word,
    swap_slots,
    warmup_from_judgments,
    warmup_stats,
)

EN = load_template("en")
ZH = load_template("zh")


# ---------------------------------------------------------------- pure parts


def test_every_variant_is_a_valid_recipe_and_unknown_names_fail():
    for name in VARIANTS:
        load_recipe(None, list(variant_overrides(name)))
    assert variant_overrides(None) == ()
    assert load_recipe(None, list(variant_overrides("rise"))).warmup.enabled
    assert load_recipe(None, list(variant_overrides("iterative"))).rounds == 2
    with pytest.raises(InputError, match="--variant 'dpo-only'"):
        variant_overrides("dpo-only")


@pytest.mark.parametrize("override, match", [
    ("rounds=-1", "rounds"),
    ("training.objective=kto", "training.objective"),
    ("warmup.source=judgments.csv", "warmup.source"),
    ("warmup.max_examples=0", "warmup.max_examples"),
])
def test_bad_variant_switches_are_input_errors(override, match):
    with pytest.raises(InputError, match=match):
        load_recipe(None, [override])


def test_loss_terms():
    assert loss_terms("dpo+sft", 0.5) == (["sigmoid", "sft"], [1.0, 0.5])
    assert loss_terms("dpo", 0.5) == (["sigmoid"], [1.0])
    assert loss_terms("sft", 0.5) == (["sft"], [1.0])  # the shared-prompt step's SFT alone
    with pytest.raises(ValueError):
        loss_terms("rise", 1.0)


def test_swap_slots_exchanges_answer_numbers_in_any_case():
    assert slot_word(EN) == "answer" and slot_word(ZH) == "回答"
    text = "Answer 1 is wrong; answer 2 restates the fact. ANSWER 1 also rambles. Answer 12 is not a slot."
    assert swap_slots(text, EN) == (
        "Answer 2 is wrong; answer 1 restates the fact. ANSWER 2 also rambles. Answer 12 is not a slot.")
    assert swap_slots(swap_slots(text, EN), EN) == text
    assert swap_slots("回答1更准确，回答2有误。", ZH) == "回答2更准确，回答1有误。"


@pytest.mark.parametrize("text, swapped", [
    ("The first answer is right; the second one is wrong.", "The second answer is right; the first one is wrong."),
    ("First response: fine. SECOND ANSWER: off.", "Second response: fine. FIRST ANSWER: off."),
    ("Response 1 is clearer than Response 2.", "Response 2 is clearer than Response 1."),
    ("response_1 beats response_2; Response1 too", "response_2 beats response_1; Response2 too"),
    ("Output (a) is correct, Output (b) is not.", "Output (b) is correct, Output (a) is not."),
    ("Assistant A answers; Assistant B refuses. Answer A's claim holds.",
     "Assistant B answers; Assistant A refuses. Answer B's claim holds."),
    ("Option 2 over option 1; completion B over completion A.", "Option 1 over option 2; completion A over completion B."),
])
def test_swap_slots_covers_the_common_ways_to_name_an_answer(text, swapped):
    assert swap_slots(text, EN) == swapped
    assert swap_slots(swapped, EN) == text  # symmetric: one pass, no double swap


@pytest.mark.parametrize("text", [
    "First, check the facts; second, the style.",  # ordinals that name no answer
    "It does answer a question and gives an answer 12 times.",  # "a" as an article, 12 not a slot
    "The first step is to read the answer carefully.",
])
def test_swap_slots_leaves_other_words_alone(text):
    assert swap_slots(text, EN) == text


def test_swap_slots_chinese_ordinals():
    text = "第一个回答更准确，第二个答案有误；答案1比回复2好。第一，看事实。"
    swapped = "第二个回答更准确，第一个答案有误；答案2比回复1好。第一，看事实。"
    assert swap_slots(text, ZH) == swapped and swap_slots(swapped, ZH) == text


def test_verdict_only_format():
    assert format_judgment(None, 2) == '{"better_answer": 2}'
    assert format_judgment(None, 1, verdict_key="更好的回答") == '{"更好的回答": 1}'
    assert read_judgment(format_judgment(None, 2), EN).slot == 2


PAIRS = [
    PreferencePair("p1", "Is 2 even?", "Yes, 2 is even.", "No, 2 is odd.", "A"),
    PreferencePair("p2", "Is 3 even?", "Yes, 3 is even.", "No, 3 is odd.", "B"),
]


def judgment_rows():
    def row(pid, order, kind, sample, slot, why):
        return {"id": pid, "order": order, "kind": kind, "sample": sample,
                "text": format_judgment(why, slot), **({"hint_slot": slot} if kind != "repeat" else {})}

    return [
        row("p1", "ab", "repeat", 0, 1, "Answer 1 states the fact."),   # positive
        row("p1", "ab", "repeat", 1, 2, "Answer 2 is shorter."),        # negative
        row("p1", "ba", "repeat", 0, 1, "Answer 1 sounds sure."),       # negative (p1's A is answer 2 in ba)
        row("p1", "ba", "hint_true", 0, 2, "Answer 2 is right."),  # positive
        row("p1", "ba", "hint_reverse", 0, 1, "Answer 1 is first."),   # negative, never a warm-up example
        row("p2", "ab", "repeat", 0, 2, "Answer 2 is right: 3 is odd."),  # positive
    ]


def test_warmup_from_positives_balances_positions():
    result = build_pairs(PAIRS, judgment_rows(), EN, FilterConfig())
    examples = warmup_from_judgments(PAIRS, result.labelled, EN)
    stats = warmup_stats(examples)
    # 3 positive judgments (2 repeat, 1 true hint), each also in the swapped order
    assert stats == {"examples": 6, "verdict_1": 3, "verdict_2": 3,
                     "by_source": {"hint_true": 1, "repeat": 2, "swapped": 3}}
    first = next(e for e in examples if e["id"] == "p1" and e["source"] == "repeat")
    swapped = next(e for e in examples if e["id"] == "p1" and e["source"] == "swapped" and e["order"] == "ba"
                   and "states" in e["completion"])
    assert json.loads(first["completion"]) == {"rationale": "Answer 1 states the fact.", "better_answer": 1}
    assert json.loads(swapped["completion"]) == {"rationale": "Answer 2 states the fact.", "better_answer": 2}
    # the swapped prompt shows the answers the other way round, without any hint
    assert swapped["prompt"][-1]["content"].index("No, 2 is odd.") < swapped["prompt"][-1]["content"].index(
        "Yes, 2 is even.")
    assert all("Hint" not in m["content"] for e in examples for m in e["prompt"])
    # every example is a right judgment of what its prompt shows
    for e in examples:
        pair = next(p for p in PAIRS if p.id == e["id"])
        right_text = pair.answer_a if pair.label == "A" else pair.answer_b
        user = e["prompt"][-1]["content"]
        shown_first = user.index(right_text) < user.index(pair.answer_b if pair.label == "A" else pair.answer_a)
        assert read_judgment(e["completion"], EN).slot == (1 if shown_first else 2)
    assert len(warmup_from_judgments(PAIRS, result.labelled, EN, swap_positions=False)) == 3
    # a judgment equal to another one's swapped copy (same prompt, same text) adds nothing, nor does its swap
    duplicate = [*judgment_rows(), {"id": "p1", "order": "ba", "kind": "hint_true", "sample": 1, "hint_slot": 2,
                                    "text": format_judgment("Answer 2 states the fact.", 2)}]
    again = build_pairs(PAIRS, duplicate, EN, FilterConfig())
    assert len(warmup_from_judgments(PAIRS, again.labelled, EN)) == 6
    capped = warmup_from_judgments(PAIRS, result.labelled, EN, max_examples=1)
    assert len(capped) == 2 and {e["slot"] for e in capped} == {1, 2}  # a judgment and its swap
    broken = [*judgment_rows(), {"id": "p2", "order": "ba", "kind": "repeat", "sample": 1,
                                 "text": '{"rationale":ider is right.", "x", "better_answer": 1}'}]
    with_broken = build_pairs(PAIRS, broken, EN, FilterConfig())
    assert with_broken.labelled[-1].status == "positive"  # positive, yet no demonstration
    assert len(warmup_from_judgments(PAIRS, with_broken.labelled, EN)) == 6
    verdicts = warmup_from_judgments(PAIRS, result.labelled, EN, rationale=False)
    assert {e["completion"] for e in verdicts} == {'{"better_answer": 1}', '{"better_answer": 2}'}


def test_read_warmup_file_shapes_and_errors(tmp_path):
    path = tmp_path / "judged.jsonl"
    rows = [
        {"question": "Is 2 even?", "answer_a": "Yes.", "answer_b": "No.",
         "judgment": '{"rationale": "Answer 1 is right.", "better_answer": 1}'},
        {"prompt": "Which is better, x or y?", "completion": '{"rationale": "x", "better_answer": 1}'},
        {"prompt": [{"role": "user", "content": "u"}], "chosen": [{"role": "assistant", "content": "Answer 2."}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    examples = read_warmup_file(path, EN)
    assert [e["source"] for e in examples] == ["file judgment", "swapped", "file", "file"]
    assert json.loads(examples[1]["completion"]) == {"rationale": "Answer 2 is right.", "better_answer": 2}
    assert examples[2]["prompt"] == [{"role": "user", "content": "Which is better, x or y?"}]
    assert examples[3]["completion"] == "Answer 2."

    bad = tmp_path / "bad.jsonl"
    for text, match in [
        ("{not json\n", "bad.jsonl:1: invalid JSON"),
        (json.dumps(rows[0]) + "\n" + json.dumps({"question": "q", "judgment": "x"}) + "\n", "bad.jsonl:2: .*answer_a"),
        (json.dumps({**rows[0], "judgment": "both are fine"}) + "\n", "bad.jsonl:1: no verdict"),
        (json.dumps({"text": "t"}) + "\n", "bad.jsonl:1: expected"),
        ("\n", "no warm-up judgments"),
    ]:
        bad.write_text(text)
        with pytest.raises(InputError, match=match):
            read_warmup_file(bad, EN)
    with pytest.raises(InputError, match="not found"):
        read_warmup_file(tmp_path / "missing.jsonl", EN)


# ---------------------------------------------------------------- each variant on the tiny model

FAST = ["data.limit=6", "sampling.n_repeats=2", "sampling.max_new_tokens=32", "export.enabled=false",
        "training.max_steps=2", "warmup.max_steps=2", "training.save_steps=100"]


def run_variant(tmp_path_factory, repo_root, name, *extra):
    from conj_lite.pipeline import ConjRun

    run = ConjRun.from_recipe(repo_root / "conj_lite" / "recipes" / "tiny-cpu.yaml", tmp_path_factory.mktemp(name),
                              [*variant_overrides(name), *FAST, *extra])
    run.run_all()
    return run


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def train_meta(adapter: Path) -> dict:
    return json.loads((adapter / "conj_lite_train.json").read_text())


def lora_weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def conj_run(tmp_path_factory, repo_root, tiny_model_dir):
    return run_variant(tmp_path_factory, repo_root, "conj")


@pytest.mark.slow
def test_rise_warms_up_with_sft_only_then_continues_from_it(tmp_path_factory, repo_root, tiny_model_dir):
    run = run_variant(tmp_path_factory, repo_root, "rise")
    out = run.out_dir
    warm = train_meta(out / "warmup" / "adapter")
    assert warm["objective"] == "sft" and warm["init_adapter"] is None
    assert warm["history"] and all("rewards/margins" not in h for h in warm["history"])  # no DPO term
    assert "token_accuracy" in warm["summary"]["after"]
    sft = read_jsonl(out / "warmup" / "sft.jsonl")
    assert sft and sum(e["slot"] == 1 for e in sft) == sum(e["slot"] == 2 for e in sft)  # positions swapped
    positives = sum(1 for e in sft if e["source"] != "swapped")
    assert positives == sum(1 for e in sft if e["source"] == "swapped")
    # stage 2 samples from the warmed-up model and continues its adapter with DPO + SFT
    assert json.loads((out / "sampled_from.json").read_text())["adapter"] == str(out / "warmup" / "adapter")
    stage2 = train_meta(out / "adapter")
    assert stage2["objective"] == "dpo+sft" and stage2["init_adapter"] == str(out / "warmup" / "adapter")
    assert "rewards/margins" in stage2["history"][0]
    assert [s["stage"] for s in json.loads((out / "rounds.json").read_text())] == ["warm-up", "round 1"]


@pytest.mark.slow
def test_rise_warmup_from_a_users_judgment_file(tmp_path_factory, repo_root, tiny_model_dir, tmp_path):
    path = tmp_path / "judged.jsonl"
    path.write_text(json.dumps({"question": "Is 2 even?", "answer_a": "Yes.", "answer_b": "No.",
                                "judgment": '{"rationale": "Answer 1 is right.", "better_answer": 1}'}) + "\n")
    run = run_variant(tmp_path_factory, repo_root, "conj", f"warmup.source={path}")
    out = run.out_dir
    assert not (out / "warmup" / "judgments.jsonl").exists()  # nothing sampled for the warm-up
    assert len(read_jsonl(out / "warmup" / "sft.jsonl")) == 2
    assert train_meta(out / "adapter")["init_adapter"] == str(out / "warmup" / "adapter")


@pytest.mark.slow
def test_iterative_round_2_samples_from_the_round_1_adapter(tmp_path_factory, repo_root, tiny_model_dir, conj_run):
    from conj_lite.pipeline import ConjRun
    from safetensors.torch import save_file
    import torch

    run = ConjRun.from_recipe(repo_root / "conj_lite" / "recipes" / "tiny-cpu.yaml", tmp_path_factory.mktemp("iter"),
                              [*variant_overrides("iterative"), *FAST])
    run.sample(1)
    run.filter(1)
    run.train(1)
    out, round1, round2 = run.out_dir, run.out_dir / "adapter", run.out_dir / "round-2" / "adapter"
    # Two training steps move the model too little to be sure any sample changes (whether
    # one does depends on the machine), so round 1's adapter is made one that surely
    # changes what the model writes: its lora_B weights drawn large. Round 2 must sample
    # from it: the same seeds on the base model would write round 1's texts again.
    weights = lora_weights(round1)
    draw = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=draw) if "lora_B" in k else v for k, v in weights.items()},
              str(round1 / "adapter_model.safetensors"))
    run.run_all()
    assert run.final_adapter() == round2
    assert json.loads((out / "round-2" / "sampled_from.json").read_text())["adapter"] == str(round1)
    assert train_meta(round2)["init_adapter"] == str(round1)
    # Sampling is deterministic (same seed, prompts and plan): round 1 samples exactly
    # like the one-round Con-J run; round 2, from the changed adapter, writes otherwise.
    first = {(r["id"], r["order"], r["kind"], r["sample"]): r["text"] for r in read_jsonl(out / "judgments.jsonl")}
    conj = {(r["id"], r["order"], r["kind"], r["sample"]): r["text"]
            for r in read_jsonl(conj_run.out_dir / "judgments.jsonl")}
    second = {(r["id"], r["order"], r["kind"], r["sample"]): r["text"]
              for r in read_jsonl(out / "round-2" / "judgments.jsonl")}
    assert first == conj and first.keys() == second.keys()
    assert any(first[k] != second[k] for k in first)
    # round 2 continued round 1's LoRA weights instead of starting from zero
    w1, w2 = lora_weights(round1), lora_weights(round2)
    assert w1.keys() == w2.keys()
    moved = max(float((w2[k] - w1[k]).abs().max()) for k in w1)
    assert 0 < moved < max(float(w1[k].abs().max()) for k in w1 if "lora_B" in k)
    stages = json.loads((out / "rounds.json").read_text())
    assert [s["stage"] for s in stages] == ["round 1", "round 2"] and all("stats" in s for s in stages)


@pytest.mark.slow
def test_no_hint_ablation_samples_no_hint_judgments(tmp_path_factory, repo_root, tiny_model_dir, conj_run):
    run = run_variant(tmp_path_factory, repo_root, "no_hint", "sampling.n_repeats=4")
    kinds = {r["kind"] for r in read_jsonl(run.out_dir / "judgments.jsonl")}
    assert kinds == {"repeat"}
    assert {r["kind"] for r in read_jsonl(conj_run.out_dir / "judgments.jsonl")} == {
        "repeat", "hint_true", "hint_reverse"}
    assert all(p["kind"] != "hint" for p in read_jsonl(run.out_dir / "pairs.jsonl"))


@pytest.mark.slow
def test_no_dpo_ablation_is_sft_on_the_chosen_judgments(tmp_path_factory, repo_root, tiny_model_dir):
    run = run_variant(tmp_path_factory, repo_root, "no_dpo")
    pairs = read_jsonl(run.out_dir / "pairs.jsonl")
    sft = read_jsonl(run.out_dir / "sft.jsonl")
    assert [(e["prompt"], e["completion"]) for e in sft] == [(p["prompt"], p["chosen"]) for p in pairs]
    meta = train_meta(run.out_dir / "adapter")
    assert meta["objective"] == "sft" and all("rewards/margins" not in h for h in meta["history"])


@pytest.mark.slow
def test_no_sft_ablation_trains_on_the_dpo_term_alone(tmp_path_factory, repo_root, tiny_model_dir, conj_run):
    import math

    run = run_variant(tmp_path_factory, repo_root, "no_sft")
    before = train_meta(run.out_dir / "adapter")["summary"]["before"]
    conj_before = train_meta(conj_run.out_dir / "adapter")["summary"]["before"]
    # Before training the policy is its reference: the DPO loss is log 2 exactly, and
    # only Con-J adds the SFT term (the chosen judgments' NLL) on top.
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert conj_before["loss"] > math.log(2) + 0.1


@pytest.mark.slow
def test_verdict_only_targets_hold_no_rationale(tmp_path_factory, repo_root, tiny_model_dir):
    run = run_variant(tmp_path_factory, repo_root, "verdict_only")
    pairs = read_jsonl(run.out_dir / "pairs.jsonl")
    assert pairs and {p["kind"] for p in pairs} <= {"repeat", "hint"}
    for p in pairs:
        for side in ("chosen", "rejected"):
            assert list(json.loads(p[side])) == ["better_answer"], p[side]
    # The adapter records the format it learned, and a judge opened on it reads it so:
    # the verdict right after `{"better_answer": `, never after a rationale key.
    from conj_lite.artifacts import describe_source
    from conj_lite.judging import Judge
    from conj_lite.judging.verdicts import judgment_grammar, verdict_prefix

    assert describe_source(run.final_adapter())["template"]["rationale"] is False
    with Judge.from_hf(run.final_adapter(), warn=None, max_new_tokens=16) as judge:
        assert judge.template.rationale is False
        assert verdict_prefix(judge.template) == '{"better_answer": '
        assert "rationale" not in judgment_grammar(judge.template)
        result = judge.compare("Is 2 even?", "Yes.", "No.", mode="verdict")
        assert result.verdict in ("A", "B", "inconsistent")


@pytest.mark.slow
def test_untrained_judge_samples_and_trains_nothing_and_exports_the_base(tmp_path_factory, repo_root,
                                                                         tiny_model_dir):
    from conj_lite.artifacts import read_gguf_metadata

    run = run_variant(tmp_path_factory, repo_root, "untrained", "export.enabled=true", "export.quant_types=[]")
    assert run.final_adapter() is None
    assert not (run.out_dir / "judgments.jsonl").exists() and not (run.out_dir / "adapter").exists()
    gguf = run.out_dir / "gguf" / "judge-f16.gguf"
    assert gguf.is_file() and read_gguf_metadata(gguf)


def test_cli_variant_and_round_errors(tmp_path, repo_root, capsys):
    from conj_lite.cli import main

    recipe = str(repo_root / "conj_lite" / "recipes" / "tiny-cpu.yaml")
    assert main(["run", recipe, "--out", str(tmp_path / "a"), "--variant", "bogus"]) == 2
    captured = capsys.readouterr()
    assert "--variant 'bogus'" in captured.err + captured.out
    assert main(["train", "--recipe", recipe, "--out", str(tmp_path / "b"), "--round", "2"]) == 2
    captured = capsys.readouterr()
    assert "rounds 1..1" in captured.err + captured.out
    assert main(["train", "--recipe", recipe, "--out", str(tmp_path / "b"), "--round", "3", "rounds=2"]) == 2
    assert main(["recipes"]) == 0
    out = capsys.readouterr()
    assert all(name in out.out + out.err for name in VARIANTS)


@pytest.mark.slow
def test_a_round_sampled_from_a_retrained_adapter_is_sampled_again(tmp_path_factory, repo_root,
                                                                   tiny_model_dir):
    """Issue 12: round 2's judgments record the digest of the adapter they were sampled
    from; a retrained round-1 adapter re-runs round 2's sampling (the old judgments kept
    in stale-<time>/round-2/), never a mix. A touched file with the same bytes is no change."""
    import os

    run = run_variant(tmp_path_factory, repo_root, "iterative")
    assert run.sample(2) is None  # complete and current: skipped
    meta = run.out_dir / "adapter" / "conj_lite_train.json"
    judgments = run.out_dir / "round-2" / "judgments.jsonl"
    later = judgments.stat().st_mtime + 10
    os.utime(meta, (later, later))  # the same bytes, a later time: still current
    assert run.sample(2) is None
    before = read_jsonl(judgments)
    record = json.loads(meta.read_text())
    record["retrained"] = True  # round 1 retrained after round 2 sampled: other bytes
    meta.write_text(json.dumps(record))
    assert run.sample(2) is not None
    [stale] = list(run.out_dir.glob("stale-*"))
    assert read_jsonl(stale / "round-2" / "judgments.jsonl") == before
    assert len(read_jsonl(judgments)) == len(before)


def test_training_files_name_the_bad_line(tmp_path):
    from conj_lite.training import SFT_FIELDS, read_pairs_file

    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": [], "completion": "c"}) + "\n\n" + json.dumps({"prompt": []}) + "\n")
    with pytest.raises(InputError, match=r"sft.jsonl:3: missing \['completion'\]"):
        read_pairs_file(path, SFT_FIELDS)
    path.write_text(json.dumps({"prompt": [], "completion": "c"}) + "\n[1, 2]\n")
    with pytest.raises(InputError, match="sft.jsonl:2: expected a JSON object"):
        read_pairs_file(path, SFT_FIELDS)
    with pytest.raises(InputError, match="not found"):
        read_pairs_file(tmp_path / "missing.jsonl")


def test_eval_subset_is_a_seeded_sample_capped_by_eval_pairs():
    """training.eval_pairs bounds the before/after measurement (it cost as much as the
    training itself on SmolLM2: 2 x 130 pairs through policy and reference)."""
    from datasets import Dataset

    from conj_lite.training import eval_subset

    rows = Dataset.from_dict({"i": list(range(200))})
    sample = eval_subset(rows, 64, seed=0)
    assert len(sample) == 64 and len(set(sample["i"])) == 64
    assert sample["i"] != list(range(64))  # not just the first rows (grouped by pair in pairs.jsonl)
    assert eval_subset(rows, 64, seed=0)["i"] == sample["i"] and eval_subset(rows, 64, seed=1)["i"] != sample["i"]
    assert len(eval_subset(rows, 500, seed=0)) == 200
    assert eval_subset(rows, 0, seed=0) is None
