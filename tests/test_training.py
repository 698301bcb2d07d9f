"""conj_lite.training: the order training visits its rows in, and what a step holds."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from conj_lite.config import find_recipe, load_recipe
from conj_lite.training import passes_needed, training_order


def rows(n_pairs: int, per_order: int = 1) -> list[dict]:
    return [{"id": f"p{i}", "order": order, "k": k} for i in range(n_pairs) for order in ("ab", "ba")
            for k in range(per_order)]


def test_every_step_of_two_rows_holds_both_orders_of_one_pair():
    data = rows(50)
    order = training_order(data, seed=0)
    assert sorted(order) == list(range(len(data)))  # each row once per pass
    for step in range(0, len(order), 2):
        a, b = (data[i] for i in order[step:step + 2])
        assert a["id"] == b["id"] and {a["order"], b["order"]} == {"ab", "ba"}


def test_steps_of_four_are_balanced_between_the_orders():
    data = rows(40)
    order = training_order(data, seed=1)
    for step in range(0, len(order), 4):
        assert Counter(data[i]["order"] for i in order[step:step + 4]) == {"ab": 2, "ba": 2}


def test_the_pairs_come_in_a_seeded_order_drawn_anew_each_pass():
    data = rows(30, per_order=2)
    one = training_order(data, seed=0, passes=2)
    assert one == training_order(data, seed=0, passes=2)
    assert one != training_order(data, seed=1, passes=2)
    first, second = one[: len(data)], one[len(data):]
    assert sorted(first) == sorted(second) == list(range(len(data))) and first != second
    # several rows of one order alternate with the other order's
    ids = [data[i]["id"] for i in first]
    start = ids.index(ids[0])
    assert [data[i]["order"] for i in first[start:start + 4]] == ["ab", "ba", "ab", "ba"]


def test_a_shuffle_would_not_hold_the_orders_together():
    # the failure mode the order exists for: a seeded plain shuffle leaves many steps one-sided
    import random

    data = rows(40)
    shuffled = list(range(len(data)))
    random.Random(0).shuffle(shuffled)
    one_sided = sum(len({data[i]["order"] for i in shuffled[s:s + 4]}) == 1 for s in range(0, len(data), 4))
    assert one_sided > 0


def test_passes_cover_max_steps():
    recipe = load_recipe(None, ["training.batch_size=4", "training.grad_accum=2", "training.max_steps=25"])
    assert passes_needed(100, recipe) == 2  # 200 rows for 25 steps of 8
    assert passes_needed(100, load_recipe(None, ["training.epochs=2.5"])) == 3
    assert passes_needed(100, load_recipe(None, [])) == 1


# ---------------------------------------------------------------- what a judgment trains


def verdict_only_rows(tokenizer, template, n: int = 2):
    from conj_lite.prompts import build_messages

    return [{"prompt": build_messages(template, f"Is {k} even?", "Yes.", "No."),
             "chosen": '{"better_answer": 1}', "rejected": '{"better_answer": 2}'} for k in range(n)]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from conj_lite.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_the_turn_ends_where_the_chat_template_ends_it(tiny_tokenizer):
    from conj_lite.training import turn_end

    end = turn_end(tiny_tokenizer)
    assert end.endswith(tiny_tokenizer.eos_token) or end.strip() == end
    reply = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "R"}], tokenize=False)
    assert "R" + end in reply


@pytest.mark.slow
def test_verdict_only_dpo_trains_the_verdict_in_the_context_the_judge_reads(tiny_model_dir, tiny_tokenizer, tmp_path):
    """TRL's own tokenization of the rows: the completion is the verdict and the turn's
    end, the prompt is token for token what the verdict-mode judge reads P(1) after."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from conj_lite.frame import verdict_prefix
    from conj_lite.prompts import check_chat_template, load_template, render_prompt
    from conj_lite.training import frame_rows

    template = replace(load_template("en"), rationale=False)
    check_chat_template(tiny_tokenizer, template)
    pairs = verdict_only_rows(tiny_tokenizer, template)
    rows = frame_rows(pairs, tiny_tokenizer, template, ("chosen", "rejected"))
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_length=1024),
                         train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    example = trainer.train_dataset[0]
    judged = render_prompt(tiny_tokenizer, pairs[0]["prompt"], verdict_prefix(template))
    assert example["prompt_ids"] == tiny_tokenizer(judged, add_special_tokens=False).input_ids
    one, two = (tiny_tokenizer("1", add_special_tokens=False).input_ids[-1],
                tiny_tokenizer("2", add_special_tokens=False).input_ids[-1])
    assert example["chosen_ids"][0] == one and example["rejected_ids"][0] == two
    assert example["chosen_ids"][1:] == example["rejected_ids"][1:]  # nothing else differs
    assert example["chosen_ids"][-1] == tiny_tokenizer.eos_token_id and len(example["chosen_ids"]) <= 4


