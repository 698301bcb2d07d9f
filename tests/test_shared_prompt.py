"""conj_lite.shared_prompt: one row per DPO pair, the prompt computed once, against TRL's
own two-row DPO + SFT on the same pairs (loss, gradients, logged measures)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conj_lite.shared_prompt import CHOSEN, PAD, PROMPT, REJECTED, branch_mask, pack, predictors


def test_a_pair_is_one_row_whose_rejected_branch_restarts_where_the_chosen_began():
    ids, positions, segments = pack([5, 6, 7], [8, 9], [10, 11, 12])
    assert ids == [5, 6, 7, 8, 9, 10, 11, 12]
    assert positions == [0, 1, 2, 3, 4, 3, 4, 5]
    assert segments == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3


def test_truncation_keeps_the_start_of_each_branch_as_trl_does():
    ids, positions, segments = pack([1, 2, 3, 4], [5, 6, 7], [8], max_length=6)
    assert ids == [1, 2, 3, 4, 5, 6, 8] and positions == [0, 1, 2, 3, 4, 5, 4]
    ids, _, segments = pack([1, 2, 3, 4], [5], [6], max_length=4)
    assert ids == [1, 2, 3, 4] and segments.count(CHOSEN) == segments.count(REJECTED) == 0


def test_each_completion_token_is_predicted_from_the_token_before_it_in_its_branch():
    chosen, rejected = predictors(p=3, c=2, r=3)
    # row: p0 p1 p2 c0 c1 r0 r1 r2 -> c0 from p2, c1 from c0; r0 from p2, r1 from r0, r2 from r1
    assert chosen == [2, 3] and rejected == [2, 5, 6]
    assert predictors(p=2, c=1, r=0) == ([1], [])


def test_the_rejected_branch_never_sees_the_chosen_one_and_padding_is_seen_by_no_one():
    seg = torch.tensor([[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, PAD]])
    mask = branch_mask(seg)[0, 0]
    assert mask.shape == (6, 6)
    assert mask[4].tolist() == [True, True, False, False, True, False]  # rejected: prompt and itself
    assert mask[3].tolist() == [True, True, True, True, False, False]  # chosen: prompt and chosen, causal
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert not mask[:5, 5].any() and mask[5, 5]  # a padding query sees only itself


# ---------------------------------------------------------------- against TRL's DPOTrainer


def pairs(tokenizer):
    """Verdict-only rows (one token and the turn end) and longer completions of unequal
    length, with prompts of unequal length: padding, truncation-free."""
    from conj_lite.prompts import build_messages, load_template
    from conj_lite.training import frame_rows

    template = replace(load_template("en"), rationale=False)
    verdict = [{"prompt": build_messages(template, f"Is {k} even? " * (1 + k), "Yes.", "No."),
                "chosen": '{"better_answer": %d}' % (1 + k % 2), "rejected": '{"better_answer": %d}' % (2 - k % 2)}
               for k in range(3)]
    rows = frame_rows(verdict, tokenizer, template, ("chosen", "rejected"))
    rows.append({"prompt": rows[0]["prompt"], "chosen": "1, because it is shorter and right}",
                 "rejected": "2}"})
    return rows


def trainers(model_dir, tokenizer, rows, tmp_path, **config):
    """TRL's DPOTrainer and ours on the same LoRA weights (the adapter moved away from the
    reference so that every term is alive), the same rows and settings."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from conj_lite.shared_prompt import make_trainer_class

    args = {**dict(use_cpu=True, report_to="none", max_length=1024, loss_type=["sigmoid", "sft"],
                   loss_weights=[1.0, 0.7], beta=0.3), **config}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    out = []
    for cls, name in ((DPOTrainer, "trl"), (make_trainer_class(), "shared")):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer = cls(model=base, args=DPOConfig(output_dir=str(tmp_path / name), **args), peft_config=lora,
                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param_name, param in sorted(trainer.model.named_parameters()):
                if "lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        out.append(trainer)
    return out


def loss_and_grads(trainer, n):
    model = trainer.model
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))
    model.zero_grad()
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    return loss.item(), grads, metrics


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from conj_lite.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("multiple", [None, 64])
def test_the_shared_prompt_step_gives_trls_loss_gradients_and_measures(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                      multiple):
    rows = pairs(tiny_tokenizer)
    trl_trainer, shared = trainers(tiny_model_dir, tiny_tokenizer, rows, tmp_path, pad_to_multiple_of=multiple)
    assert len(shared.train_dataset[3]["chosen_ids"]) > len(shared.train_dataset[3]["rejected_ids"])
    width = shared.data_collator([shared.train_dataset[i] for i in range(len(rows))])["input_ids"].shape[1]
    longest = max(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in shared.train_dataset)
    assert width == (-(-longest // 64) * 64 if multiple else longest)  # padding is all that differs
    want_loss, want_grads, want = loss_and_grads(trl_trainer, len(rows))
    got_loss, got_grads, got = loss_and_grads(shared, len(rows))
    assert got_loss == pytest.approx(want_loss, rel=1e-4)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "mean_token_accuracy", "entropy"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def test_the_sft_term_alone_is_trls_from_one_forward_pass_without_the_rejected_branch(tiny_model_dir, tiny_tokenizer,
                                                                                     tmp_path):
    rows = pairs(tiny_tokenizer)
    trl_trainer, shared = trainers(tiny_model_dir, tiny_tokenizer, rows, tmp_path, loss_type=["sft"],
                                   loss_weights=[0.7])
    batch = shared.data_collator([shared.train_dataset[i] for i in range(len(rows))])
    assert batch["rejected_tokens"].numel() == 0 and (batch["segments"] == 2).sum() == 0  # REJECTED
    forwards = []
    hook = shared.model.get_base_model().register_forward_hook(lambda *_: forwards.append(1))
    try:
        got_loss, got_grads, got = loss_and_grads(shared, len(rows))
    finally:
        hook.remove()
    assert len(forwards) == 1  # the policy's; no reference pass
    want_loss, want_grads, want = loss_and_grads(trl_trainer, len(rows))
    assert got_loss == pytest.approx(want_loss, rel=1e-4)
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-6)
    for key in ("logps/chosen", "mean_token_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert "rewards/margins" not in got


def test_precomputed_reference_log_probabilities_are_trls(tiny_model_dir, tiny_tokenizer, tmp_path):
    import datasets

    rows = pairs(tiny_tokenizer)
    datasets.disable_caching()  # each trainer computes its own, none reads the other's cache file
    try:
        trl_trainer, shared = trainers(tiny_model_dir, tiny_tokenizer, rows, tmp_path,
                                            precompute_ref_log_probs=True, precompute_ref_batch_size=3)
    finally:
        datasets.enable_caching()
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(shared.train_dataset[key]), torch.tensor(trl_trainer.train_dataset[key]),
                                   rtol=1e-4, atol=1e-5)


def test_other_dpo_losses_are_refused_not_approximated(tiny_model_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="shared-prompt"):
        trainers(tiny_model_dir, tiny_tokenizer, pairs(tiny_tokenizer), tmp_path, label_smoothing=0.1)
