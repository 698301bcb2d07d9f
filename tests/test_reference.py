"""The DPO reference on llama.cpp (conj_lite/reference.py, training.ref_engine): its
log-probabilities against TRL's own reference pass on the real SmolLM2 and on the tiny
model continuing from an adapter, what auto picks, and which rows it is computed for."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conj_lite.config import find_recipe, load_recipe, recipe_from_dict
from conj_lite.errors import InputError
from conj_lite.models import resolve_runtime
from conj_lite.judging.backends import shared_prefix
from conj_lite.reference import cells_for, log_softmax_at, rows_logps, unique_rows
from conj_lite.training import resolve_ref_engine, visited_rows


def test_log_softmax_at_is_the_log_probability_of_each_token():
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    want = logits - np.log(np.exp(logits).sum())
    assert log_softmax_at(logits, [0, 2]) == pytest.approx([want[0], want[2]])
    assert log_softmax_at(np.array([1000.0, 0.0], dtype=np.float32), [0]) == pytest.approx([0.0])  # no overflow


def test_the_context_holds_the_longest_prompt_and_its_longer_completion():
    assert cells_for([([1] * 10, [2] * 3, [3] * 5), ([1] * 12, [2], [3])]) == 15
    assert cells_for([]) == 1


def test_the_reference_engine_is_a_checked_recipe_field():
    assert load_recipe().training.ref_engine == "auto"
    with pytest.raises(InputError,
                       match=r"training.ref_engine: expected one of \[.auto., .transformers., .llama.cpp.\]"):
        recipe_from_dict({"training": {"ref_engine": "vllm"}})


def test_auto_takes_llama_cpp_with_the_shared_prompt_step_on_a_cpu(tmp_path, monkeypatch):
    import conj_lite.engines as engines

    (tmp_path / "config.json").write_text("{}")
    recipe = load_recipe(find_recipe("smollm2-135m_cpu"))
    runtime = resolve_runtime(recipe.model)
    assert resolve_ref_engine(recipe, runtime, str(tmp_path)) == "llama.cpp"  # a directory llama.cpp can convert
    assert resolve_ref_engine(recipe, runtime, "org/model") == "transformers"  # a hub id: no GGUF to run
    sft = replace(recipe, training=replace(recipe.training, objective="sft"))
    assert resolve_ref_engine(sft, runtime, str(tmp_path)) is None  # no reference at all
    two_rows = replace(recipe, training=replace(recipe.training, shared_prompt=False))
    assert resolve_ref_engine(two_rows, runtime, str(tmp_path)) == "transformers"
    with pytest.raises(InputError, match="training.shared_prompt=true"):
        resolve_ref_engine(replace(two_rows, training=replace(two_rows.training, ref_engine="llama.cpp")), runtime,
                           str(tmp_path))
    monkeypatch.setattr(engines, "llama_cpp_installed", lambda: False)  # as without the package
    assert resolve_ref_engine(recipe, runtime, str(tmp_path)) == "transformers"


def test_a_model_with_no_gguf_names_the_setting_to_change():
    from conj_lite.training import llama_cpp_reference

    with pytest.raises(InputError) as info:
        llama_cpp_reference("org/model", None, load_recipe(find_recipe("smollm2-135m_cpu")))
    assert "org/model: training.ref_engine=llama.cpp needs a GGUF" in str(info.value)
    assert "set training.ref_engine=transformers to compute the reference with TRL instead" in str(info.value)


def test_only_the_rows_max_steps_reaches_are_visited():
    recipe = load_recipe(find_recipe("smollm2-135m_cpu"))  # 80 steps of 2 rows x 4
    assert visited_rows(892, recipe) == 640
    assert visited_rows(500, recipe) == 500
    epochs = replace(recipe, training=replace(recipe.training, max_steps=0))
    assert visited_rows(892, epochs) == 892


def test_a_resumed_training_reads_the_reference_back_and_other_rows_compute_it_anew(tmp_path):
    from conj_lite.reference import cached_logps

    path, calls = tmp_path / "reference_logps.json", []

    def compute(value):
        def run():
            calls.append(value)
            return [value, value], [-value, -value]
        return run

    assert cached_logps(path, "k1", compute(1.0)) == ([1.0, 1.0], [-1.0, -1.0])
    assert cached_logps(path, "k1", compute(2.0)) == ([1.0, 1.0], [-1.0, -1.0])  # read back
    assert calls == [1.0]
    assert cached_logps(path, "k2", compute(3.0)) == ([3.0, 3.0], [-3.0, -3.0])  # other rows: computed
    path.write_text("{not json")
    assert cached_logps(path, "k2", compute(4.0)) == ([4.0, 4.0], [-4.0, -4.0])  # unreadable: computed
    assert calls == [1.0, 3.0, 4.0]


def test_training_takes_the_llama_cpp_reference_and_keeps_it(tiny_model_dir, tmp_path):
    """train_adapter on the tiny model with training.ref_engine=llama.cpp: the trainer's
    rows carry the llama.cpp reference (kept in the run for resuming), and the adapter
    records what computed it."""
    import json

    from conj_lite.jsonio import read_json, write_jsonl
    from conj_lite.prompts import build_messages, load_template
    from conj_lite.training import REFERENCE_LOGPS, train_adapter

    template = replace(load_template("en"), rationale=False)
    answers = {"ab": ("Yes.", "No."), "ba": ("No.", "Yes.")}
    pairs = [{"id": f"p{k}", "order": order, "kind": "hint",
              "prompt": build_messages(template, f"Is {k} even?", *answers[order]),
              "chosen": '{"better_answer": %d}' % (1 if (order == "ab") == (k % 2 == 0) else 2),
              "rejected": '{"better_answer": %d}' % (2 if (order == "ab") == (k % 2 == 0) else 1)}
             for k in range(4) for order in ("ab", "ba")]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    recipe = load_recipe(find_recipe("tiny-cpu"), ["training.ref_engine=llama.cpp", "training.max_steps=2",
                                                   "training.batch_size=2", "training.grad_accum=1",
                                                   "training.eval_pairs=3", "filtering.rationale=false"])
    summary = train_adapter(recipe, str(tiny_model_dir), path, tmp_path / "run")
    assert summary.steps == 2
    kept = read_json(tmp_path / "run" / REFERENCE_LOGPS.format(name="train"))
    assert len(kept["chosen"]) == len(kept["rejected"]) == 4  # the rows 2 steps of 2 visit, not all 8
    assert all(c < 0 for c in kept["chosen"]) and kept["chosen"] != kept["rejected"]
    measured = read_json(tmp_path / "run" / REFERENCE_LOGPS.format(name="eval"))  # eval_pairs: kept apart
    assert len(measured["chosen"]) == 3
    assert summary.before and summary.after  # measured against the llama.cpp reference too
    meta = json.loads((tmp_path / "run" / "adapter" / "conj_lite_train.json").read_text())
    assert meta["summary"]["reference"]["engine"] == "llama.cpp"


# ---------------------------------------------------------------- against TRL's reference pass


def judge_rows(tokenizer, template_name: str = "en-brief"):
    """Verdict-only preference rows as training makes them (the frame head in the prompt)."""
    from conj_lite.prompts import build_messages, load_template
    from conj_lite.training import frame_rows

    template = replace(load_template(template_name), rationale=False)
    questions = [("How do I boil an egg?", "Put it in boiling water for nine minutes.", "Paris is in France."),
                 ("What is the capital of France?", "I like turtles.", "Paris."),
                 ("Can you help me write a poem about rain?", "Rain on the roof, a soft drum...", "No.")]
    rows = []
    for k, (q, a, b) in enumerate(questions):
        for first, second, right in ((a, b, 1 + k % 2), (b, a, 2 - k % 2)):
            rows.append({"prompt": build_messages(template, q, first, second),
                         "chosen": '{"better_answer": %d}' % right, "rejected": '{"better_answer": %d}' % (3 - right)})
    return frame_rows(rows, tokenizer, template, ("chosen", "rejected"))


def trl_reference(model_dir, tokenizer, rows, tmp_path, adapter=None):
    """The shared-prompt trainer with TRL's precomputed reference (a torch forward)."""
    import datasets
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from conj_lite.shared_prompt import make_trainer_class

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if adapter is not None:  # continuing: TRL's reference is a frozen copy of this adapter
        model, lora = PeftModel.from_pretrained(model, str(adapter), is_trainable=True), None
    datasets.disable_caching()
    try:
        return make_trainer_class()(
            model=model, args=DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none",
                                        max_length=1024, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
                                        precompute_ref_log_probs=True, precompute_ref_batch_size=2),
            peft_config=lora, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    finally:
        datasets.enable_caching()