def test_judgments_with_a_rationale_or_free_form_keep_chat_rows(tiny_tokenizer):
    """Only verdict-only judgments move the head into the prompt: with a rationale the
    judge writes the whole judgment (rationale mode), and the synthetic check learned far
    less (69% against 97.5% held-out) with the head in the prompt."""
    from conj_lite.prompts import check_chat_template, load_template
    from conj_lite.training import frame_rows

    template = load_template("en")
    check_chat_template(tiny_tokenizer, template)
    prompt = verdict_only_rows(tiny_tokenizer, template, 1)[0]["prompt"]
    framed = [{"prompt": prompt, "chosen": '{"rationale": "Yes.", "better_answer": 1}',
               "rejected": '{"rationale": "No.", "better_answer": 2}'}]
    assert frame_rows(framed, tiny_tokenizer, template, ("chosen", "rejected")) is None
    only = replace(template, rationale=False)
    free = [{"prompt": prompt, "chosen": '{"better_answer": 1}', "rejected": "I think answer 2."}]
    assert frame_rows(free, tiny_tokenizer, only, ("chosen", "rejected")) is None
    (row,) = frame_rows([{**free[0], "rejected": '{"better_answer": 2}'}], tiny_tokenizer, only, ("chosen", "rejected"))
    assert row["prompt"].endswith('{"better_answer": ') and row["chosen"].startswith("1}")


@pytest.mark.slow
def test_smollm2_rows_end_with_im_end(smollm2_dir):
    from conj_lite.models import load_tokenizer
    from conj_lite.prompts import check_chat_template, load_template
    from conj_lite.training import frame_rows, turn_end

    tokenizer = load_tokenizer(str(smollm2_dir))
    assert turn_end(tokenizer) == "<|im_end|>"
    template = replace(load_template("en"), rationale=False)
    check_chat_template(tokenizer, template)
    (row,) = frame_rows(verdict_only_rows(tokenizer, template, 1), tokenizer, template, ("chosen", "rejected"))
    assert row["prompt"].startswith("<|im_start|>system") and row["prompt"].endswith('<|im_start|>assistant\n{"better_answer": ')
    assert (row["chosen"], row["rejected"]) == ("1}<|im_end|>", "2}<|im_end|>")


def test_last_steps_mean_is_what_the_final_batches_said():
    from conj_lite.training import last_steps_mean

    history = [{"loss": 1.0 + i, "rewards/margins": 0.1 * i, "rewards/accuracies": 0.5, "step": i} for i in range(12)]
    history.insert(3, {"train_runtime": 5.0})  # TRL's closing entry has no loss
    got = last_steps_mean(history, "dpo+sft", n=4)
    assert got == pytest.approx({"loss": 10.5, "margin": 0.95, "accuracy": 0.5})
    assert last_steps_mean([{"loss": 2.0, "mean_token_accuracy": 0.25}], "sft") == {"loss": 2.0, "token_accuracy": 0.25}
    assert last_steps_mean([], "dpo") == {}


def test_the_shared_prompt_step_is_the_cpu_default_and_never_under_unsloth():
    from conj_lite.models import Runtime
    from conj_lite.training import uses_shared_prompt

    cpu = Runtime(device="cpu", dtype="bf16", load_in_4bit=False, use_unsloth=False)
    gpu = Runtime(device="cuda", dtype="bf16", load_in_4bit=True, use_unsloth=False)
    unsloth = Runtime(device="cuda", dtype="bf16", load_in_4bit=True, use_unsloth=True)
    default, on, off = (load_recipe(None, o) for o in ([], ["training.shared_prompt=true"],
                                                        ["training.shared_prompt=false"]))
    assert uses_shared_prompt(default, cpu) and not uses_shared_prompt(default, gpu)
    assert uses_shared_prompt(on, gpu) and not uses_shared_prompt(off, cpu)
    assert not uses_shared_prompt(on, unsloth)
    sft = load_recipe(None, ["training.objective=sft"])  # prompt | judgment, logits only at the judgment
    assert uses_shared_prompt(sft, cpu) and not uses_shared_prompt(sft, gpu)


