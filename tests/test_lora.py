"""LoRA judge bundles: the trained adapter as a GGUF LoRA (llama.cpp's own
convert_lora_to_gguf.py, from the converter's source release), loaded on the base GGUF at
run time, judges like transformers base + adapter and like the merged export."""

from __future__ import annotations

import pytest

from conj_lite.data import load_pairs
from conj_lite.errors import InputError
from conj_lite.export import LORA_CONVERTER, _wanted, convert_lora_to_gguf, export_gguf, find_converter
from conj_lite.judging import Judge
from conj_lite.judging.backends import read_lora_metadata


def test_the_lora_converter_is_unpacked_with_the_model_converter():
    assert _wanted(LORA_CONVERTER) and _wanted("convert_hf_to_gguf.py")
    assert not _wanted("convert_llama_ggml_to_gguf.py")


@pytest.fixture(scope="session")
def exported(tiny_model_dir, tmp_path_factory):
    from test_export import export_tiny

    return export_tiny(tiny_model_dir, tmp_path_factory.getbasetemp() / "tiny-export")


@pytest.fixture(scope="module")
def bundle(exported, tiny_model_dir, tmp_path_factory):
    """(base f16 GGUF, base q8_0 GGUF, the adapter as a GGUF LoRA)."""
    work = tmp_path_factory.getbasetemp() / "tiny-lora"
    base = export_gguf(tiny_model_dir, work / "base", quant_types=("q8_0",), threads=2, name="base")
    lora = convert_lora_to_gguf(exported.merged_dir.parent / "adapter", work / "judge-lora-f16.gguf", tiny_model_dir,
                                converter=find_converter(lora=True))
    return base.gguf_paths["f16"], base.gguf_paths["q8_0"], lora


@pytest.fixture(scope="module")
def items(sample_data):
    return [(p.question, p.answer_a, p.answer_b) for p in load_pairs(sample_data).pairs[:8]]


@pytest.mark.slow
def test_base_plus_lora_judges_like_transformers_base_plus_adapter(bundle, exported, tiny_model_dir, items):
    base_f16, base_q8, lora = bundle
    meta = read_lora_metadata(lora)
    assert meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 16.0
    assert "conj_lite.judge_template" in meta
    assert meta["conj_lite.chat_date"] == "1 Jan 2030"  # from the adapter's conj_lite_train.json
    with Judge.from_hf(tiny_model_dir, adapter=exported.merged_dir.parent / "adapter", n_threads=2, warn=None) as hf:
        reference = [hf.compare(*item, mode="verdict") for item in items]
    with Judge.from_gguf(base_f16, lora_path=lora, n_threads=2, warn=None) as judge:
        assert judge.template.name == "en"  # from the LoRA's metadata
        bundled = judge.compare_many(items, mode="verdict")
        alone = [judge.compare(*item, mode="verdict") for item in items]
    with Judge.from_gguf(exported.gguf_paths["f16"], n_threads=2, warn=None) as merged:
        merged_results = merged.compare_many(items, mode="verdict")
    with Judge.from_gguf(base_f16, n_threads=2, warn=None) as plain:
        untouched = plain.compare_many(items, mode="verdict")
    for got, ref, one, mer in zip(bundled, reference, alone, merged_results):
        assert got.p_a == pytest.approx(ref.p_a, abs=2e-3)
        assert got.p_a == pytest.approx(one.p_a, abs=2e-3) and got.p_a == pytest.approx(mer.p_a, abs=2e-3)
        assert [o.slot for o in got.orders.values()] == [o.slot for o in one.orders.values()]
    # The adapter does change the judge: without it the probabilities differ.
    assert max(abs(a.p_a - b.p_a) for a, b in zip(bundled, untouched)) > 5e-3
    with Judge.from_gguf(base_q8, lora_path=lora, n_threads=2, warn=None) as quantized:
        q8 = quantized.compare_many(items, mode="verdict")
    assert max(abs(a.p_a - b.p_a) for a, b in zip(q8, reference)) < 1e-2