def test_rows_visited_again_are_evaluated_once():
    a, b, c = ([1, 2], [3], [4]), ([1, 2], [4], [3]), ([5], [3], [4])
    unique, where = unique_rows([a, b, a, c, b, a])
    assert unique == [a, b, c]  # in the order first met: the prompt cache follows it
    assert where == [0, 1, 0, 2, 1, 0]
    assert [unique[i] for i in where] == [a, b, a, c, b, a]
    assert unique_rows([]) == ([], [])


def test_llama_cpp_gives_trls_reference_on_the_real_model(smollm2_dir, tmp_path):
    from conj_lite.models import load_tokenizer
    from conj_lite.reference import llama_cpp_reference_logps
    from conj_lite.training import llama_cpp_reference

    tokenizer = load_tokenizer(str(smollm2_dir))
    trainer = trl_reference(smollm2_dir, tokenizer, judge_rows(tokenizer), tmp_path)
    ds = trainer.train_dataset
    recipe = load_recipe(find_recipe("smollm2-135m_cpu"))
    _, reads = llama_cpp_reference(str(smollm2_dir), None, recipe)
    chosen, rejected = llama_cpp_reference_logps(reads["gguf"], None, ds, 1024)
    want_c, want_r = np.array(ds["ref_chosen_logps"]), np.array(ds["ref_rejected_logps"])
    assert np.abs(want_c - want_r).max() > 0.05  # the verdicts differ: a reference that reads the rows
    # llama.cpp's kernels on f32 weights against the fp32 forward: at most 0.004 nats on these
    # rows (from an f16 GGUF: 0.011)
    np.testing.assert_allclose(chosen, want_c, atol=0.008)
    np.testing.assert_allclose(rejected, want_r, atol=0.008)
    # a second pass visits rows again: their results are the first visit's, one per row
    again = llama_cpp_reference_logps(reads["gguf"], None, ds.select([*range(len(ds)), 1, 0]), 1024)
    assert again == (chosen + chosen[1::-1], rejected + rejected[1::-1])
    assert reads["engine"] == "llama.cpp" and reads["lora"] is None and reads["gguf_from"]["as"] == "f32"
    # f32 weights: llama.cpp evaluates prompts ~1.7x faster from them than from f16 (benchmarks/gguf_types.py)
    from gguf import GGMLQuantizationType, GGUFReader

    types = {t.tensor_type for t in GGUFReader(reads["gguf"]).tensors}
    assert types == {GGMLQuantizationType.F32}, types