def test_cpu_batches_are_padded_to_recurring_lengths_unless_the_recipe_says_otherwise():
    from conj_lite.models import Runtime
    from conj_lite.training import pad_multiple, trainer_config

    cpu = Runtime(device="cpu", dtype="bf16", load_in_4bit=False, use_unsloth=False)
    gpu = Runtime(device="cuda", dtype="bf16", load_in_4bit=True, use_unsloth=False)
    default = load_recipe(None, [])
    assert pad_multiple(default, cpu) == 64 and pad_multiple(default, gpu) is None
    assert pad_multiple(load_recipe(None, ["training.pad_to_multiple_of=8"]), gpu) == 8
    assert pad_multiple(load_recipe(None, ["training.pad_to_multiple_of=1"]), cpu) is None
    for objective in ("dpo+sft", "sft"):  # TRL's collators get it too
        recipe = load_recipe(None, [f"training.objective={objective}"])
        assert trainer_config(recipe, cpu, Path("unused"), False).pad_to_multiple_of == 64
    # objective sft: the shared-prompt step's DPOConfig (the sft loss alone) on the CPU, SFTTrainer's on CUDA
    sft = load_recipe(None, ["training.objective=sft"])
    on_cpu = trainer_config(sft, cpu, Path("unused"), False)
    assert type(on_cpu).__name__ == "DPOConfig" and on_cpu.loss_type == ["sft"]
    no_reference = load_recipe(None, ["training.objective=sft", "training.precompute_ref=true"])
    assert not trainer_config(no_reference, cpu, Path("unused"), False).precompute_ref_log_probs
    cuda_fp32 = Runtime(device="cuda", dtype="fp32", load_in_4bit=False, use_unsloth=False)
    assert type(trainer_config(sft, cuda_fp32, Path("unused"), False)).__name__ == "SFTConfig"


def test_the_frozen_base_trains_on_fp32_weights_unless_it_is_4bit():
    """bf16 base weights kept SmolLM2 on its plateau (docs/benchmarks.md, "bf16 kept the judge on its plateau"):
    the base is loaded in fp32 and autocast computes in bf16; a 4-bit base computes in
    the compute dtype anyway."""
    from conj_lite.models import Runtime
    from conj_lite.training import base_dtype

    cpu = Runtime(device="cpu", dtype="bf16", load_in_4bit=False, use_unsloth=False)
    gpu = Runtime(device="cuda", dtype="bf16", load_in_4bit=False, use_unsloth=False)
    t4 = Runtime(device="cuda", dtype="fp16", load_in_4bit=True, use_unsloth=False)
    default = load_recipe(None, [])
    assert base_dtype(default, cpu) == "fp32" and base_dtype(default, gpu) == "fp32"
    assert base_dtype(default, t4) == "fp16"
    assert base_dtype(load_recipe(None, ["training.base_dtype=compute"]), cpu) == "bf16"
    assert base_dtype(load_recipe(None, ["training.base_dtype=fp32"]), t4) == "fp32"


def test_a_bf16_cpu_recipe_trains_the_lora_on_an_fp32_base(tiny_model_dir):
    import torch

    from conj_lite.models import resolve_runtime
    from conj_lite.training import load_for_training, trainer_config

    tiny = [f"model.name_or_path={tiny_model_dir}", "model.dtype=bf16", "model.load_in_4bit=false"]
    recipe = load_recipe(None, tiny)
    runtime = resolve_runtime(recipe.model)
    model, _, peft_config, _ = load_for_training(str(tiny_model_dir), recipe, runtime)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert peft_config is not None and trainer_config(recipe, runtime, Path("unused"), False).bf16  # autocast
    compute = load_recipe(None, [*tiny, "training.base_dtype=compute"])
    model, _, _, _ = load_for_training(str(tiny_model_dir), compute, runtime)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_bad_base_dtype_is_refused_when_the_recipe_is_read():
    """Before sampling, not after it, when training loads the model."""
    from conj_lite.errors import InputError

    with pytest.raises(InputError, match="training.base_dtype must be auto, compute"):
        load_recipe(None, ["training.base_dtype=fp8"])