def test_a_lora_file_is_checked(tmp_path, exported):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(InputError):
        read_lora_metadata(bad)
    with pytest.raises(InputError, match="not a GGUF LoRA"):
        read_lora_metadata(exported.gguf_paths["q8_0"])  # a model, not an adapter
    with pytest.raises(InputError, match="no such LoRA"):
        read_lora_metadata(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_several_adapters_on_one_base_picked_per_request(bundle, items):
    from conj_lite.cli.serve import load_adapters
    from conj_lite.judging.serve import JudgeRequest, JudgeService, RequestError

    base_f16, _, lora = bundle
    with Judge.from_gguf(base_f16, lora_path=lora, n_threads=2, warn=None) as single:
        expected = [r.p_a for r in single.compare_many(items[:3], mode="verdict")]
    judge = Judge.from_gguf(base_f16, n_threads=2, warn=None)
    plain = [r.p_a for r in judge.compare_many(items[:3], mode="verdict")]
    load_adapters(judge, {"judge": str(lora), "again": str(lora)}, template_given=False)
    assert judge.template.name == "en" and judge.backend.active_adapter == "judge"
    service = JudgeService(judge, adapters=["judge", "again"])
    try:
        def ask(adapter):
            request = JudgeRequest(list(items[:3]), [0, 1, 2], "verdict", False, adapter)
            return [r["p_a"] for r in service.submit(request).result(timeout=300)]

        assert ask(None) == pytest.approx(expected, abs=2e-3)  # the default: the first adapter
        assert ask("again") == pytest.approx(expected, abs=2e-3)
        with pytest.raises(RequestError, match="unknown adapter"):
            ask("other")
        judge.backend.use_adapter(None)  # the base alone again: the cached prompt is not reused
        assert [r.p_a for r in judge.compare_many(items[:3], mode="verdict")] == pytest.approx(plain, abs=2e-3)
        assert [judge.compare(*item, mode="verdict").p_a for item in items[:3]] == pytest.approx(plain, abs=2e-3)
        assert ask("judge") == pytest.approx(expected, abs=2e-3)
    finally:
        service.close()
        judge.close()


@pytest.mark.slow
def test_lora_in_the_top_layers_trains_there_alone_and_runs_on_llama_cpp(bundle, tiny_model_dir, tmp_path):
    """training.lora_layers=1 on the 2-layer tiny model: LoRA weights in the top layer only,
    no gradient below it (why the step is cheaper), and the adapter converts to a GGUF LoRA
    that llama.cpp applies as transformers does."""
    import numpy as np
    import torch
    from peft import get_peft_model

    from conj_lite.config import load_recipe
    from conj_lite.judging.backends import GGUFBackend
    from conj_lite.models import resolve_runtime
    from conj_lite.training import load_for_training

    recipe = load_recipe(None, [f"model.name_or_path={tiny_model_dir}", "model.load_in_4bit=false",
                                "model.dtype=fp32", "training.lora_layers=1"])
    model, tok, peft_config, _ = load_for_training(str(tiny_model_dir), recipe, resolve_runtime(recipe.model))
    peft_config.init_lora_weights = False  # random A and B: the adapter changes the model from the start
    torch.manual_seed(0)
    model = get_peft_model(model, peft_config)
    with torch.no_grad():  # a change the size of a trained one (f16 LoRA weights then stay close)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".layers.1." in n for n in trained)
    ids = tok("Which answer is better? Answer 2.", add_special_tokens=False).input_ids
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    embeddings, after_layer0, after_layer1 = out.hidden_states[:3]
    assert not embeddings.requires_grad and not after_layer0.requires_grad and after_layer1.requires_grad
    model.save_pretrained(tmp_path / "adapter")
    lora = convert_lora_to_gguf(tmp_path / "adapter", tmp_path / "top-lora.gguf", tiny_model_dir,
                                converter=find_converter(lora=True))
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1).numpy()
        with model.disable_adapter():
            plain = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1).numpy()
    base_f16 = bundle[0]
    backend = GGUFBackend(base_f16, n_ctx=256, n_threads=2, lora_path=lora)
    try:
        logits = backend.next_logits(ids)  # the HF tokenizer's ids: the tiny GGUF tokenizes differently
    finally:
        backend.close()
    got = logits - np.logaddexp.reduce(logits)
    # within f16's rounding of the adapter, far from the model without it (0.036 vs 0.30 measured)
    assert np.abs(got - want).max() < 0.2 * np.abs(plain - want).max()
