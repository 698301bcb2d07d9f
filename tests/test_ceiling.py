"""benchmarks/ceiling.py: the supervised ceiling's training pairs per step and its HH split."""

import ceiling
import learning_curve
import pytest

needs_shared_hh = pytest.mark.skipif(not ceiling.hh_split.__globals__["HH"].is_file(),
                                     reason="../shared/data/hh-rlhf is not next to the repo")


def test_steps_walk_the_seeded_order_and_go_round_it_again():
    order = [3, 0, 4, 1, 2]
    steps = [ceiling.step_indices(order, step, 2) for step in range(1, 6)]
    assert steps == [[3, 0], [4, 1], [2, 3], [0, 4], [1, 2]]
    # every pair is visited once per pass over the data, whatever the step size
    assert sorted(i for s in steps[:5] for i in s) == sorted(order * 2)


@needs_shared_hh
def test_the_hh_ceiling_is_judged_on_the_learning_curves_held_out_pairs():
    train, test = ceiling.task_pairs("hh", 100, 600, seed=0)
    curve_train, sets = learning_curve.task_data("hh", 100, 600, pool=len(train), seed=0)
    assert [p.id for p in test] == [p.id for p in sets["hh"]]
    assert not {p.id for p in train} & {p.id for p in test}
    assert {p.id for p in curve_train} == {p.id for p in train}
    assert all(len(p.question) + len(p.answer_a) + len(p.answer_b) <= 600 for p in train + test)


@needs_shared_hh
def test_a_budget_beyond_the_training_pairs_takes_them_all():
    """The learning curve's pool is capped at the task's training pairs (a budget beyond
    them trains more than one pass) instead of stopping the run."""
    train, _ = ceiling.task_pairs("hh", 100, 600, seed=0)
    pool, sets = learning_curve.task_data("hh", 100, 600, pool=len(train) + 500, seed=1)
    assert {p.id for p in pool} == {p.id for p in train}
    assert not {p.id for p in pool} & {p.id for p in sets["hh"]}


def test_each_mode_and_objective_has_its_own_section():
    """A LoRA curve rendered after the full fine-tuning one used to replace its section
    (one title per task): each task, mode and objective now has its own."""
    full = {"task": "hh", "method": "full fine-tuning (embeddings frozen), AdamW lr 5e-05"}
    lora_before_mode_was_stored = {"task": "hh", "method": "LoRA r=16, AdamW lr 0.001 (10 warm-up steps), 8 pairs "
                                   "per step in both orders, bf16 autocast, cross-entropy on the verdict token."}
    names = [ceiling.section_name(meta) for meta in (
        full, lora_before_mode_was_stored, {"task": "hh", "mode": "lora", "lr": 1e-3, "objective": "conj"},
        {"task": "hh", "mode": "full", "objective": "conj"}, {"task": "relevance", "mode": "full"},
        {"task": "relevance", "mode": "lora", "lr": 1e-3}, {"task": "hh", "mode": "lora", "lr": 2e-4},
        {"task": "hh", "mode": "lora", "lr": 1e-3, "bf16": False})]
    assert names[0] == (f"{ceiling.TITLE}: hh", "ceiling_hh.json")  # the sections already written keep theirs
    assert names[4] == (ceiling.TITLE, "ceiling.json")
    assert names[1] == (f"{ceiling.TITLE}: hh, LoRA at lr 0.001 in bf16 autocast", "ceiling_hh_lora0.001bf16.json")
    assert names[7] == (f"{ceiling.TITLE}: hh, LoRA at lr 0.001", "ceiling_hh_lora0.001.json")
    assert names[2] == (f"{ceiling.TITLE}: hh, LoRA at lr 0.001, the Con-J loss", "ceiling_hh_lora0.001_conj.json")
    assert len({title for title, _ in names}) == len({raw for _, raw in names}) == len(names)


def test_the_con_j_loss_is_dpo_between_the_verdicts_plus_the_verdicts_share_of_the_sft_term():
    import torch
    import torch.nn.functional as F

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.7], [-0.3, 1.2]], requires_grad=True)
    reference = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0]])
    targets = torch.tensor([0, 1, 1])
    loss = ceiling.conj_loss(logits, reference, targets, beta=0.5, alpha=2.0, completion_tokens=8)
    margins = torch.tensor([(2.0 + 1.0) - (1.0 - 0.0), (0.7 - 0.5) - (0.1 - 0.9), (1.2 + 0.3) - 0.0])
    expected = -F.logsigmoid(0.5 * margins).mean() + 2.0 * F.cross_entropy(logits.detach(), targets) / 8
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # the DPO term sees only the margin over the reference's: shifting a row's two logits changes nothing
    dpo = ceiling.conj_loss(logits + torch.tensor([[5.0], [-3.0], [1.0]]), reference, targets, 0.5, 0.0, 8)
    assert dpo.item() == pytest.approx(-F.logsigmoid(0.5 * margins).mean().item(), rel=1e-6)
    # at the reference (the first step) it is log 2, and its gradient raises each correct verdict
    start = reference.clone().requires_grad_(True)
    at_start = ceiling.conj_loss(start, reference, targets, 0.1, 0.0, 8)
    assert at_start.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    at_start.backward()
    assert all(start.grad[i, t] < 0 < start.grad[i, 1 - t] for i, t in enumerate(targets.tolist()))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_reference_is_the_model_before_training(smollm2_dir, mode):
    import torch

    vm = ceiling.VerdictModel(str(smollm2_dir), "en-brief", mode, 4, False)
    pair = ceiling.task_pairs("relevance", 4, 600, seed=0)[1][0]
    texts = [vm.prompt(pair, "ab"), vm.prompt(pair, "ba")]
    before = vm.logits(texts).detach()
    assert torch.allclose(vm.reference_logits(texts), before, atol=1e-5)
    with torch.no_grad():  # a training step's worth of change to the trained weights
        for name, p in vm.model.named_parameters():
            if p.requires_grad and ("lora_B" in name or (mode == "full" and "layers.29.mlp" in name)):
                p.add_(torch.randn_like(p) * 0.05)
    assert not torch.allclose(vm.logits(texts).detach(), before, atol=1e-3)
    assert torch.allclose(vm.reference_logits(texts), before, atol=1e-5)
    # SmolLM2's ChatML: the loop's verdict-only rows end their prompt with the head, so the
    # completion its SFT term averages over is `1}<|im_end|>`
    assert vm.completion_tokens() == 3


@pytest.mark.slow
def test_a_con_j_loss_run_trains_and_says_what_made_it(tmp_path, smollm2_dir):
    import json

    out = tmp_path / "ceiling"
    assert ceiling.main(["--task", "relevance", "--mode", "lora", "--objective", "conj", "--lr", "1e-3",
                         "--steps", "2", "--batch", "2", "--test", "4", "--eval-every", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    meta, run = results["meta"], results["runs"][0]
    assert (meta["mode"], meta["objective"]) == ("lora", "conj")
    assert "DPO (beta 0.1)" in meta["method"] and f"/ {run['completion_tokens']}" in meta["method"]
    assert [p["pairs"] for p in run["curve"]] == [0, 4]
    assert ceiling.section_name(meta)[0].endswith("LoRA at lr 0.001, the Con-J loss")