def test_the_learning_rate_schedule_is_the_recipes():
    from conj_lite.errors import InputError
    from conj_lite.models import Runtime
    from conj_lite.training import trainer_config

    cpu = Runtime(device="cpu", dtype="fp32", load_in_4bit=False, use_unsloth=False)
    default = trainer_config(load_recipe(None, []), cpu, Path("unused"), False)
    assert str(default.lr_scheduler_type.value) == "cosine"
    constant = trainer_config(load_recipe(None, ["training.lr_scheduler=constant"]), cpu, Path("unused"), False)
    assert str(constant.lr_scheduler_type.value) == "constant_with_warmup"  # the warm-up stays
    with pytest.raises(InputError, match="training.lr_scheduler: expected one of"):
        load_recipe(None, ["training.lr_scheduler=cosine_with_restarts"])


@pytest.mark.parametrize("field, default, value, bad, refused", [
    ("adam_beta2", 0.999, 0.95, ("1.0", "-0.1"), "expected 0 <= beta2 < 1"),
    ("max_grad_norm", 1.0, 0.3, ("0", "-1"), "expected a norm above 0"),
])
def test_optimizer_settings_are_the_recipes(field, default, value, bad, refused):
    from conj_lite.errors import InputError
    from conj_lite.models import Runtime
    from conj_lite.training import trainer_config

    cpu = Runtime(device="cpu", dtype="fp32", load_in_4bit=False, use_unsloth=False)
    assert getattr(trainer_config(load_recipe(None, []), cpu, Path("unused"), False), field) == default
    chosen = trainer_config(load_recipe(None, [f"training.{field}={value}"]), cpu, Path("unused"), False)
    assert getattr(chosen, field) == value
    for text in bad:
        with pytest.raises(InputError, match=f"training.{field}: {refused}"):
            load_recipe(None, [f"training.{field}={text}"])


def test_lora_layers_are_the_top_n_of_the_model():
    from conj_lite.errors import InputError
    from conj_lite.training import lora_layers

    assert lora_layers(load_recipe(None, []), 30) is None  # every layer
    assert lora_layers(load_recipe(None, ["training.lora_layers=10"]), 30) == list(range(20, 30))
    assert lora_layers(load_recipe(None, ["training.lora_layers=30"]), 30) is None
    assert lora_layers(load_recipe(None, ["training.lora_layers=64"]), 30) is None
    with pytest.raises(InputError, match="training.lora_layers: expected 1 or more"):
        load_recipe(None, ["training.lora_layers=0"])  # when the recipe is read, before sampling


def test_loraplus_below_one_is_refused_when_the_recipe_is_read():
    from conj_lite.errors import InputError

    assert load_recipe(None, []).training.loraplus_ratio == 1
    with pytest.raises(InputError, match="training.loraplus_ratio: expected 1"):
        load_recipe(None, ["training.loraplus_ratio=0.5"])


def verdict_pair(pid: str, order: str, question: str, answers: tuple[str, str], verdict: int) -> dict:
    """A verdict-only DPO pair on the `en` template: `verdict` chosen, the other rejected."""
    from conj_lite.prompts import build_messages, load_template

    template = replace(load_template("en"), rationale=False)
    return {"id": pid, "order": order, "kind": "hint", "prompt": build_messages(template, question, *answers),
            "chosen": '{"better_answer": %d}' % verdict, "rejected": '{"better_answer": %d}' % (3 - verdict)}


@pytest.mark.slow
def test_loraplus_moves_the_b_matrices_ratio_times_as_fast(tiny_model_dir, tmp_path):
    """One optimizer step from LoRA's start (B = 0, so only B has a gradient): Adam's
    first step moves each weight by about its learning rate, so with training.loraplus_ratio
    = 16 the B matrices move ~16x as far as with plain LoRA, and the A matrices not at all."""
    import torch
    from safetensors.torch import load_file

    from conj_lite.jsonio import write_jsonl
    from conj_lite.training import train_adapter

    pairs = [verdict_pair(f"p{k}", "ab", f"Is {k} even?", ("Yes.", "No."), 1 + k % 2) for k in range(2)]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    moved = {}
    for ratio in (1, 16):
        recipe = load_recipe(find_recipe("tiny-cpu"), [
            "training.max_steps=1", "training.batch_size=2", "training.grad_accum=1", "training.warmup_ratio=0",
            "training.eval_pairs=0", "training.lr_scheduler=constant", "filtering.rationale=false",
            "training.ref_engine=transformers", f"training.loraplus_ratio={ratio}", "training.seed=0"])
        train_adapter(recipe, str(tiny_model_dir), path, tmp_path / f"run{ratio}")
        weights = load_file(tmp_path / f"run{ratio}" / "adapter" / "adapter_model.safetensors")
        moved[ratio] = {part: torch.cat([w.flatten() for name, w in weights.items() if f"lora_{part}" in name])
                        for part in ("A", "B")}
    assert torch.equal(moved[1]["A"], moved[16]["A"])  # the same seeded start (training.seed), no gradient yet
    ratio = (moved[16]["B"].abs().mean() / moved[1]["B"].abs().mean()).item()
    assert 12 < ratio < 20, ratio