def test_each_row_is_read_alone_whatever_the_row_before_it(smollm2_dir):
    """The cache keeps the prompt a row shares with the row before; the result must be
    what a fresh context gives for each row alone (the shipped Q4_1: no conversion)."""
    from conj_lite.judging.backends import ParallelDecoder, load_llama
    from conj_lite.models import load_tokenizer
    from conj_lite.packaged import BASE_GGUF

    tokenizer = load_tokenizer(str(smollm2_dir))
    rows = []
    for row in judge_rows(tokenizer):
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]  # rendered, up to the verdict
        rows.append((ids, tokenizer(row["chosen"], add_special_tokens=False)["input_ids"],
                     tokenizer(row["rejected"], add_special_tokens=False)["input_ids"]))
    assert shared_prefix([rows[0][0], rows[1][0]]) > 10  # the instructions and the question are kept
    llm, _ = load_llama(smollm2_dir / BASE_GGUF, n_ctx=512)
    try:
        together = ParallelDecoder(llm, 1, 512)
        got = rows_logps(together, llm.n_vocab(), rows)
        together.close()
        alone = [], []
        for row in rows:
            fresh = ParallelDecoder(llm, 1, 512)
            c, r = rows_logps(fresh, llm.n_vocab(), [row])
            fresh.close()
            alone[0].append(c[0])
            alone[1].append(r[0])
    finally:
        llm.close()
    np.testing.assert_allclose(got[0], alone[0], atol=2e-3)
    np.testing.assert_allclose(got[1], alone[1], atol=2e-3)
    assert all(c < 0 and r < 0 for c, r in zip(*got))


@pytest.mark.slow
def test_continuing_from_an_adapter_the_reference_is_that_adapter(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conj_lite.models import load_tokenizer
    from conj_lite.reference import llama_cpp_reference_logps
    from conj_lite.training import llama_cpp_reference

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)  # an adapter that moves the verdicts
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = judge_rows(tokenizer, "en")
    recipe = load_recipe(find_recipe("tiny-cpu"))
    got = {}
    for name, init in (("base", None), ("adapter", adapter)):
        ds = trl_reference(tiny_model_dir, tokenizer, rows, tmp_path / name, adapter=init).train_dataset
        _, reads = llama_cpp_reference(str(tiny_model_dir), init, recipe)
        assert (reads["lora"] is None) == (init is None)
        chosen, rejected = llama_cpp_reference_logps(reads["gguf"], reads["lora"], ds, 1024)
        np.testing.assert_allclose(chosen, ds["ref_chosen_logps"], atol=0.05)
        np.testing.assert_allclose(rejected, ds["ref_rejected_logps"], atol=0.05)
        got[name] = np.array(chosen)
    assert np.abs(got["base"] - got["adapter"]).max() > 0.1  # the adapter is the reference, not the base