def test_the_lora_starts_from_training_seed_whatever_the_process_drew_before(tiny_model_dir, tmp_path):
    """TRL builds the LoRA before the Trainer seeds torch: without seeding it first, the adapter's
    initial A came from the process's random state (sampling, a run before it), so two runs of
    one seed trained different adapters. One step from the same seed gives the same adapter."""
    import torch
    from safetensors.torch import load_file

    from conj_lite.jsonio import write_jsonl
    from conj_lite.training import train_adapter

    pairs = [verdict_pair("p0", "ab", "Is 2 even?", ("Yes.", "No."), 1),
             verdict_pair("p0", "ba", "Is 2 even?", ("No.", "Yes."), 2)]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    adapters = []
    for run, (seed, drawn) in enumerate(((0, 1), (0, 2), (1, 1))):
        recipe = load_recipe(find_recipe("tiny-cpu"), [
            "training.max_steps=1", "training.batch_size=2", "training.grad_accum=1", "training.eval_pairs=0",
            "filtering.rationale=false", "training.ref_engine=transformers", f"training.seed={seed}"])
        torch.manual_seed(drawn)
        torch.rand(drawn)  # what a stage before training drew
        train_adapter(recipe, str(tiny_model_dir), path, tmp_path / f"run{run}")
        adapters.append(load_file(tmp_path / f"run{run}" / "adapter" / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])
    assert not all(torch.equal(adapters[0][name], adapters[2][name]) for name in adapters[0])


def test_the_best_window_is_the_highest_mean_the_latest_on_ties():
    from conj_lite.training import best_window

    assert best_window([0.5, 0.5], 3) is None
    assert best_window([0.5, 0.5, 0.5, 0.5], 2) == (3, 0.5)  # a plateau throughout: the last steps
    plateau_exit_fall = [0.5, 0.5, 0.75, 0.875, 0.875, 0.5, 0.5, 0.5]
    assert best_window(plateau_exit_fall, 2) == (4, 0.875)
    assert best_window(plateau_exit_fall, 3) == (4, pytest.approx(2.5 / 3))
    assert best_window([0.5, 1.0, 0.5, 1.0], 1) == (3, 1.0)


@pytest.mark.parametrize("overrides, refused", [
    (["training.keep=first"], "training.keep: expected one of"),
    (["training.keep=best", "training.objective=sft"], "the sft objective does not have"),
    (["training.keep=best", "training.keep_window=0"], "training.keep_window: expected 1 or more"),
    (["training.keep=best", "training.keep_level=0"], r"training.keep_level: expected a probability in \(0, 1\]"),
    (["training.keep=best", "training.keep_level=1.5"], r"training.keep_level: expected a probability in \(0, 1\]"),
])
def test_keep_settings_are_checked_when_the_recipe_is_read(overrides, refused):
    from conj_lite.errors import InputError

    assert load_recipe(None, []).training.keep == "last"
    assert load_recipe(None, ["training.keep=best"]).training.keep == "best"
    with pytest.raises(InputError, match=refused):
        load_recipe(None, overrides)


def binomial_tail(n: int, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2)."""
    from math import comb

    return sum(comb(n, i) for i in range(k, n + 1)) / 2 ** n


@pytest.mark.parametrize("n, level", [(32, 0.05), (64, 0.05), (8, 0.05), (32, 0.01), (32, 0.5), (100, 0.05)])
def test_the_chance_bar_is_the_lowest_accuracy_a_guessing_judge_reaches_that_rarely(n, level):
    from conj_lite.training import chance_bar

    k = round(chance_bar(n, level) * n)
    assert binomial_tail(n, k) <= level < binomial_tail(n, k - 1)


def test_the_chance_bar_of_the_demos_window_and_of_windows_too_small_to_tell():
    from conj_lite.training import chance_bar

    assert chance_bar(32, 0.05) == 22 / 32  # 8 steps of 4 examples: 18/32 (0.5625) is chance, 22/32 is not
    assert chance_bar(4, 0.05) > 1  # 4 examples cannot show a judge beyond chance at 5%
    assert chance_bar(4, 1.0) == 0.0  # level 1: any window


@pytest.mark.slow
@pytest.mark.parametrize("level", [1.0, 0.05])
def test_keep_best_hands_on_the_adapter_of_the_best_window_not_the_last(tiny_model_dir, tmp_path, level):
    """Single-order rows whose verdicts alternate, taken shuffled: the tiny judge's pair accuracy
    rises and falls with its position prior (seeded: 1.0 at step 4 of 8, 0.5 at the end). With
    training.keep: best the adapter handed on is the one saved after step 4, and says so; unless the
    window (one step of 2 examples) cannot tell that accuracy from a guess at the keep_level (5%):
    then the last step's adapter, with why."""
    import torch
    from safetensors.torch import load_file

    from conj_lite.artifacts import TRAIN_META
    from conj_lite.jsonio import write_jsonl
    from conj_lite.training import best_window, train_adapter

    pairs = [verdict_pair(f"p{k}", "ab", f"Is {2 * k} even?", ("Yes.", "No."), 1) if k % 2 else
             verdict_pair(f"p{k}", "ba", f"Is {2 * k} even?", ("No.", "Yes."), 2) for k in range(16)]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    recipe = load_recipe(find_recipe("tiny-cpu"), [
        "training.max_steps=8", "training.batch_size=2", "training.grad_accum=1", "training.eval_pairs=0",
        "training.learning_rate=5e-3", "training.orders_together=false", "training.save_steps=8",
        "filtering.rationale=false", "training.ref_engine=transformers", "training.keep=best",
        "training.keep_window=1", f"training.keep_level={level}"])
    summary = train_adapter(recipe, str(tiny_model_dir), path, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "adapter" / TRAIN_META).read_text())
    accuracies = [entry["rewards/accuracies"] for entry in meta["history"]]
    end, accuracy = best_window(accuracies, 1)
    assert summary.kept == meta["summary"]["kept"]
    handed_on = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    last = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors")
    if level < 1:
        assert summary.kept["rule"] == "last" and summary.kept["best_window_accuracy"] == accuracy == 1.0
        assert "no window beat chance" in summary.kept["why"] and "over 2 examples" in summary.kept["why"]
        assert all(torch.equal(handed_on[name], last[name]) for name in last)
        return
    assert summary.kept["rule"] == "best" and summary.kept["step"] == meta["history"][end]["step"] < 8, summary.kept
    assert summary.kept["window_accuracy"] == accuracy > summary.kept["last_window_accuracy"]
    kept = load_file(tmp_path / "run" / "checkpoints" / "best" / "adapter_model.safetensors")
    assert all(torch.equal(handed_on[name], kept[name]) for name in kept)
    assert not all(torch.equal(handed_on[name], last[name]) for name in last)


def test_a_resumed_training_drops_a_best_adapter_saved_after_its_checkpoint(tmp_path):
    """Killed after the best adapter of step 6 was saved but before a checkpoint at or past
    it: the run resumes from step 4 and replays steps 5-8, so the saved best describes steps
    the resumed run has not trained yet. It goes; one saved at or before the checkpoint stays."""
    from transformers import TrainerState

    from conj_lite.training import keep_best_callback

    best = tmp_path / "best"
    for saved, resumed_at, stays in ((6, 4, False), (4, 4, True), (2, 4, True), (6, 0, False)):
        best.mkdir(exist_ok=True)
        (best / "kept.json").write_text(json.dumps({"step": saved, "window": 1, "window_accuracy": 1.0}))
        keep_best_callback(best, 1).on_train_begin(None, TrainerState(global_step=resumed_at), None)
        assert best.is_dir() == stays, (saved, resumed_at)


def test_the_stage_line_says_which_adapter_was_kept():
    from conj_lite.training import kept_text

    assert kept_text(None) == ""
    best = {"rule": "best", "step": 132, "window_accuracy": 0.875, "last_step": 160, "last_window_accuracy": 0.65625}
    assert kept_text(best) == ("; kept the adapter after step 132 of 160 (pair accuracy 0.875 over its window, "
                               "the last window's 0.656)")
    assert "0.500 was the best" in kept_text({"rule": "last", "step": 80, "window_accuracy": 0.5, "best_step": 80,
                                              "best_window_accuracy": 0.5})
    assert "fewer than 8 steps logged" in kept_text({"rule": "last", "step": 4, "why": "fewer than 8 steps logged"})
